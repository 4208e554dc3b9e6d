"""A preset's tensor listing (params/models/<id>.tensors.tsv): every tensor of the named GGUF with its ggml type
and shape, in file order, so that a preset is placed tensor by tensor like the file itself (plan/weights.py).

Format: '#' lines first (the first says what the listing is: "derived: ..." from llama.cpp's quantization rules,
or "listing: ..." copied from a real header dump; then "source: ..." and "check: ..." with citations), then one
line per tensor: name, ggml type name (as gguf-py spells it: Q4_K, MXFP4, F32, ...), ne (ne0 first, comma
separated), tab separated. Sizes and offsets follow from the types and shapes: ggml's block sizes, and each
tensor's data aligned to 32 bytes (GGUF's default general.alignment), as in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvbook.errors import ModelError
from kvbook.interface import TensorInfo

ALIGNMENT = 32  # GGUF general.alignment default (gguf.GGUF_DEFAULT_ALIGNMENT)
SUFFIX = ".tensors.tsv"


@dataclass(frozen=True)
class PresetListing:
    """A preset's tensors (file order, offsets within the tensor data) and what the listing says of itself."""

    tensors: tuple[TensorInfo, ...]
    header: tuple[str, ...]  # the '#' lines, without the '#'
    data_bytes: int  # the tensor data with its alignment padding: the file less its header

    @property
    def kind(self) -> str:
        """'derived' (from quantization rules) or 'listing' (from a real header dump)."""
        first = self.header[0] if self.header else ""
        return first.split(":", 1)[0].strip()


def listing_path(preset: Path) -> Path:
    return preset.with_name(preset.stem + SUFFIX)


def _type_size(name: str, where: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    except KeyError:
        raise ModelError(f"{where}: unknown ggml type {name!r}") from None


def tensor_nbytes(ggml_type: str, ne: Sequence[int], where: str = "tensor listing") -> int:
    """ggml_nbytes of a contiguous tensor: rows of ne0 elements in blocks of the type."""
    block, size = _type_size(ggml_type, where)
    if ne[0] % block:
        raise ModelError(f"{where}: ne0={ne[0]} is not a multiple of {ggml_type}'s block of {block}")
    n = 1
    for x in ne:
        n *= x
    return n // block * size


def read_listing(path: Path) -> PresetListing:
    """Parse a listing (memoised per file version: plans load a preset many times); a malformed line is a
    ModelError naming the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the tensor listing ({type(exc).__name__})") from None
    return _parse(path, text)


@lru_cache(maxsize=32)
def _parse(path: Path, text: str) -> PresetListing:
    header: list[str] = []
    tensors: list[TensorInfo] = []
    offset = 0
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            header.append(line[1:].strip())
            continue
        where = f"{path.name}:{no}"
        parts = line.split("\t")
        try:
            name, ggml_type, dims = parts
            ne = tuple(int(x) for x in dims.split(","))
        except ValueError:
            raise ModelError(f"{where}: expected 'name<TAB>type<TAB>ne0,ne1,...', got {line!r}") from None
        if not ne or any(n <= 0 for n in ne):
            raise ModelError(f"{where}: bad shape {dims!r}")
        nbytes = tensor_nbytes(ggml_type, ne, where)
        tensors.append(TensorInfo(name, ggml_type, ne, nbytes, 0, offset))
        offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
    if not tensors:
        raise ModelError(f"{path}: the tensor listing holds no tensors")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ModelError(f"{path}: a tensor is listed twice")
    return PresetListing(tuple(tensors), tuple(header), offset)


def write_listing(path: Path, header: Sequence[str], rows: Sequence[tuple[str, str, Sequence[int]]]) -> Path:
    """Write a listing (the tool that derives one uses this); it is read back to check it parses."""
    lines = ["# " + h for h in header]
    lines += [f"{name}\t{t}\t{','.join(str(n) for n in ne)}" for name, t, ne in rows]
    path.write_text("\n".join(lines) + "\n")
    read_listing(path)
    return path
