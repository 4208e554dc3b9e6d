"""Short fuzz runs in `make test` (the long ones belong in benchmarks/): the GGUF header reader and
the llama-server command-line parser raise only kvbook's own errors, quickly, on arbitrary input."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbook.errors import KvbookError
from kvbook.flags import parse_server_args
from kvbook.ggufio import read_local

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_SEED: dict[str, bytes] = {}


def _seed_header(smollm2: Path) -> bytes:
    if "h" not in _SEED:
        _SEED["h"] = smollm2.read_bytes()[:200_000]
    return _SEED["h"]


@SETTINGS
@given(data=st.data())
def test_gguf_reader_only_raises_kvbook_errors(tmp_path, smollm2, data):
    seed = _seed_header(smollm2)
    choice = data.draw(st.sampled_from(["random", "flip", "truncate", "counts"]))
    if choice == "random":
        blob = b"GGUF" + data.draw(st.binary(max_size=512))
    elif choice == "flip":
        pos = data.draw(st.integers(0, len(seed) - 1))
        blob = seed[:pos] + bytes([data.draw(st.integers(0, 255))]) + seed[pos + 1:]
    elif choice == "truncate":
        blob = seed[: data.draw(st.integers(0, len(seed)))]
    else:
        n_tensors = data.draw(st.integers(0, 2**64 - 1))
        n_kv = data.draw(st.integers(0, 2**64 - 1))
        blob = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + seed[24:4096]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(blob)
    started = time.monotonic()
    try:
        read_local(path)
    except KvbookError:
        pass
    assert time.monotonic() - started < 10, "reader took too long on a small file"


FLAG_WORDS = ["-m", "-c", "-np", "-kvu", "-ctk", "-ctv", "-fa", "-b", "-ub", "--swa-full", "-ngl", "--port",
              "--jinja", "-ot", "--fit", "-cram", "x.gguf", "q8_0", "on", "off", "-1", "0", "abc", "4096", "=", "--c=5"]


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(FLAG_WORDS), st.text(max_size=12)), max_size=12))
def test_flag_parser_only_raises_kvbook_errors(argv):
    try:
        parse_server_args(argv)
    except KvbookError:
        pass
