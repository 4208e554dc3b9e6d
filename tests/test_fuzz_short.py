"""Short fuzz runs in `make test` (the 10-minute ones: benchmarks/fuzz_gguf.py, fuzz_flags.py): the
GGUF header reader and the llama-server command-line parser raise only kvbook's own errors, within a
deadline, with bounded memory, on arbitrary input. Strategies and checks live in kvbook.testing.fuzzing."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbook.errors import ModelError
from kvbook.model.gguf_header import MAX_ARRAY, MAX_KV, MAX_TENSORS
from kvbook.model.ggufio import read_local
from kvbook.testing import fuzzing
from kvbook.testing.fuzzing import ARRAY, STRING, gguf_array, gguf_file, gguf_kv, gguf_string

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def gguf_fuzz(smollm2, tmp_path_factory) -> fuzzing.Target:
    """read_local fed one input at a time; bulk arrays kept to 2^14 entries to stay short."""
    return fuzzing.gguf_target(smollm2, tmp_path_factory.mktemp("fuzz"), bulk_max=2**14)


@pytest.fixture(scope="module")
def rss_base() -> float:
    return fuzzing.reset_peak_rss()


def assert_clean(target: fuzzing.Target, example, rss_base: float) -> None:
    _, problem = fuzzing.check(target, example, rss_base_mb=rss_base, rss_growth_mb=fuzzing.RSS_GROWTH_MIB)
    assert problem is None, problem


@SETTINGS
@given(data=st.data())
def test_gguf_reader_only_raises_kvbook_errors(gguf_fuzz, rss_base, data):
    assert_clean(gguf_fuzz, data.draw(gguf_fuzz.inputs), rss_base)


@SETTINGS
@given(data=st.data())
def test_flag_parser_only_raises_kvbook_errors(rss_base, data):
    target = fuzzing.flags_target()
    assert_clean(target, data.draw(target.inputs), rss_base)


# ---------------------------------------------------------------- regressions found by the fuzzers


def read(tmp_path, blob: bytes) -> str:
    """read_local on `blob`; the ModelError message (the test fails if it parses)."""
    path = tmp_path / "x.gguf"
    path.write_bytes(blob)
    with pytest.raises(ModelError) as err:
        read_local(path)
    return str(err.value)


@pytest.mark.parametrize("blob, needle", [
    # a u32 value cut by the end of the file: was IndexError from the half-read field
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_kv(b"a", 4, b""), "truncated"),
    # arrays of arrays, 5000 deep or holding an empty string: was RecursionError / IndexError
    (gguf_file([gguf_kv(b"deep", ARRAY, struct.pack("<IQ", ARRAY, 1) * 4999 + gguf_array(0, []))], []), "nested"),
    (gguf_file([gguf_kv(b"a", ARRAY, gguf_array(ARRAY, [gguf_array(STRING, [gguf_string(b"")])]))], []), "nested"),
    # the vocabulary as a string or a number array: was ValueError / TypeError from int()
    (gguf_file([gguf_kv(b"tokenizer.ggml.tokens", STRING, gguf_string(b"x"))], []), "tokenizer.ggml.tokens"),
    (gguf_file([gguf_kv(b"tokenizer.ggml.tokens", ARRAY, gguf_array(4, [b"\0" * 4]))], []), "tokenizer.ggml.tokens"),
])
def test_malformed_values_are_model_errors(tmp_path, blob, needle):
    assert needle in read(tmp_path, blob)


@pytest.mark.parametrize("item_type", [0, STRING])
def test_array_at_the_cap_in_a_tiny_file_fails_fast(tmp_path, item_type):
    """MAX_ARRAY u8 entries claimed by a 49-byte file: was 259 s and 15 GB of RSS, one object per entry."""
    started = time.monotonic()
    assert "truncated" in read(tmp_path, gguf_file([gguf_kv(b"a", ARRAY, gguf_array(item_type, [], MAX_ARRAY))], []))
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("kind, n", [("strings", 2**20), ("kvs", MAX_KV), ("tensors", MAX_TENSORS)])
def test_consistent_headers_at_the_caps_stay_bounded(tmp_path, kind, n):
    """A 2^20-string vocabulary (was ~1 minute and GBs), and entries or tensors at their caps."""
    path = tmp_path / "big.gguf"
    path.write_bytes(fuzzing.bulk_header(kind, n))
    base = fuzzing.reset_peak_rss()
    started = time.monotonic()
    read_local(path)
    assert time.monotonic() - started < fuzzing.DEADLINE_S
    assert fuzzing.peak_rss_mb() - base < fuzzing.RSS_GROWTH_MIB
