"""Service-level objectives over measured requests, and the search for the largest concurrency that meets one.

A level passes when at least `attainment` of its requests meet every target (TTFT, inter-token latency,
end-to-end) and none failed. Concurrency, not request rate, is swept: above capacity a fixed rate only
builds a queue. The search doubles from 1 until a level fails, then bisects between the last pass and the
first failure, measuring each level once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbook.capacity.stats import Quantile, quantile_ci
from kvbook.errors import BadInput


@dataclass(frozen=True)
class Slo:
    """Targets in milliseconds (None: no target) and the share of requests that must meet all of them."""

    ttft_ms: float | None = 2000.0
    itl_ms: float | None = 200.0
    e2e_ms: float | None = None
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.attainment <= 1:
            raise BadInput(f"SLO attainment must be in (0, 1], got {self.attainment}")
        for name in ("ttft_ms", "itl_ms", "e2e_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadInput(f"SLO {name} must be positive, got {value}")
        if self.ttft_ms is None and self.itl_ms is None and self.e2e_ms is None:
            raise BadInput("an SLO needs at least one target (ttft_ms, itl_ms or e2e_ms)")


@dataclass(frozen=True)
class RequestSample:
    """One measured request: times in ms from sending it; itl_ms is its mean gap between streamed tokens."""

    ttft_ms: float | None
    itl_ms: float | None
    e2e_ms: float | None
    output_tokens: int
    ok: bool
    error: str = ""

    def meets(self, slo: Slo) -> bool:
        if not self.ok:
            return False
        for got, want in ((self.ttft_ms, slo.ttft_ms), (self.itl_ms, slo.itl_ms), (self.e2e_ms, slo.e2e_ms)):
            if want is not None and (got is None or got > want):
                return False
        return True


@dataclass(frozen=True)
class LevelResult:
    """What one concurrency level measured, summarised against the SLO."""

    concurrency: int
    requests: int
    failed: int
    wall_s: float
    output_tokens: int
    ttft: tuple[Quantile, ...]  # p50, p90, p95, p99
    itl: tuple[Quantile, ...]
    e2e: tuple[Quantile, ...]
    attained: float  # share of requests meeting the SLO
    goodput_rps: float  # requests meeting the SLO per second of wall time
    meets_slo: bool

    def p(self, metric: str, q: float) -> float | None:
        return next((x.value for x in getattr(self, metric) if x.q == q), None)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


QUANTILES = (0.5, 0.9, 0.95, 0.99)


def summarize_level(concurrency: int, samples: Sequence[RequestSample], wall_s: float, slo: Slo) -> LevelResult:
    ok = [s for s in samples if s.ok]

    def qs(metric: str) -> tuple[Quantile, ...]:
        values = [v for v in (getattr(s, metric) for s in ok) if v is not None]
        return tuple(quantile_ci(values, q) for q in QUANTILES)

    good = sum(s.meets(slo) for s in samples)
    attained = good / len(samples) if samples else 0.0
    failed = len(samples) - len(ok)
    return LevelResult(concurrency=concurrency, requests=len(samples), failed=failed, wall_s=wall_s,
                       output_tokens=sum(s.output_tokens for s in ok), ttft=qs("ttft_ms"), itl=qs("itl_ms"),
                       e2e=qs("e2e_ms"), attained=attained, goodput_rps=good / wall_s if wall_s > 0 else 0.0,
                       meets_slo=bool(samples) and failed == 0 and attained >= slo.attainment)


@dataclass(frozen=True)
class SearchResult:
    """Every level measured (in the order measured) and the largest concurrency that met the SLO (0: none)."""

    levels: tuple[LevelResult, ...]
    max_concurrency_meeting_slo: int
    capped: bool  # the search stopped at max_concurrency while still passing


def search_max_concurrency(measure: Callable[[int], LevelResult], max_concurrency: int) -> SearchResult:
    """Double from 1 until a level fails (or max_concurrency), then bisect between the last pass and the failure."""
    if max_concurrency < 1:
        raise BadInput(f"max concurrency must be >= 1, got {max_concurrency}")
    seen: dict[int, LevelResult] = {}

    def probe(c: int) -> bool:
        if c not in seen:
            seen[c] = measure(c)
        return seen[c].meets_slo

    good, bad, c = 0, None, 1
    while c <= max_concurrency:
        if probe(c):
            good = c
            if c == max_concurrency:
                break
            c = min(2 * c, max_concurrency)
        else:
            bad = c
            break
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if probe(mid):
                good = mid
            else:
                bad = mid
    return SearchResult(levels=tuple(seen.values()), max_concurrency_meeting_slo=good,
                        capped=bad is None and good == max_concurrency)
