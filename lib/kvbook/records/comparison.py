"""A fair comparison of smoke runs from results.jsonl: pass rates with confidence intervals, latency
and token-rate spreads, plan vs measured memory, and which differences are larger than the noise.

Pure functions over record dicts; the compare notebook and its tests call these."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbook.errors import BadInput
from kvbook.records.store import CheckRecord

TOOL_CHECKS = ("forced_tool_call", "auto_tool_call", "stream_tool_call")
# The like-for-like latency reference: a plain streamed paragraph, same prompt on every route.
SPEED_CHECK = "stream_text"
Z95 = 1.959963984540054
BOOTSTRAP_REPS = 4000


@dataclass(frozen=True)
class Rate:
    """passed/total with a 95% Wilson score interval (sound at 0%, 100% and small n)."""

    passed: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.passed / self.total if self.total else float("nan")


@dataclass(frozen=True)
class Spread:
    """A sample's median, 10th/90th percentiles, and a 95% bootstrap interval of the median."""

    n: int
    median: float
    p10: float
    p90: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference:
    """b minus a for one metric, its 95% interval, and whether the interval excludes zero."""

    metric: str
    a: str
    b: str
    value_a: float
    value_b: float
    delta: float
    low: float
    high: float
    unit: str

    @property
    def beyond_noise(self) -> bool:
        return not (self.low <= 0.0 <= self.high) and not math.isnan(self.low)


@dataclass(frozen=True)
class Contender:
    """One model + setting: every number the comparison shows for it."""

    label: str
    model: str
    runs: int
    repeats: int
    required: Rate
    tool_calls: Rate
    per_check: dict[str, Rate]
    first_text_ms: Spread | None
    tokens_per_s: Spread | None
    repeat_cv_pct: float | None  # spread of per-repeat median first-text times: the run-to-run noise
    plan_total_mib: float | None
    plan_kv_mib: float | None
    measured_kv_mib: float | None
    plan_matches: bool | None


def wilson(passed: int, total: int, z: float = Z95) -> Rate:
    if total <= 0:
        return Rate(passed, total, float("nan"), float("nan"))
    p = passed / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return Rate(passed, total, max(0.0, centre - half), min(1.0, centre + half))


def rate_difference(a: Rate, b: Rate) -> tuple[float, float, float]:
    """b - a with Newcombe's hybrid score interval (built from the two Wilson intervals)."""
    if not a.total or not b.total:
        return float("nan"), float("nan"), float("nan")
    d = b.value - a.value
    low = d - math.sqrt((b.value - b.low) ** 2 + (a.high - a.value) ** 2)
    high = d + math.sqrt((b.high - b.value) ** 2 + (a.value - a.low) ** 2)
    return d, max(-1.0, low), min(1.0, high)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def spread(values: Sequence[float], seed: int = 0) -> Spread | None:
    xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if xs.size == 0:
        return None
    boot = np.median(_rng(seed).choice(xs, size=(BOOTSTRAP_REPS, xs.size), replace=True), axis=1)
    return Spread(int(xs.size), float(np.median(xs)), float(np.percentile(xs, 10)), float(np.percentile(xs, 90)),
                  float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))


def median_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """median(b) - median(a) with a 95% percentile-bootstrap interval (deterministic for a seed)."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.size == 0 or xb.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = _rng(seed)
    ma = np.median(rng.choice(xa, size=(BOOTSTRAP_REPS, xa.size), replace=True), axis=1)
    mb = np.median(rng.choice(xb, size=(BOOTSTRAP_REPS, xb.size), replace=True), axis=1)
    diffs = mb - ma
    return (float(np.median(xb) - np.median(xa)), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)))


def select(records: Iterable[CheckRecord], *, run_ids: Sequence[str] = (), labels: Sequence[str] = ()) -> list[CheckRecord]:
    """Check records of the given runs and/or labels (all of them when both are empty)."""
    out = list(records)
    if run_ids:
        out = [r for r in out if r.run_id in set(run_ids)]
    if labels:
        out = [r for r in out if r.label in set(labels)]
    return out


def _timing(records: Iterable[CheckRecord], key: str, scale: float = 1.0) -> list[float]:
    values = [r.timing(key) for r in records]
    return [v * scale for v in values if v is not None and math.isfinite(v)]


def _mib(n: Any) -> float | None:
    return round(n / 2**20, 2) if isinstance(n, (int, float)) else None


def summarize(records: Sequence[CheckRecord], label: str) -> Contender:
    mine = [r for r in records if r.label == label]
    if not mine:
        raise BadInput(f"no smoke records for '{label}' in the results")
    required = [r for r in mine if r.required]
    tools = [r for r in mine if r.check in TOOL_CHECKS]
    per_check = {c: wilson(sum(r.passed for r in mine if r.check == c), sum(1 for r in mine if r.check == c))
                 for c in dict.fromkeys(r.check for r in mine)}
    speed = [r for r in mine if r.check == SPEED_CHECK and r.passed]
    by_repeat: dict[tuple[str, int], list[float]] = {}
    for r in speed:
        v = r.timing("first_text_s")
        if v is not None:
            by_repeat.setdefault((r.run_id, r.repeat), []).append(v)
    medians = [float(np.median(v)) for v in by_repeat.values()]
    cv = (100 * float(np.std(medians, ddof=1)) / float(np.mean(medians))) if len(medians) >= 2 and np.mean(medians) else None
    first = mine[0]
    plan, measured = first.extra.get("plan") or {}, first.extra.get("measured") or {}
    caches = measured.get("caches_mib") or []
    return Contender(
        label=label,
        model=first.model_name,
        runs=len({r.run_id for r in mine}),
        repeats=len({(r.run_id, r.repeat) for r in mine}),
        required=wilson(sum(r.passed for r in required), len(required)),
        tool_calls=wilson(sum(r.passed for r in tools), len(tools)),
        per_check=per_check,
        first_text_ms=spread(_timing(speed, "first_text_s", 1000.0)),
        tokens_per_s=spread(_timing(speed, "tokens_per_s")),
        repeat_cv_pct=round(cv, 1) if cv is not None else None,
        plan_total_mib=_mib(plan.get("total_bytes")),
        plan_kv_mib=_mib(plan.get("kv_bytes")),
        measured_kv_mib=round(sum(caches), 2) if caches else None,
        plan_matches=first.extra.get("plan_matches") if isinstance(first.extra.get("plan_matches"), bool) else None,
    )


def differences(records: Sequence[CheckRecord], a: str, b: str) -> list[Difference]:
    """Every headline metric of b against a (the baseline)."""
    ca, cb = summarize(records, a), summarize(records, b)
    out = []
    for metric, ra, rb in (("required checks pass rate", ca.required, cb.required),
                           ("tool-call pass rate", ca.tool_calls, cb.tool_calls)):
        d, lo, hi = rate_difference(ra, rb)
        out.append(Difference(metric, a, b, 100 * ra.value, 100 * rb.value, 100 * d, 100 * lo, 100 * hi, "points"))

    def pick(label: str) -> list[CheckRecord]:
        return [r for r in records if r.label == label and r.check == SPEED_CHECK and r.passed]

    for metric, key, scale, unit in (("time to first text (median)", "first_text_s", 1000.0, "ms"),
                                     ("tokens/s (median)", "tokens_per_s", 1.0, "tok/s")):
        xa, xb = _timing(pick(a), key, scale), _timing(pick(b), key, scale)
        d, lo, hi = median_difference(xa, xb)
        va = float(np.median(xa)) if xa else float("nan")
        vb = float(np.median(xb)) if xb else float("nan")
        out.append(Difference(metric, a, b, va, vb, d, lo, hi, unit))
    return out


def _fmt(x: float, unit: str) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:+.0f} {unit}" if unit in ("points", "ms") else f"{x:+.1f} {unit}"


def verdict(diffs: Sequence[Difference], min_samples: int = 5, samples: dict[str, int] | None = None) -> list[str]:
    """Plain sentences: what differs beyond the noise, what does not, and whether there was enough data."""
    lines = []
    if diffs:
        a, b = diffs[0].a, diffs[0].b
        big = [d for d in diffs if d.beyond_noise]
        small = [d for d in diffs if not d.beyond_noise and not math.isnan(d.delta)]
        for d in big:
            better = _better(d)
            lines.append(f"{d.metric}: {b} {_fmt(d.delta, d.unit)} against {a} (95% interval {_fmt(d.low, d.unit)} to "
                         f"{_fmt(d.high, d.unit)}), larger than the noise; {better} is better here.")
        if small:
            lines.append("Within the noise (the 95% interval includes no difference): "
                         + "; ".join(f"{d.metric} ({_fmt(d.delta, d.unit)}, {_fmt(d.low, d.unit)} to {_fmt(d.high, d.unit)})"
                                     for d in small) + ".")
        missing = [d.metric for d in diffs if math.isnan(d.delta)]
        if missing:
            lines.append("Not comparable (no samples on one side): " + ", ".join(missing) + ".")
        if not big:
            lines.append(f"Verdict: no difference between {a} and {b} is larger than the noise of these runs.")
        else:
            wins = {d.a: 0, d.b: 0}
            for d in big:
                wins[_better(d)] += 1
            if wins[a] and wins[b]:
                lines.append(f"Verdict: a trade-off; {a} wins {wins[a]} metric(s), {b} wins {wins[b]} beyond the noise.")
            else:
                winner = a if wins[a] else b
                lines.append(f"Verdict: {winner} is better on {max(wins.values())} metric(s) beyond the noise and worse on none.")
    for label, n in (samples or {}).items():
        if n < min_samples:
            lines.append(f"Caution: only {n} repetition(s) for {label}; fewer than {min_samples} gives wide intervals.")
    return lines


def _better(d: Difference) -> str:
    """Higher is better except for latency."""
    lower_is_better = d.unit == "ms"
    b_higher = d.delta > 0
    return d.a if (b_higher == lower_is_better) else d.b


def contender_rows(contenders: Sequence[Contender]) -> list[dict[str, Any]]:
    """One display row per contender."""
    def rate(r: Rate) -> str:
        return f"{r.passed}/{r.total} = {100 * r.value:.0f}% [{100 * r.low:.0f}, {100 * r.high:.0f}]" if r.total else "n/a"

    def spread_text(s: Spread | None, digits: int) -> str:
        return (f"{s.median:.{digits}f} [{s.low:.{digits}f}, {s.high:.{digits}f}] (p10 {s.p10:.{digits}f}, "
                f"p90 {s.p90:.{digits}f}, n={s.n})") if s else "n/a"

    return [{"contender": c.label, "model": c.model, "repetitions": c.repeats,
             "required checks (95% CI)": rate(c.required), "tool calls (95% CI)": rate(c.tool_calls),
             "first text ms, median [95% CI]": spread_text(c.first_text_ms, 0),
             "tokens/s, median [95% CI]": spread_text(c.tokens_per_s, 1),
             "run-to-run CV %": c.repeat_cv_pct} for c in contenders]


def memory_rows(contenders: Sequence[Contender]) -> list[dict[str, Any]]:
    return [{"contender": c.label, "planned total MiB": c.plan_total_mib, "planned KV MiB": c.plan_kv_mib,
             "measured KV MiB": c.measured_kv_mib, "caches match the plan": c.plan_matches} for c in contenders]


def difference_rows(diffs: Sequence[Difference]) -> list[dict[str, Any]]:
    return [{"model": d.b, "metric": d.metric, "baseline": round(d.value_a, 1), "this model": round(d.value_b, 1),
             "difference": _fmt(d.delta, d.unit), "95% interval": f"{_fmt(d.low, d.unit)} to {_fmt(d.high, d.unit)}",
             "beyond noise": d.beyond_noise} for d in diffs]
