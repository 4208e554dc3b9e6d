"""Trends across runs: one point per run summary (tokens/s, TTFT, pass rate, goodput; model and llama.cpp build),
charts for outputs/index.html, and a regression gate that compares a run with the earlier runs of its label."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# metric -> (label, higher is better)
METRICS = {"tokens_per_s": ("output tokens/s", True), "ttft_ms": ("time to first token, ms", False),
           "pass_rate": ("required checks passed", True), "goodput_rps": ("goodput, req/s under the SLO", True)}
NOISE_FLOOR = 0.10  # never call a change under 10% a regression, whatever the history's spread
HISTORY = 5  # earlier runs of the same label and model that make the baseline


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def trend_point(summary: Mapping[str, Any], run: str, date: str) -> dict[str, Any] | None:
    """The figures a run contributes to the trends (None for a run that measured none)."""
    if not summary.get("ok", True) or summary.get("error"):
        return None
    kind = summary.get("kind")
    point: dict[str, Any] = {"run": run, "date": date, "label": summary.get("label") or summary.get("notebook", ""),
                             "model": str(summary.get("model") or ""), "kind": kind}
    if kind == "smoke":
        point["build"] = (summary.get("versions") or {}).get("llama_server", "")
        total = summary.get("required_total") or 0
        point["pass_rate"] = summary.get("required_passed", 0) / total if total else None
        rows = [r for r in summary.get("checks") or [] if r.get("route") == "direct" and r.get("check") == "stream_text"]
        point["tokens_per_s"] = _median([r["tok/s"] for r in rows if r.get("tok/s")])
        point["ttft_ms"] = _median([r["first text ms"] for r in rows if r.get("first text ms")])
    elif kind == "capacity":
        trend = summary.get("trend") or {}
        point["build"] = summary.get("llama_build", "")
        point.update({k: trend.get(k) for k in ("goodput_rps", "tokens_per_s")})
        point["ttft_ms"] = trend.get("ttft_p50_ms")
    else:
        return None
    return point


@dataclass(frozen=True)
class Regression:
    metric: str
    current: float
    baseline: float
    change: float  # relative, signed so that negative is worse
    allowed: float  # the noise band (relative)


def regressions(history: Sequence[Mapping[str, Any]], current: Mapping[str, Any]) -> tuple[list[Regression], str]:
    """Metrics of `current` worse than the median of the last HISTORY comparable runs by more than the noise
    (max of NOISE_FLOOR and 3 x the history's median absolute deviation, relative). Needs >= 2 earlier runs."""
    same = [h for h in history if h.get("label") == current.get("label") and h.get("model") == current.get("model")
            and h.get("run") != current.get("run") and h.get("date", "") <= current.get("date", "")]
    same = sorted(same, key=lambda h: h.get("date", ""))[-HISTORY:]
    if len(same) < 2:
        return [], f"no regression gate yet: {len(same)} earlier run(s) of this label and model (2 needed)"
    found = []
    for metric, (_, higher_better) in METRICS.items():
        now = current.get(metric)
        past = [h[metric] for h in same if isinstance(h.get(metric), (int, float))]
        if not isinstance(now, (int, float)) or len(past) < 2:
            continue
        base = statistics.median(past)
        if base == 0:
            continue
        mad = statistics.median([abs(v - base) for v in past]) / abs(base)
        allowed = max(NOISE_FLOOR, 3 * mad)
        change = (now - base) / abs(base) * (1 if higher_better else -1)
        if change < -allowed:
            found.append(Regression(metric, now, base, change, allowed))
    return found, f"compared with {len(same)} earlier run(s) of this label and model"


def trends_figure(points: Sequence[Mapping[str, Any]]) -> Any:
    """Four panels over time, one line per label and model; the hover names the llama.cpp build."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[label for label, _ in METRICS.values()])
    series = sorted({(p["label"], p["model"]) for p in points})
    for i, metric in enumerate(METRICS):
        row, col = divmod(i, 2)
        for label, model in series:
            picked = sorted((p for p in points if (p["label"], p["model"]) == (label, model)
                             and isinstance(p.get(metric), (int, float))), key=lambda p: p["date"])
            if not picked:
                continue
            fig.add_trace(go.Scatter(x=[p["date"] for p in picked], y=[p[metric] for p in picked], mode="lines+markers",
                                     name=f"{label} · {model}", legendgroup=f"{label}{model}", showlegend=i == 0 or None,
                                     text=[f"build {p.get('build') or '?'}<br>{p['run']}" for p in picked]),
                          row=row + 1, col=col + 1)
    fig.update_layout(height=620, title="Trends per label and model (hover: llama.cpp build and run)")
    return fig
