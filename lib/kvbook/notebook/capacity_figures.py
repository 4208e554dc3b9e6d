"""Plotly figures for notebook 05-capacity, from the plain rows kvbook.notebook.capacity returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

def agent_axis(counts: Sequence[Any]) -> dict[str, Any]:
    """An x axis of agent counts: a tick at each measured count, whole numbers only (no 1.5 agents)."""
    ticks = sorted({int(c) for c in counts})
    return {"title": "concurrent agents", "tickmode": "array", "tickvals": ticks, "ticktext": [str(t) for t in ticks]}


CAUSE_COLORS = {"": "#1a7f37", "attribution_header": "#c62828", "reminder_position": "#ef6c00",
                "context_shift": "#6a1b9a", "swa_checkpoint": "#1565c0", "slot_evicted": "#795548", "unknown": "#616161"}


def latency_figure(levels: Sequence[Mapping[str, Any]], slo: Mapping[str, Any]) -> Any:
    """p50 and p95 (with its interval) of TTFT and end-to-end latency against concurrency, SLO lines dashed."""
    import plotly.graph_objects as go

    fig = go.Figure()
    xs = [r["concurrency"] for r in levels]
    for metric, color in (("ttft", "#4c72b0"), ("e2e", "#dd8452")):
        fig.add_trace(go.Scatter(x=xs, y=[r[f"{metric}_p50_ms"] for r in levels], name=f"{metric} p50",
                                 mode="lines+markers", line={"color": color, "dash": "dot"}))
        ci = [r.get(f"{metric}_p95_ci_ms") or [None, None] for r in levels]
        p95 = [r[f"{metric}_p95_ms"] for r in levels]
        fig.add_trace(go.Scatter(
            x=xs, y=p95, name=f"{metric} p95", mode="lines+markers", line={"color": color},
            error_y={"type": "data", "symmetric": False,
                     "array": [(hi - v) if hi is not None and v is not None else 0 for (lo, hi), v in zip(ci, p95)],
                     "arrayminus": [(v - lo) if lo is not None and v is not None else 0 for (lo, hi), v in zip(ci, p95)]}))
        target = slo.get(f"{metric}_ms")
        if target:
            fig.add_hline(y=target, line={"color": color, "dash": "dash"}, annotation_text=f"SLO {metric} {target:.0f} ms")
    fig.update_layout(title="Latency against concurrency (p95 bars: 95% order-statistic interval)",
                      xaxis=agent_axis(xs), yaxis_title="ms", yaxis_type="log", height=420)
    return fig


def goodput_figure(levels: Sequence[Mapping[str, Any]], best: int) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Bar(x=[r["concurrency"] for r in levels], y=[r["goodput_rps"] for r in levels],
                         marker_color=["#1a7f37" if r["meets_slo"] else "#c62828" for r in levels],
                         text=["meets" if r["meets_slo"] else "misses" for r in levels], name="goodput"))
    fig.add_trace(go.Scatter(x=[r["concurrency"] for r in levels], y=[r["tokens_per_s"] for r in levels],
                             name="output tokens/s", yaxis="y2", mode="lines+markers"))
    fig.update_layout(title=f"Goodput under the SLO (largest concurrency meeting it: {best})",
                      xaxis=agent_axis([r["concurrency"] for r in levels]), yaxis_title="requests/s meeting the SLO",
                      yaxis2={"overlaying": "y", "side": "right", "title": "tokens/s"}, height=400)
    return fig


def cache_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Hit ratio per turn, one point per request, coloured by miss cause (green: hit)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for cause in dict.fromkeys(r["miss_cause"] for r in rows):
        picked = [r for r in rows if r["miss_cause"] == cause]
        fig.add_trace(go.Scatter(x=[f"{r['session']} t{r['turn']}" for r in picked], y=[r["hit_ratio"] for r in picked],
                                 mode="markers", marker={"size": 10, "color": CAUSE_COLORS.get(cause, "#999")},
                                 name=cause or "hit"))
    fig.update_layout(title="Prefix cache: cache_n / prompt_n per turn, coloured by miss cause",
                      yaxis={"range": [0, 1.05], "title": "share of the prompt reused"}, height=420)
    return fig


def speed_figure(points: Sequence[Mapping[str, Any]]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("prefill tokens/s", "decode tokens/s"))
    depths = [p["depth"] for p in points]
    for col, kind in ((1, "prefill"), (2, "decode")):
        fig.add_trace(go.Scatter(x=depths, y=[p[f"{kind}_tps_measured"] for p in points], mode="markers",
                                 marker={"size": 10, "symbol": ["circle-open" if p["held_out"] else "circle" for p in points]},
                                 name=f"{kind} measured (open: held out)"), row=1, col=col)
        fig.add_trace(go.Scatter(x=depths, y=[p[f"{kind}_tps_predicted"] for p in points], mode="lines",
                                 name=f"{kind} predicted"), row=1, col=col)
    fig.update_xaxes(title_text="context depth (tokens)")
    fig.update_layout(title="Speed model: predicted against measured (llama-bench -d)", height=380)
    return fig


def scale_out_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for n in sorted({r["servers"] for r in rows}):
        picked = [r for r in rows if r["servers"] == n]
        fig.add_trace(go.Scatter(x=[r["concurrency"] for r in picked], y=[r["goodput_rps"] for r in picked],
                                 mode="lines+markers", name=f"{n} server(s) behind LiteLLM"))
    fig.update_layout(title="Scale-out: goodput with one and with several llama-servers in one LiteLLM group",
                      xaxis=agent_axis([r["concurrency"] for r in rows]), yaxis_title="requests/s meeting the SLO",
                      height=380)
    return fig
