"""What kvbook keeps of a GGUF header, and the caps that bound a hostile one (no numpy, no gguf import)."""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any

from kvbook.errors import ModelError

# GGUFReader keeps Python objects per entry and per tensor (~3 KB, ~5 KB): these caps bound a hostile
# header to ~50 + ~80 MB. Real models: ~30-60 entries, ~1,100 tensors for the largest (405B, 671B).
MAX_KV = 16_384  # metadata entries
MAX_TENSORS = 16_384
MAX_ARRAY = 16_000_000  # entries of one metadata array (vocabularies are ~10^5-10^6; read as one view)
MAX_HEADER = 256 * 1024 * 1024  # bytes of header we are willing to fetch
GGUF_MAGIC = b"GGUF"



@dataclass(frozen=True)
class GGUFHeader:
    """What kvbook needs from a GGUF header."""

    metadata: dict[str, Any]
    n_vocab: int | None
    tensor_bytes: int
    n_tensors: int
    data_offset: int
    file_bytes: int
    # tensor bytes by where llama.cpp places them: "token_embd", "output" (output.*, output_norm.*),
    # "L<i>" (blk.<i>.* but the experts), "L<i>.exps" (blk.<i>.*_exps*), "other"
    tensor_groups: dict[str, int] = field(default_factory=dict)
    # [first byte, end byte] of each group within the tensor data: llama.cpp maps one range per file for the
    # tensors that stay on the CPU (its CPU_Mapped buffer), from the first such tensor to the end of the last
    tensor_ranges: dict[str, list[int]] = field(default_factory=dict)
    # every tensor in file order, compactly: [name, ggml type name, ne (ne0 first), bytes, offset in the tensor
    # data]; what placement needs to size any -ot subset and llama.cpp's CPU_REPACK copies (plan/weights.py).
    # About 80 bytes a tensor in the memo: 90 KB for a 1,100-tensor model, 1.3 MB at the MAX_TENSORS cap
    tensors: list[list[Any]] = field(default_factory=list)


@functools.lru_cache(maxsize=1 << 16)
def tensor_group(name: str) -> str:
    """The placement group of a tensor name (see GGUFHeader.tensor_groups); cached: asked per tensor per plan."""
    if name.startswith("blk."):
        layer, _, rest = name[4:].partition(".")
        return f"L{layer}.exps" if "_exps" in rest else f"L{layer}"
    if name.startswith("token_embd."):
        return "token_embd"
    if name.startswith(("output.", "output_norm.")):
        return "output"
    return "other"


def _check_prefix(head: bytes, source: str) -> None:
    if len(head) < 24:
        raise ModelError(f"{source}: too short to be a GGUF file ({len(head)} bytes)")
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{source}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    n_tensors = int.from_bytes(head[8:16], "little")
    n_kv = int.from_bytes(head[16:24], "little")
    if n_kv > MAX_KV:
        raise ModelError(f"{source}: header claims {n_kv} metadata entries (cap {MAX_KV}); corrupt or hostile file")
    if n_tensors > MAX_TENSORS:
        raise ModelError(f"{source}: header claims {n_tensors} tensors (cap {MAX_TENSORS}); corrupt or hostile file")
