"""Read GGUF headers (never the weights): local files (remembered once parsed), remote files over HTTP
Range, split shards. The parsing itself is the gguf package's reader, in kvbook.model.gguf_reader."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, cast

from kvbook.errors import ModelError
from kvbook.model.gguf_header import GGUF_MAGIC, MAX_HEADER, GGUFHeader, _check_prefix
from kvbook.paths import cache_dir

MEMO_VERSION = 4  # 2: tensor_groups, 3: tensor_ranges, 4: tensors (name, type, shape, bytes, offset)
MEMO_MIN_BYTES = 32 * 1024 * 1024  # smaller files parse in milliseconds; no memo for them (nor for fuzz inputs)
MEMO_KEEP = 256


def _memo_file(path: Path, st: os.stat_result) -> Path:
    key = json.dumps([MEMO_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return cache_dir() / "gguf-headers" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _memoised_parse(path: Path, source: str, size: int) -> GGUFHeader:
    """parse(), remembered per (path, size, mtime, inode) in the cache: a second plan of the same file
    reads one small JSON file instead of importing numpy and gguf and walking the vocabulary."""
    st = path.stat()
    memo = _memo_file(path, st) if st.st_size >= MEMO_MIN_BYTES else None
    if memo is not None:
        try:
            return GGUFHeader(**json.loads(memo.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # missing, unreadable or from another version: parse again
    from kvbook.model.gguf_reader import parse

    header = parse(path, source, size)
    if memo is not None:
        _write_memo(memo, header)
    return header


def _write_memo(memo: Path, header: GGUFHeader) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(header)))
        os.replace(tmp, memo)
        old = sorted(memo.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for stale in old[:-MEMO_KEEP]:
            stale.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError):
        pass  # a read-only cache only costs a parse next time


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
    header = _memoised_parse(path, source, size)
    if header.data_offset + header.tensor_bytes > size:
        raise ModelError(
            f"{source}: truncated GGUF: tensors need {header.data_offset + header.tensor_bytes} bytes, file has {size}"
        )
    return header


_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def _shard_names(name: str, count: int, source: str) -> list[str]:
    """PREFIX-00001-of-0000N.gguf ... as llama.cpp's gguf-split names them, from any one shard's name."""
    match = _SHARD.match(name)
    if not match:
        raise ModelError(f"{source}: split.count={count} but the name is not PREFIX-NNNNN-of-MMMMM.gguf")
    return [f"{match.group(1)}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def split_shard_urls(url: str, meta: dict[str, Any]) -> list[str]:
    """The URL of every shard of a remote split GGUF (just `url` when it is not split)."""
    count = int(meta.get("split.count", 1) or 1)
    if count <= 1:
        return [url]
    base, _, rest = url.partition("?")
    folder, _, name = base.rpartition("/")
    query = f"?{rest}" if rest else ""
    return [f"{folder}/{shard}{query}" for shard in _shard_names(name, count, url)]


def split_shards(path: Path, meta: dict[str, Any]) -> list[Path]:
    """All shards of a split GGUF (`split.count` > 1), named like llama.cpp's gguf-split writes them."""
    count = int(meta.get("split.count", 1) or 1)
    if count <= 1:
        return [path]
    shards = [path.with_name(n) for n in _shard_names(path.name, count, str(path))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise ModelError(f"{path}: split GGUF is missing shards: {', '.join(missing)}")
    return shards


def sparse_remote_copy(url: str, folder: Path) -> Path:
    """A local stand-in for a remote GGUF: each shard's header bytes, the tensor data a hole up to the true
    size (a sparse file), under the shard's own name in `folder`. llama.cpp's no-alloc loaders
    (llama-fit-params) read such a file as the real one. Returns the first shard's path."""
    paths = []
    header = read_remote(url, sparse_copy=folder / _url_name(url))
    paths.append(folder / _url_name(url))
    for shard in split_shard_urls(url, header.metadata)[1:]:
        read_remote(shard, sparse_copy=folder / _url_name(shard))
        paths.append(folder / _url_name(shard))
    return paths[0]


def _url_name(url: str) -> str:
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return name if name.endswith(".gguf") else name + ".gguf"


def read_remote(url: str, *, timeout: float = 30.0, session: Any = None, sparse_copy: Path | None = None) -> GGUFHeader:
    """Header of a remote GGUF, fetched with HTTP Range requests in growing chunks; with `sparse_copy`, the
    fetched bytes are left there as a sparse file of the remote file's size (see sparse_remote_copy)."""
    import contextlib

    import requests

    from kvbook.model.gguf_reader import parse

    http = session or requests.Session()
    fetched = b""
    want = 1 << 20
    total: int | None = None
    last_error: ModelError | None = None
    scratch = contextlib.nullcontext(None) if sparse_copy else tempfile.TemporaryDirectory(prefix="kvbook-gguf-")
    with scratch as tmp:
        part = sparse_copy or Path(cast(str, tmp)) / "header.gguf"
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
                header = parse(part, url, total)
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


