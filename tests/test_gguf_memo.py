"""The GGUF header memo: a second read of the same file is the same header without numpy or gguf, and any
change to the file, or a damaged memo, means a fresh parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbook.model import ggufio
from kvbook.model.gguf_reader import parse
from kvbook.paths import params_dir
from kvbook.testing.synthetic import write_synthetic_gguf


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVBOOK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf-headers"


def test_the_memo_returns_the_parsed_header(cache, gemma3) -> None:
    first = ggufio.read_local(gemma3)
    assert first == parse(gemma3, str(gemma3), gemma3.stat().st_size)
    assert len(list(cache.glob("*.json"))) == 1
    assert ggufio.read_local(gemma3) == first
    assert first.n_vocab == 262144 and not any(k.startswith("tokenizer.ggml.") and isinstance(v, list)
                                               for k, v in first.metadata.items())


def test_a_second_read_imports_neither_numpy_nor_gguf(cache, gemma3) -> None:
    ggufio.read_local(gemma3)
    code = ("import sys; from pathlib import Path; from kvbook.model.ggufio import read_local; "
            f"h = read_local(Path({str(gemma3)!r})); print(h.n_vocab, 'numpy' in sys.modules, 'gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "KVBOOK_CACHE": str(cache.parent)}).stdout.split()
    assert out == ["262144", "False", "False"]


def test_a_changed_file_or_a_damaged_memo_is_parsed_again(cache, tmp_path) -> None:
    meta = yaml.safe_load((params_dir() / "models" / "llama-3.1-8b.yaml").read_text())["metadata"]
    path = write_synthetic_gguf(meta, tmp_path / "big.gguf")
    assert path.stat().st_size >= ggufio.MEMO_MIN_BYTES
    first = ggufio.read_local(path)
    memo = next(cache.glob("*.json"))
    memo.write_text("{not json")
    assert ggufio.read_local(path) == first  # parsed again, memo rewritten
    assert memo.read_text().startswith("{\"metadata\"")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    meta["llama.context_length"] = 4096
    write_synthetic_gguf(meta, path)  # same path, new content
    assert ggufio.read_local(path).metadata["llama.context_length"] == 4096
    assert len(list(cache.glob("*.json"))) == 2


def test_small_files_are_never_memoised(cache, tmp_path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert path.stat().st_size < ggufio.MEMO_MIN_BYTES
    assert ggufio.read_local(path).n_tensors == 1
    assert not cache.exists() or not list(cache.glob("*.json"))
