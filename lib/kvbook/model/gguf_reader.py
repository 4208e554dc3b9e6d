"""The gguf package's reader, bounded: every count capped and every read checked before it allocates.

Imported only when a header must actually be parsed (numpy and gguf cost ~150 ms to import)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, cast

import numpy as np
from gguf import GGUFEndian, GGUFReader, GGUFValueType

from kvbook.errors import ModelError
from kvbook.model.gguf_header import MAX_ARRAY, MAX_KV, MAX_TENSORS, GGUFHeader, tensor_group


class _BoundedReader(GGUFReader):
    """GGUFReader that checks every count against a cap and every read against the end of the file
    before it allocates or loops; metadata arrays are one view (numbers) or skipped (strings)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise ModelError(f"truncated GGUF: a field at byte {int(offset)} runs past the end of the file")
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        if int(count) > MAX_KV:
            raise ModelError(f"header claims {int(count)} metadata entries (cap {MAX_KV})")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
        if int(count) > MAX_TENSORS:
            raise ModelError(f"header claims {int(count)} tensors (cap {MAX_TENSORS})")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item_type, count = int(raw_itype[0]), int(alen[0])
        if count > MAX_ARRAY:
            raise ModelError(f"metadata array claims {count} entries (cap {MAX_ARRAY})")
        if item_type == GGUFValueType.STRING:  # data -> the count; the strings are skipped, never decoded
            end = self._skip_strings(orig_offs + 12, count)
            return end - orig_offs, [raw_itype, alen], [1], [GGUFValueType.ARRAY, GGUFValueType.STRING]
        if item_type == GGUFValueType.ARRAY:
            raise ModelError("nested metadata arrays are not supported (llama.cpp rejects them too)")
        if item_type not in self.gguf_scalar_to_np:
            raise ModelError(f"metadata array of unknown type {item_type}")
        values = self._get(orig_offs + 12, self.gguf_scalar_to_np[GGUFValueType(item_type)], count)
        return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, GGUFValueType(item_type)]

    def _skip_strings(self, offs: int, count: int) -> int:
        """Offset just past `count` GGUF strings starting at `offs`; only their lengths are read."""
        length = struct.Struct("<Q" if self.endianess == GGUFEndian.LITTLE else ">Q")
        end = len(self.data)
        if count * length.size > end - offs:
            raise ModelError(f"truncated GGUF: metadata array of {count} strings runs past the end of the file")
        buf, unpack, last = memoryview(cast(Any, self.data)), length.unpack_from, end - length.size  # a np.memmap
        for _ in range(count):  # a vocabulary is ~10^5 strings: keep this loop bare
            if offs > last:
                raise ModelError("truncated GGUF: a string array runs past the end of the file")
            offs += 8 + unpack(buf, offs)[0]
        if offs > end:
            raise ModelError("truncated GGUF: a string array runs past the end of the file")
        return offs


def _value(field: Any) -> Any:
    """A metadata field as a Python scalar, string or list (token lists are counted, not decoded)."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:  # as _BoundedReader reads them: data -> the count, or the values
        if field.types[1] == GGUFValueType.STRING:
            return _StringArray(int(field.parts[field.data[0]][0]))
        return field.parts[field.data[0]].tolist()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0]
    return value.item() if hasattr(value, "item") else value


class _StringArray(int):
    """Length of a string array; the strings themselves are never decoded."""


def _open(path: Path, source: str) -> _BoundedReader:
    """The bounded reader over `path`; a bad header is one ModelError naming `source`."""
    try:
        return _BoundedReader(path)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise ModelError(f"{source}: truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from None


def parse(path: Path, source: str, file_bytes: int) -> GGUFHeader:
    """The header of the GGUF at `path` as the gguf package's reader sees it; tokenizer arrays are dropped."""
    reader = _open(path, source)
    meta: dict[str, Any] = {}
    n_vocab = None
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = _value(field)
        if name == "tokenizer.ggml.tokens":
            if not isinstance(value, _StringArray):
                raise ModelError(f"{source}: tokenizer.ggml.tokens is not an array of strings")
            n_vocab = int(value)
            continue
        if isinstance(value, _StringArray) or (name.startswith("tokenizer.ggml.") and isinstance(value, list)):
            continue  # token lists, scores and types: the memory model needs only their count
        meta[name] = value
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    groups: dict[str, int] = {}
    ranges: dict[str, list[int]] = {}
    rows: list[list[Any]] = []
    base = int(reader.data_offset)
    for t in reader.tensors:
        key, start, size = tensor_group(str(t.name)), int(t.data_offset) - base, int(t.n_bytes)
        groups[key] = groups.get(key, 0) + size
        first, end = ranges.get(key, [start, start])
        ranges[key] = [min(first, start), max(end, start + size)]
        rows.append([str(t.name), t.tensor_type.name, [int(n) for n in t.shape], size, start])
    return GGUFHeader(meta, n_vocab, tensor_bytes, len(reader.tensors), base, file_bytes, groups, ranges, rows)


def tensor_sizes(path: Path, source: str) -> list[tuple[str, int]]:
    """(name, bytes) of every tensor in the GGUF at `path`, in file order (for adapters, whose buffer pads each)."""
    reader = _open(path, source)
    return [(str(t.name), int(t.n_bytes)) for t in reader.tensors]
