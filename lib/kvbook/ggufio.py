"""Read GGUF metadata and tensor sizes (never the weights) with the `gguf` package's reader.

Counts are capped before anything is allocated or looped over, so a hostile header fails fast
with one clear line. Remote files are sized from their header alone, fetched with HTTP Range.
"""

from __future__ import annotations

import hashlib
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFEndian, GGUFReader, GGUFValueType

from kvbook.errors import ModelError

# GGUFReader keeps Python objects per entry and per tensor (~3 KB, ~5 KB): these caps bound a hostile
# header to ~50 + ~80 MB. Real models: ~30-60 entries, ~1,100 tensors for the largest (405B, 671B).
MAX_KV = 16_384  # metadata entries
MAX_TENSORS = 16_384
MAX_ARRAY = 16_000_000  # entries of one metadata array (vocabularies are ~10^5-10^6; read as one view)
MAX_HEADER = 256 * 1024 * 1024  # bytes of header we are willing to fetch
GGUF_MAGIC = b"GGUF"


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

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list]:
        if int(count) > MAX_TENSORS:
            raise ModelError(f"header claims {int(count)} tensors (cap {MAX_TENSORS})")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
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
        for _ in range(count):
            if offs + length.size > end:
                raise ModelError("truncated GGUF: a string array runs past the end of the file")
            offs += length.size + length.unpack_from(self.data, offs)[0]
        if offs > end:
            raise ModelError("truncated GGUF: a string array runs past the end of the file")
        return offs


@dataclass(frozen=True)
class GGUFHeader:
    """What kvbook needs from a GGUF header."""

    metadata: dict[str, Any]
    n_vocab: int | None
    tensor_bytes: int
    n_tensors: int
    data_offset: int
    file_bytes: int


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


def _parse(path: Path, source: str, file_bytes: int) -> GGUFHeader:
    try:
        reader = _BoundedReader(path)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise ModelError(f"{source}: truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from None
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
        if isinstance(value, _StringArray):
            continue
        meta[name] = value
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    return GGUFHeader(meta, n_vocab, tensor_bytes, len(reader.tensors), int(reader.data_offset), file_bytes)


def read_local(path: Path) -> GGUFHeader:
    """Header of a local GGUF file (memory-mapped; tensor data is not read)."""
    source = str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise ModelError(f"{source}: cannot read ({exc.strerror})") from None
    _check_prefix(head, source)
    header = _parse(path, source, size)
    if header.data_offset + header.tensor_bytes > size:
        raise ModelError(
            f"{source}: truncated GGUF: tensors need {header.data_offset + header.tensor_bytes} bytes, file has {size}"
        )
    return header


def split_shards(path: Path, meta: dict[str, Any]) -> list[Path]:
    """All shards of a split GGUF (`split.count` > 1), named like llama.cpp's gguf-split writes them."""
    count = int(meta.get("split.count", 1) or 1)
    if count <= 1:
        return [path]
    match = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", path.name)
    if not match:
        raise ModelError(f"{path}: split.count={count} but the name is not PREFIX-NNNNN-of-MMMMM.gguf")
    shards = [path.with_name(f"{match.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise ModelError(f"{path}: split GGUF is missing shards: {', '.join(missing)}")
    return shards


def read_remote(url: str, *, timeout: float = 30.0, session: Any = None) -> GGUFHeader:
    """Header of a remote GGUF, fetched with HTTP Range requests in growing chunks."""
    import requests

    http = session or requests.Session()
    fetched = b""
    want = 1 << 20
    total: int | None = None
    last_error: ModelError | None = None
    with tempfile.TemporaryDirectory(prefix="kvbook-gguf-") as tmp:
        part = Path(tmp) / "header.gguf"
        while True:
            try:
                resp = http.get(
                    url, headers={"Range": f"bytes={len(fetched)}-{want - 1}"}, timeout=timeout, stream=True
                )
            except requests.RequestException as exc:
                raise ModelError(f"{url}: cannot fetch ({type(exc).__name__}: {exc})") from None
            with resp:
                if resp.status_code == 200:
                    raise ModelError(f"{url}: the server ignores HTTP Range requests; download the file and pass its path")
                if resp.status_code == 416 and total is not None:
                    raise ModelError(f"{url}: file ended before its GGUF header did; truncated GGUF")
                if resp.status_code != 206:
                    raise ModelError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                total = _content_range_total(resp.headers.get("Content-Range"), url)
                limit = want - len(fetched)
                chunk = resp.raw.read(limit + 1, decode_content=True) if resp.raw else resp.content
                if len(chunk) > limit:
                    raise ModelError(f"{url}: server sent more than the requested range")
            fetched += chunk
            if len(fetched) >= 24:
                _check_prefix(fetched[:24], url)
            complete = len(fetched) >= total
            part.write_bytes(fetched)
            if not complete:
                # A hole up to the real size: the reader then sees the file's true length.
                with part.open("r+b") as fh:
                    fh.truncate(total)
            try:
                header = _parse(part, url, total)
                if header.data_offset <= len(fetched):
                    return header
            except ModelError as exc:
                if complete:
                    raise
                last_error = exc
            else:
                last_error = ModelError("header continues past the fetched bytes")
            if complete:
                raise ModelError(f"{url}: truncated or corrupt GGUF header")
            if want >= MAX_HEADER:
                raise ModelError(f"{url}: no complete GGUF header in the first {MAX_HEADER} bytes ({last_error})")
            want = min(want * 4, MAX_HEADER, total)


def _content_range_total(value: str | None, url: str) -> int:
    match = re.match(r"bytes \d+-\d+/(\d+)$", value or "")
    if not match:
        raise ModelError(f"{url}: server answered 206 without a usable Content-Range ({value!r})")
    return int(match.group(1))


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_gguf_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


