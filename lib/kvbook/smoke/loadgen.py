"""Sustained load: N concurrent smoke clients against one route for a fixed time, every result
appended to results.jsonl as it lands, so a test can prove nothing is lost or torn under load."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import BadInput, ServerError
from kvbook.interface import to_dict
from kvbook.records.store import CheckRecord, append_checks
from kvbook.smoke.checks import CheckResult, SmokeConfig, Target, check_count_tokens, check_forced_tool, check_stream_text

MAX_CLIENTS = 16
# A short rotation of the suite's checks: a forced tool call, a streamed answer, a token count.
ROTATION: tuple[tuple[str, Callable[[Target, SmokeConfig], CheckResult]], ...] = (
    ("forced_tool_call", check_forced_tool), ("stream_text", check_stream_text), ("count_tokens", check_count_tokens))


@dataclass(frozen=True)
class LoadResult:
    """What the clients did and what they wrote."""

    clients: int
    duration_s: float
    requests: int
    passed: int
    written: int
    per_client: tuple[int, ...]
    failures: tuple[str, ...]  # distinct failure reasons, first few
    client_errors: int  # checks that raised instead of returning a result (recorded as failures)
    p50_ms: float | None
    p95_ms: float | None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(target: Target, results_path: Path, *, clients: int = 4, duration_s: float = 60.0,
             cfg: SmokeConfig = SmokeConfig(max_tokens=32, text_tokens=32, timeout_s=60.0),
             run_id: str = "load", label: str = "") -> LoadResult:
    """Run `clients` threads for `duration_s`; each appends one record per check (own fd, flock)."""
    if not 1 <= clients <= MAX_CLIENTS:
        raise BadInput(f"clients must be 1..{MAX_CLIENTS}, got {clients}")
    if not 0 < duration_s <= 3600:
        raise BadInput(f"duration must be in (0, 3600] seconds, got {duration_s}")
    deadline = time.monotonic() + duration_s
    lock = threading.Lock()
    counts = [0] * clients
    written = [0] * clients
    passed = [0] * clients
    latencies: list[float] = []
    failures: dict[str, int] = {}
    crashes = [0]

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            name, check = ROTATION[(i + n) % len(ROTATION)]
            try:
                result = check(target, cfg)
            except Exception as exc:  # a client must keep going and say what happened
                result = CheckResult(name, target.route, False, True,
                                     f"client error: {type(exc).__name__}: {str(exc)[:160]}")
                with lock:
                    crashes[0] += 1
            n += 1
            written[i] += append_checks(results_path, [CheckRecord(
                run_id=run_id, check=result.check, route=result.route, passed=result.passed, required=result.required,
                reason=result.reason, time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                label=label, timings=to_dict(result.timings), extra={"client": i, "seq": n})])
            counts[i] = n
            passed[i] += result.passed
            with lock:
                if result.timings.total_s is not None:
                    latencies.append(1000 * result.timings.total_s)
                if not result.passed:
                    failures[result.reason] = failures.get(result.reason, 0) + 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), name=f"kvbook-load-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + cfg.timeout_s + 30)  # bounded: a request in flight at the deadline has its timeout
    if any(t.is_alive() for t in threads):
        raise ServerError(f"a load client did not stop within {cfg.timeout_s:.0f} s of the deadline")
    top = sorted(failures.items(), key=lambda kv: -kv[1])[:5]
    return LoadResult(clients=clients, duration_s=round(time.monotonic() - started, 2), requests=sum(counts),
                      passed=sum(passed), written=sum(written), per_client=tuple(counts),
                      failures=tuple(f"{n}x {reason}" for reason, n in top), client_errors=crashes[0],
                      p50_ms=_percentile(latencies, 0.5), p95_ms=_percentile(latencies, 0.95))
