"""Fuzz inputs for kvbook's parsers of untrusted input, and the loop that checks them.

Two targets: the GGUF header reader (`ggufio.read_local`) and the llama-server command-line parser
(`flags.parse_server_args`). tests/test_fuzz_short.py runs a few hundred examples in `make test`;
benchmarks/fuzz_gguf.py and fuzz_flags.py run the same strategies for minutes. Each example must
end in success or a KvbookError, within a deadline, without growing the process's peak RSS past a
bound: a header that claims 2^63 strings must be refused before anything is allocated for them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import resource
import signal
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from kvbook.errors import KvbookError
from kvbook.model.gguf_header import MAX_ARRAY, MAX_KV, MAX_TENSORS
from kvbook.model.gguf_reader import _BoundedReader
from kvbook.model.ggufio import read_local
from kvbook.plan.flags import _spellings, parse_server_args

DEADLINE_S = 10.0  # per example; the slowest legitimate input (tensors at the cap) takes ~3 s here
RSS_GROWTH_MIB = 256.0  # caps x GGUFReader's per-entry cost is ~80 MiB; the rest is hypothesis
ADDRESS_SPACE_EXTRA_MIB = 2048  # benchmarks: a runaway allocation hits MemoryError, not the machine

# ---------------------------------------------------------------- GGUF encoding

STRING, ARRAY = 8, 9
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
# counts and lengths a hostile header claims: beyond any file, and at the caps (which pass the cap check)
HUGE = (2**63, 2**60, 2**64 - 1, 2**32, 2**31, MAX_KV, MAX_KV + 1, MAX_TENSORS, MAX_TENSORS + 1, MAX_ARRAY, MAX_ARRAY + 1)
KNOWN_KEYS = ("general.architecture", "general.alignment", "general.name", "tokenizer.ggml.tokens",
              "tokenizer.ggml.scores", "llama.block_count", "llama.context_length", "split.count")


def gguf_string(data: bytes, claimed: int | None = None) -> bytes:
    """A GGUF string: u64 length (possibly a lie) then the bytes."""
    return struct.pack("<Q", len(data) if claimed is None else claimed) + data


def gguf_array(item_type: int, items: list[bytes], claimed: int | None = None) -> bytes:
    """A GGUF array value: item type, u64 count (possibly a lie), then the encoded items."""
    return struct.pack("<IQ", item_type, len(items) if claimed is None else claimed) + b"".join(items)


def gguf_kv(key: bytes, value_type: int, payload: bytes) -> bytes:
    """One metadata entry: key string, value type, encoded value."""
    return gguf_string(key) + struct.pack("<I", value_type) + payload


def gguf_tensor_info(name: bytes, dims: list[int], ggml_type: int, offset: int, n_dims: int | None = None) -> bytes:
    """One tensor info: name, dimension count (possibly a lie), dimensions, type, data offset."""
    count = len(dims) if n_dims is None else n_dims
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", count, *dims, ggml_type, offset)


def gguf_file(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, version: int = 3,
              n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32) -> bytes:
    """A whole GGUF file; counts default to the true ones, padding to `alignment`, then the data."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


@cache
def compact_seed(model: Path, keep_items: int = 32, keep_tensors: int = 4) -> bytes:
    """A small valid GGUF built from a real one: every metadata key (arrays cut to `keep_items`) and
    its smallest tensors with zeroed data, so mutations start from a header read_local accepts."""
    reader = _BoundedReader(model)
    kvs = [_reencode_field(reader, f, keep_items) for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    tensors, data = [], b""
    for t in sorted(reader.tensors, key=lambda t: int(t.n_bytes))[:keep_tensors]:
        data += b"\0" * (-len(data) % 32)
        tensors.append(gguf_tensor_info(t.name.encode(), [int(d) for d in t.shape], int(t.tensor_type), len(data)))
        data += b"\0" * int(t.n_bytes)
    return gguf_file(kvs, tensors, data)


def _reencode_field(reader: _BoundedReader, f: Any, keep_items: int) -> bytes:
    """A metadata field of `reader` as bytes again, its array (if any) cut to `keep_items` entries."""
    value_type, item_type = int(f.types[0]), int(f.types[-1])
    if value_type != ARRAY:
        return gguf_kv(f.name.encode(), value_type, b"".join(p.tobytes() for p in f.parts[3:]))
    if item_type != STRING:
        items = [v.tobytes() for v in f.parts[f.data[0]][:keep_items]]
        return gguf_kv(f.name.encode(), ARRAY, gguf_array(item_type, items))
    start = f.offset + sum(int(p.nbytes) for p in f.parts)  # the reader skips the strings: walk a few
    end = reader._skip_strings(start, min(keep_items, int(f.parts[f.data[0]][0])))
    return gguf_kv(f.name.encode(), ARRAY, struct.pack("<IQ", STRING, min(keep_items, int(f.parts[f.data[0]][0])))
                   + reader.data[start:end].tobytes())


# ---------------------------------------------------------------- GGUF strategies


@st.composite
def lie(draw: Any) -> int | None:
    """Usually None (tell the truth); sometimes a huge or arbitrary count or length."""
    if draw(st.integers(0, 9)) < 8:
        return None
    return draw(st.one_of(st.sampled_from(HUGE), st.integers(0, 2**64 - 1)))


def value_types() -> st.SearchStrategy[int]:
    """A GGUF value type: mostly the 13 valid ones, sometimes any u32."""
    return st.one_of(st.integers(0, 12), st.integers(13, 2**32 - 1))


@st.composite
def gguf_value(draw: Any, value_type: int, depth: int = 2) -> bytes:
    """An encoded value of `value_type`, sometimes the wrong size; arrays nest up to `depth`."""
    if value_type in SCALAR_SIZES:
        size = SCALAR_SIZES[value_type]
        return draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size + 2))
    if value_type == STRING:
        text = draw(st.binary(max_size=24) | st.text(max_size=12).map(str.encode))
        return gguf_string(text, draw(lie()))
    if value_type == ARRAY and depth > 0:
        item_type = draw(value_types())
        items = draw(st.lists(gguf_value(item_type, depth - 1), max_size=5))
        return gguf_array(item_type, items, draw(lie()))
    return draw(st.binary(max_size=16))


@st.composite
def gguf_kvs(draw: Any) -> bytes:
    """One metadata entry with a known or random key and an arbitrary (maybe inconsistent) value."""
    key = draw(st.sampled_from(KNOWN_KEYS).map(str.encode) | st.text(max_size=16).map(str.encode) | st.binary(max_size=8))
    value_type = draw(value_types())
    payload_type = value_type if draw(st.integers(0, 9)) else draw(value_types())  # sometimes the type lies
    return gguf_kv(key, value_type, draw(gguf_value(payload_type)))


@st.composite
def gguf_tensor_infos(draw: Any) -> bytes:
    """One tensor info with small or absurd dimensions, any type number and any offset."""
    name = draw(st.sampled_from([b"token_embd.weight", b"output_norm.weight"]) | st.binary(max_size=12))
    dims = draw(st.lists(st.integers(0, 64) | st.sampled_from(HUGE), max_size=5))
    ggml_type = draw(st.integers(0, 41) | st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0, 32, 64]) | st.integers(0, 2**64 - 1))
    n_dims = draw(lie())
    return gguf_tensor_info(name, dims, ggml_type, offset, None if n_dims is None else n_dims % 2**32)


@st.composite
def gguf_documents(draw: Any) -> bytes:
    """A GGUF file built field by field: valid structure with lies in counts, lengths and types."""
    version = draw(st.sampled_from([3, 3, 3, 2, 1, 0, 4, 0x03000000, 2**32 - 1]))
    kvs = draw(st.lists(gguf_kvs(), max_size=6))
    tensors = draw(st.lists(gguf_tensor_infos(), max_size=4))
    n_kv, n_tensors = draw(lie()), draw(lie())
    data = draw(st.binary(max_size=64))
    return gguf_file(kvs, tensors, data, version=version, n_kv=n_kv, n_tensors=n_tensors)


@st.composite
def mutations(draw: Any, seed: bytes) -> bytes:
    """`seed` after a few byte-level edits: flips, huge u64/u32 overwrites, cuts, deletions, repeats."""
    blob = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not blob:
            break
        pos = draw(st.integers(0, len(blob) - 1))
        op = draw(st.sampled_from(["flip", "u64", "u32", "cut", "delete", "repeat"]))
        if op == "flip":
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "u64":
            blob[pos:pos + 8] = struct.pack("<Q", draw(st.sampled_from(HUGE) | st.integers(0, 2**64 - 1)))
        elif op == "u32":
            blob[pos:pos + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        elif op == "cut":
            del blob[pos:]
        elif op == "delete":
            del blob[pos:pos + draw(st.integers(1, 64))]
        else:
            blob[pos:pos] = blob[pos:pos + draw(st.integers(1, 64))]
    return bytes(blob)


@st.composite
def huge_count_headers(draw: Any, seed: bytes) -> bytes:
    """The seed's body under a header claiming any (often huge) tensor and metadata counts."""
    n_tensors = draw(st.sampled_from(HUGE) | st.integers(0, 2**64 - 1))
    n_kv = draw(st.sampled_from(HUGE) | st.integers(0, 2**64 - 1))
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + seed[24:]


@st.composite
def deep_arrays(draw: Any) -> bytes:
    """One metadata value of arrays nested up to 5000 deep (a recursion bomb), 12 bytes per level."""
    depth = draw(st.integers(1, 5000))
    inner = draw(st.sampled_from([gguf_array(0, []), gguf_array(STRING, [gguf_string(b"")]), gguf_array(0, [b"\1"])]))
    payload = struct.pack("<IQ", ARRAY, 1) * (depth - 1) + inner
    return gguf_file([gguf_kv(b"deep", ARRAY, payload)], [])


BULK_KINDS = ("u8", "f32", "strings", "kvs", "tensors")


def bulk_headers(bulk_max: int = 2**20) -> st.SearchStrategy[bytes]:
    """Consistent but large headers (arrays up to `bulk_max` items, entries and tensors up to their
    caps): time and memory must stay bounded at the caps, not only when a count lies."""
    sizes = [n for n in (1, 1000, 2**12, 2**14, 2**15, 2**20) if n <= bulk_max]
    return st.builds(bulk_header, st.sampled_from(BULK_KINDS), st.sampled_from(sizes))


def bulk_header(kind: str, n: int) -> bytes:
    """A valid header with one `n`-entry array (u8, f32, strings), or min(n, cap) entries or tensors."""
    if kind == "u8":
        return gguf_file([gguf_kv(b"bulk", ARRAY, gguf_array(0, [], n) + bytes(n))], [])
    if kind == "f32":
        return gguf_file([gguf_kv(b"bulk", ARRAY, gguf_array(6, [], n) + bytes(4 * n))], [])
    if kind == "strings":
        return gguf_file([gguf_kv(b"tokenizer.ggml.tokens", ARRAY, gguf_array(STRING, [], n) + gguf_string(b"a") * n)], [])
    if kind == "kvs":
        return gguf_file([gguf_kv(b"k%d" % i, 0, b"\0") for i in range(min(n, MAX_KV))], [])
    n = min(n, MAX_TENSORS)
    return gguf_file([], [gguf_tensor_info(b"t%d" % i, [32], 0, 128 * i) for i in range(n)], b"\0" * 128 * n)


def gguf_inputs(seed: bytes, bulk_max: int = 2**20) -> st.SearchStrategy[bytes]:
    """Every kind of GGUF input the fuzzers feed read_local (the slow bulk headers in 1 of 50)."""
    cheap = st.one_of(
        st.binary(max_size=512).map(lambda b: b"GGUF" + b),
        mutations(seed),
        st.integers(0, len(seed)).map(lambda n: seed[:n]),
        huge_count_headers(seed),
        gguf_documents(),
        deep_arrays(),
    )
    return st.integers(1, 50).flatmap(lambda i: bulk_headers(bulk_max) if i == 1 else cheap)


# ---------------------------------------------------------------- argv strategies

ARG_VALUES = ("-1", "0", "1", "2", "4096", "q8_0", "q4_0", "f16", "on", "off", "auto", "all", "true", "none",
              "abc", "", " 7", "1e3", "0x10", "1_000", "\uff11\uff12", "-", "--", "=", "x.gguf", "9" * 5000)


def arg_values() -> st.SearchStrategy[str]:
    """A flag value: typical, edge-case, huge or arbitrary."""
    return st.one_of(st.sampled_from(ARG_VALUES), st.integers().map(str), st.text(max_size=12))


@st.composite
def option_words(draw: Any) -> list[str]:
    """One llama-server option as typed: the flag, then its value separately or as --flag=value."""
    flag = draw(st.sampled_from(sorted(_spellings())))
    takes_value = _spellings()[flag][1]
    if flag.startswith("--") and draw(st.integers(0, 3)) == 0:
        return [f"{flag}={draw(arg_values())}"]
    return [flag, draw(arg_values())] if takes_value and draw(st.integers(0, 9)) else [flag]


@st.composite
def command_lines(draw: Any) -> list[str]:
    """A plausible llama-server command line: optional program name, options in any order, usually -m."""
    words = [draw(st.sampled_from(["llama-server", "/opt/bin/llama-server", "./llama-server.exe"]))] if draw(st.booleans()) else []
    options = draw(st.lists(option_words(), max_size=8))
    if draw(st.integers(0, 4)):
        options.insert(draw(st.integers(0, len(options))), ["-m", draw(arg_values())])
    return words + [w for option in options for w in option]


def argv_inputs() -> st.SearchStrategy[list[str]]:
    """Every kind of argv the fuzzers feed parse_server_args."""
    known = sorted(_spellings())
    return st.one_of(
        command_lines(),
        command_lines(),  # listed twice: half of all examples
        st.lists(st.sampled_from(known) | arg_values(), max_size=12),
        st.lists(st.text(max_size=16), max_size=8),
    )


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Something to fuzz: its inputs, how to feed one, and how to save one for a bug report."""

    name: str
    inputs: st.SearchStrategy
    feed: Callable[[Any], str | None]  # the KvbookError message, or None; anything else escapes
    dump: Callable[[Any], bytes]
    suffix: str
    simple: Any  # a valid input, fed once to warm imports and caches before the RSS baseline


def gguf_target(model: Path, workdir: Path, bulk_max: int = 2**20) -> Target:
    """read_local on inputs seeded from `model`, written one at a time to `workdir`/fuzz.gguf."""
    path = workdir / "fuzz.gguf"

    def feed(blob: bytes) -> str | None:
        path.write_bytes(blob)
        try:
            read_local(path)
        except KvbookError as exc:
            return str(exc).replace(str(path), "<file>")
        return None

    seed = compact_seed(model)
    return Target("gguf", gguf_inputs(seed, bulk_max), feed, lambda blob: blob, ".gguf", seed)


def flags_target() -> Target:
    """parse_server_args on arbitrary and plausible argv lists."""

    def feed(argv: list[str]) -> str | None:
        try:
            parse_server_args(argv)
        except KvbookError as exc:
            return str(exc)
        return None

    return Target("flags", argv_inputs(), feed, lambda argv: json.dumps(argv).encode(), ".json", ["-m", "x.gguf"])


# ---------------------------------------------------------------- checking


class Hang(BaseException):
    """An example ran past its deadline (BaseException, so no `except Exception` swallows it)."""


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds`; it fires again every
    second, in case a callback that ignores exceptions (a gc callback, __del__) was running."""
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_mb() -> float:
    """This process's peak resident set size (since the last reset_peak_rss), in MiB."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux; elsewhere a no-op); returns it in MiB."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak_rss_mb()


def cap_address_space(extra_mb: int) -> None:
    """Let this process map at most `extra_mb` MiB more than now, so a runaway allocation fails fast."""
    vm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                 if line.startswith("VmSize:"))
    limit = (vm_kb + extra_mb * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def check(target: Target, example: Any, *, deadline_s: float = DEADLINE_S,
          rss_base_mb: float | None = None, rss_growth_mb: float = RSS_GROWTH_MIB) -> tuple[str | None, str | None]:
    """Feed one example: (KvbookError message or None, problem or None). A problem is any other
    exception, a run past `deadline_s`, or peak RSS above `rss_base_mb` + `rss_growth_mb`."""
    started = time.monotonic()
    try:
        with watchdog(deadline_s):
            message = target.feed(example)
    except Hang as exc:
        return None, f"hang: {exc}"
    except Exception as exc:  # anything but a KvbookError is the finding
        return None, f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - started
    if elapsed > deadline_s:
        return message, f"hang: took {elapsed:.1f} s (deadline {deadline_s:g} s)"
    if rss_base_mb is not None and peak_rss_mb() - rss_base_mb > rss_growth_mb:
        return message, (f"memory: peak RSS {peak_rss_mb():.0f} MiB, more than {rss_growth_mb:g} MiB "
                         f"over the {rss_base_mb:.0f} MiB at the start")
    return message, None


def save_reproducer(target: Target, example: Any, directory: Path = Path("/tmp")) -> Path:
    """Write a failing input to /tmp/kvbook-fuzz-<target>-<hash><suffix> and return the path."""
    blob = target.dump(example)
    path = directory / f"kvbook-fuzz-{target.name}-{hashlib.sha256(blob).hexdigest()[:12]}{target.suffix}"
    path.write_bytes(blob)
    return path


def normalise(message: str) -> str:
    """An error message with quoted values, flag names and numbers blanked, so messages group by kind."""
    message = re.sub(r"'[^']*'", "'…'", message)
    message = re.sub(r"(?<![\w'])--?[A-Za-z][\w-]*", "-FLAG", message)
    return re.sub(r"\d+", "N", message)[:160]


@dataclass
class FuzzStats:
    """What a fuzzing run saw."""

    examples: int = 0
    accepted: int = 0
    runs: int = 0
    messages: Counter = field(default_factory=Counter)
    slowest_s: float = 0.0
    failure: str | None = None
    failing_example: Any = None


class _Found(AssertionError):
    """Raised inside a hypothesis run so that it shrinks the failing example."""


def fuzz(target: Target, seconds: float, *, batch: int = 200, deadline_s: float = DEADLINE_S,
         rss_growth_mb: float = RSS_GROWTH_MIB, progress: Callable[[FuzzStats, float], None] | None = None) -> FuzzStats:
    """Repeated hypothesis runs of `batch` fresh random examples (no database) until `seconds` pass
    or a problem is found; the problem's example is shrunk first."""
    stats = FuzzStats()
    rss_base = reset_peak_rss()
    started = time.monotonic()

    @settings(max_examples=batch, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(target.inputs)
    def one_run(example: Any) -> None:
        t0 = time.monotonic()
        message, problem = check(target, example, deadline_s=deadline_s, rss_base_mb=rss_base, rss_growth_mb=rss_growth_mb)
        stats.slowest_s = max(stats.slowest_s, time.monotonic() - t0)
        stats.examples += 1
        if problem:
            if stats.failure is None or not problem.startswith("memory"):  # peak RSS never drops: keep the first
                stats.failure, stats.failing_example = problem, example
            raise _Found(problem)
        if message is None:
            stats.accepted += 1
        else:
            stats.messages[normalise(message)] += 1

    while time.monotonic() - started < seconds and stats.failure is None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Generating overly large repr", HypothesisWarning)
                one_run()
        except Exception:  # _Found, or hypothesis's report about it (flaky, several failures)
            if stats.failure is None:
                raise
        stats.runs += 1
        if progress:
            progress(stats, time.monotonic() - started)
    return stats


# ---------------------------------------------------------------- benchmark driver

def summary(target: Target, stats: FuzzStats, seconds: float, rss_start: float, reproducer: Path | None) -> dict:
    """A fuzzing run as the JSON written to benchmarks/results/."""
    import hypothesis

    from kvbook.model import gguf_header as ggufio
    return {
        "target": target.name,
        "seconds": round(seconds, 1),
        "examples": stats.examples,
        "examples_per_second": round(stats.examples / seconds, 1) if seconds else 0.0,
        "hypothesis_runs": stats.runs,
        "accepted": stats.accepted,
        "kvbook_errors": sum(stats.messages.values()),
        "distinct_error_kinds": len(stats.messages),
        "top_errors": stats.messages.most_common(20),
        "slowest_example_s": round(stats.slowest_s, 3),
        "deadline_s": DEADLINE_S,
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(peak_rss_mb(), 1),
        "rss_growth_mib": round(peak_rss_mb() - rss_start, 1),
        "rss_growth_bound_mib": RSS_GROWTH_MIB,
        "address_space_extra_mib": ADDRESS_SPACE_EXTRA_MIB,
        "caps": {"MAX_KV": ggufio.MAX_KV, "MAX_TENSORS": ggufio.MAX_TENSORS, "MAX_ARRAY": ggufio.MAX_ARRAY},
        "hypothesis": hypothesis.__version__,
        "result": "FAIL" if stats.failure else "PASS",
        "failure": stats.failure,
        "reproducer": str(reproducer) if reproducer else None,
    }


def print_summary(result: dict) -> None:
    """The figures of a fuzzing run, for a terminal."""
    print(f"fuzz {result['target']}: {result['examples']:,} examples in {result['seconds']:.0f} s "
          f"= {result['examples_per_second']:,.0f}/s ({result['hypothesis_runs']} hypothesis runs)")
    print(f"  accepted {result['accepted']:,}, kvbook errors {result['kvbook_errors']:,} "
          f"of {result['distinct_error_kinds']} kinds; slowest example {result['slowest_example_s']:.2f} s "
          f"(deadline {result['deadline_s']:g} s)")
    for message, count in result["top_errors"][:5]:
        print(f"  {count:>8,}  {message}")
    print(f"  peak RSS {result['rss_peak_mib']:.0f} MiB, +{result['rss_growth_mib']:.0f} MiB over the start "
          f"(bound {result['rss_growth_bound_mib']:g} MiB)")
    if result["failure"]:
        print(f"  failure: {result['failure']}\n  reproducer: {result['reproducer']}")
    print(f"fuzz {result['target']}: {result['result']}")


def bench_main(make_target: Callable[[Path], Target], out: Path, argv: list[str] | None = None) -> int:
    """`--minutes N` (default 10) of fuzzing one target; prints figures, writes `out`, exits 1 on FAIL."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvbook-fuzz-") as tmp:
        target = make_target(Path(tmp))
        target.feed(target.simple)
        cap_address_space(ADDRESS_SPACE_EXTRA_MIB)
        rss_start = reset_peak_rss()
        started = time.monotonic()
        stats = fuzz(target, args.minutes * 60, batch=args.batch, deadline_s=DEADLINE_S,
                     rss_growth_mb=RSS_GROWTH_MIB, progress=_progress_printer(args.minutes * 60))
        seconds = time.monotonic() - started
    reproducer = save_reproducer(target, stats.failing_example) if stats.failure else None
    result = summary(target, stats, seconds, rss_start, reproducer)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result)
    return 1 if stats.failure else 0


def _progress_printer(total_s: float) -> Callable[[FuzzStats, float], None]:
    """A progress callback that prints one line about every 30 s."""
    last = [0.0]

    def progress(stats: FuzzStats, elapsed: float) -> None:
        if elapsed - last[0] >= 30 or elapsed >= total_s:
            last[0] = elapsed
            print(f"  {elapsed:6.0f} s  {stats.examples:>9,} examples  {stats.examples / elapsed:7,.0f}/s  "
                  f"peak RSS {peak_rss_mb():.0f} MiB", flush=True)

    return progress
