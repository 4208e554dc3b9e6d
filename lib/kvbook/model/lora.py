"""Read a LoRA adapter GGUF into a LoraAdapter: what src/llama-adapter.cpp allocates for it.

The loader checks `general.type` = adapter and `adapter.type` = lora, pairs `<name>.lora_a` with
`<name>.lora_b`, skips `*_norm.weight`, and allocates the pairs in one buffer per buffer type of the base
tensors; a CPU buffer pads every tensor to 32 bytes (TENSOR_ALIGNMENT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvbook.errors import BadInput
from kvbook.interface import LoraAdapter
from kvbook.model.ggufio import read_local

CPU_ALIGNMENT = 32


def _pad(n: int, align: int = CPU_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def adapter_from_tensors(meta: dict[str, Any], tensors: list[tuple[str, int]], source: str) -> LoraAdapter:
    """The adapter's buffer from its metadata and (name, bytes) tensor list."""
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise BadInput(f"--lora {source}: not a LoRA adapter GGUF (general.type '{meta.get('general.type')}', "
                       f"adapter.type '{meta.get('adapter.type')}')")
    kept = [(n, b) for n, b in tensors if n.endswith((".lora_a", ".lora_b"))]
    odd = [n for n, _ in tensors if not n.endswith((".lora_a", ".lora_b", "_norm.weight"))]
    if odd:
        raise BadInput(f"--lora {source}: tensor '{odd[0]}' has an unexpected suffix (llama-server refuses it)")
    return LoraAdapter(source=source, arch=str(meta.get("general.architecture")), n_tensors=len(kept),
                       buffer_bytes=sum(_pad(b) for _, b in kept))


def load_lora(spec: str) -> LoraAdapter:
    """A local adapter file (llama-server reads --lora from disk only)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInput(f"--lora: file not found: {spec}")
    from kvbook.model.gguf_reader import tensor_sizes

    header = read_local(path)
    return adapter_from_tensors(header.metadata, tensor_sizes(path, spec), spec)
