"""Read GGUF metadata and tensor sizes (never the weights) with the `gguf` package's reader.

Counts are capped before anything is allocated or looped over, so a hostile header fails fast
with one clear line. Remote files are sized from their header alone, fetched with HTTP Range.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from kvbook.errors import ModelError

MAX_KV = 65_536  # metadata entries
MAX_TENSORS = 1_000_000
MAX_ARRAY = 16_000_000  # entries of one metadata array (vocabularies are ~10^5-10^6)
MAX_HEADER = 256 * 1024 * 1024  # bytes of header we are willing to fetch
GGUF_MAGIC = b"GGUF"


class _BoundedReader(GGUFReader):
    """GGUFReader with every count checked against a cap before the loop that uses it."""

    def _build_fields(self, offs: int, count: int) -> int:
        if int(count) > MAX_KV:
            raise ModelError(f"header claims {int(count)} metadata entries (cap {MAX_KV})")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list]:
        if int(count) > MAX_TENSORS:
            raise ModelError(f"header claims {int(count)} tensors (cap {MAX_TENSORS})")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type == GGUFValueType.ARRAY:
            alen = self._get(orig_offs + 4, np.uint64)
            if alen.size != 1:
                raise ModelError("header ends inside a metadata array")
            if int(alen[0]) > MAX_ARRAY:
                raise ModelError(f"metadata array claims {int(alen[0])} entries (cap {MAX_ARRAY})")
        return super()._get_field_parts(orig_offs, raw_type)


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
    if main == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
            return _StringArray(len(field.data))
        return [v.item() if hasattr(v, "item") else v for v in (field.parts[i][0] for i in field.data)]
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


