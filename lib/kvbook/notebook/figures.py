"""Plotly figures for the sizing notebook, built from kvbook's records (Plan, MemoryPlan, SweepResult).

Each figure has a builder (`*_figure`) and an in-place updater (`apply_*`). The builder creates the
traces and calls the updater, so a notebook's static figure and a live go.FigureWidget show the same
data; the widgets call the updater inside `fig.batch_update()`. Sizes are plotted in GiB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvbook.interface import GiB, MemoryPlan, Plan
from kvbook.memory.sweep import SweepResult, largest_fitting_ctx

# (key, legend label, colour) in stacking order, bottom first
COMPONENTS: tuple[tuple[str, str, str], ...] = (
    ("weights", "weights", "#4c72b0"),
    ("kv", "KV cache", "#dd8452"),
    ("recurrent", "recurrent state", "#55a868"),
    ("compute", "compute buffer", "#c44e52"),
    ("output", "output (logits)", "#8172b3"),
    ("host_extras", "host growth: prompt cache + checkpoints", "#b8b8b8"),
)
TYPE_COLORS = {
    "f32": "#1f77b4", "f16": "#ff7f0e", "bf16": "#bcbd22", "q8_0": "#2ca02c", "q5_1": "#17becf",
    "q5_0": "#9467bd", "q4_1": "#8c564b", "iq4_nl": "#e377c2", "q4_0": "#d62728",
}
LEGEND_ONLY = ("q4_1", "iq4_nl", "q5_0", "q5_1")  # drawn but hidden until clicked in the legend
CURVE_POINTS = 240  # points per memory-vs-context curve (log-spaced picks from the sweep grid)

Bar = tuple[str, Mapping[str, float]]


_QUIET_WIDGET: Any = None


def figure_widget() -> Any:
    """A plotly FigureWidget that takes no part in plotly's browser-to-kernel echo after each redraw.

    After every update the browser diffs its full figure against the widget's and sends the trace defaults back
    (~12 KB a figure); the stock widget applies them, echoes them back to the browser and resets them, three
    messages and ~40-70 ms of kernel time per redraw on a loaded 2-core machine, in the way of the next control
    change. The sizing panel never reads plotly's computed defaults, so they are received and dropped; their arrival
    tells the kernel the browser has drawn the figure (`on_drawn`)."""
    global _QUIET_WIDGET
    if _QUIET_WIDGET is None:
        import plotly.graph_objects as go
        from plotly.serializers import custom_serializers
        from traitlets import Dict, observe

        class QuietFigureWidget(go.FigureWidget):
            _js2py_traceDeltas = Dict(allow_none=True).tag(sync=True, echo_update=False, **custom_serializers)

            on_drawn: Any = None  # called when the browser reports it drew the newest edit

            @observe("_js2py_traceDeltas")
            def _handler_js2py_traceDeltas(self, change: Any) -> None:
                if change["new"] and change["new"].get("trace_edit_id") == self._last_trace_edit_id:
                    self._trace_edit_in_process = False  # the browser drew the newest edit
                    if self.on_drawn is not None:
                        self.on_drawn()

        _QUIET_WIDGET = QuietFigureWidget
    return _QUIET_WIDGET()


def setup_renderer() -> None:
    """Once per kernel: plotly_mimetype+notebook, so JupyterLab renders and exported HTML embeds plotly.js."""
    from kvbook.notebook.html import setup_plotly

    setup_plotly()


def ctx_label(n: int) -> str:
    """65536 -> '64K', 1048576 -> '1M'."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return f"{n:,}"


def _in_gib(n: float) -> float:
    return float(n) / GiB


# ---------------------------------------------------------------- (a) stacked bar against the budget


def memory_parts(memory: MemoryPlan) -> dict[str, int]:
    """One plan's bytes per component, keys as in COMPONENTS."""
    return {
        "weights": memory.weights_bytes,
        "kv": memory.kv_bytes,
        "recurrent": memory.recurrent_bytes,
        "compute": memory.compute.bytes,
        "output": memory.output_bytes,
        "host_extras": memory.host_extras.bytes,
    }


def _budget_pool(plan: Plan):
    return plan.device.pools[0] if plan.device.unified else plan.device.main_pool


def plan_budget(plan: Plan) -> int:
    """The budget of the pool that holds weights and KV (Metal's working set on a Mac, the GPU's on a discrete one)."""
    return _budget_pool(plan).budget_bytes


def plan_parts(plan: Plan) -> dict[str, int]:
    """What the budget pool itself holds, by component: a GPU's bar never carries host growth (the prompt cache and
    checkpoints are CPU memory, on Apple too), a CPU-only or one-pool plan's bar carries everything."""
    use = next((u for u in plan.pools if u.pool == _budget_pool(plan).name), None)
    if use is None or (len(plan.pools) == 1 and not use.includes):
        return memory_parts(plan.memory)
    return {"weights": use.weights_bytes, "kv": use.kv_bytes, "recurrent": use.recurrent_bytes,
            "compute": use.compute_bytes, "output": use.output_bytes, "host_extras": use.host_extras_bytes}


def ram_parts(plan: Plan) -> dict[str, int]:
    """Apple's RAM pool by component: its own bytes and the Metal pool's it covers (the plan's figures, so the compute
    is the Metal backend's two buffers, not the one CPU-derived estimate of the memory plan)."""
    ram = next(u for u in plan.pools if u.includes)
    inside = [ram, *(u for u in plan.pools if u.pool in ram.includes)]
    return {"weights": sum(u.weights_bytes for u in inside), "kv": sum(u.kv_bytes for u in inside),
            "recurrent": sum(u.recurrent_bytes for u in inside), "compute": sum(u.compute_bytes for u in inside),
            "output": sum(u.output_bytes for u in inside), "host_extras": sum(u.host_extras_bytes for u in inside)}


def ram_line(plan: Plan) -> list[tuple[str, float]]:
    """Apple's second limit (RAM less what macOS keeps) as a reference line; none elsewhere."""
    ram = next((u for u in plan.pools if u.includes), None)
    return [(f"RAM limit {_in_gib(ram.budget_bytes):.2f} GiB (all of it)", ram.budget_bytes)] if ram else []


def plan_title(plan: Plan) -> str:
    mem = plan.memory
    return (f"-c {mem.shape.n_ctx:,}: {plan.verdict.value}<br><sup>{_in_gib(mem.start_bytes):.2f} GiB at start, "
            f"{_in_gib(mem.total_bytes):.2f} GiB with run-time growth, budget {_in_gib(plan_budget(plan)):.2f} GiB</sup>")


def breakdown_figure(bars: Plan | Sequence[Bar], budget_bytes: int | None = None, *, title: str | None = None,
                     extra_lines: Sequence[tuple[str, float]] = (), widget: bool = False) -> Any:
    """Stacked bars (weights, KV, recurrent, compute, output, host growth) with the budget as a line.

    `bars` is a Plan (one bar, its device's budget) or (label, parts) pairs; `extra_lines` adds
    labelled reference lines such as another budget.
    """
    import plotly.graph_objects as go

    if isinstance(bars, Plan):
        plan = bars
        label = f"-c {ctx_label(plan.memory.shape.n_ctx)}"
        bars = [(label + (f" on {_budget_pool(plan).name}" if ram_line(plan) else ""), plan_parts(plan))]
        if ram_line(plan):
            bars.append((f"{label}, all in RAM", ram_parts(plan)))
        extra_lines = [*extra_lines, *ram_line(plan)]
        budget_bytes = plan_budget(plan) if budget_bytes is None else budget_bytes
        title = plan_title(plan) if title is None else title
    fig = figure_widget() if widget else go.Figure()
    for key, label, color in COMPONENTS:
        fig.add_bar(name=label, x=[], y=[], marker_color=color, meta=key,
                    hovertemplate=f"{label}: %{{y:.2f}} GiB<extra>%{{x}}</extra>")
    fig.update_layout(barmode="stack", yaxis_title="GiB", height=420, legend_traceorder="reversed",
                      margin=dict(t=60, r=20, l=60, b=40))
    apply_breakdown(fig, bars, budget_bytes or 0, title=title, extra_lines=extra_lines)
    return fig


def apply_breakdown(fig: Any, bars: Sequence[Bar], budget_bytes: int, *, title: str | None = None,
                    extra_lines: Sequence[tuple[str, float]] = ()) -> None:
    """Set the bar heights, budget line and title of a breakdown_figure in place."""
    labels = [label for label, _ in bars]
    for trace, (key, _, _) in zip(fig.data, COMPONENTS):
        trace.x = labels
        trace.y = [_in_gib(parts.get(key, 0)) for _, parts in bars]
    lines: list[tuple[str, float, str, str]] = [(f"budget {_in_gib(budget_bytes):.2f} GiB", budget_bytes, "#222222", "solid")]
    lines += [(label, value, "#888888", "dash") for label, value in extra_lines]
    fig.layout.shapes = [dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=_in_gib(v), y1=_in_gib(v),
                              line=dict(color=c, width=2, dash=d)) for _, v, c, d in lines]
    fig.layout.annotations = [dict(xref="paper", x=1, xanchor="right", yref="y", y=_in_gib(v), yanchor="bottom",
                                   text=label, showarrow=False, font=dict(size=11, color=c)) for label, v, c, _ in lines]
    if title is not None:
        fig.layout.title = title


# ---------------------------------------------------------------- (b) memory against context


def curve_indices(n: int, points: int = CURVE_POINTS) -> np.ndarray:
    """Log-spaced indices into a grid of n contexts (first and last always kept)."""
    if n <= points:
        return np.arange(n)
    idx = np.unique(np.round(np.geomspace(1, n, points)).astype(np.int64) - 1)
    return idx


def fit_points(result: SweepResult, budget_bytes: int, si: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per cache type: the largest fitting -c of the sweep (0 if none) and the start bytes there."""
    fits = largest_fitting_ctx(result, budget_bytes)[:, si]
    where = np.searchsorted(result.ctx, fits)
    where = np.clip(where, 0, len(result.ctx) - 1)
    need = result.start_bytes[where, np.arange(len(result.cache_types)), si]
    return fits, np.where(fits > 0, need, 0)


def context_figure(result: SweepResult, budget_bytes: int, *, si: int = 0, usable: Sequence[bool] | None = None,
                   current: tuple[int, int] | None = None, title: str | None = None, widget: bool = False) -> Any:
    """Start allocation against -c (log axis), one curve per cache type (K = V), the budget line, and
    each curve's largest fitting context marked. `si` picks the slots column of the sweep; `usable`
    hides types llama-server would refuse; `current` = (-c, bytes) of the configuration being planned.
    """
    import plotly.graph_objects as go

    fig = figure_widget() if widget else go.Figure()
    for t in result.cache_types:
        fig.add_scatter(name=t, x=[], y=[], mode="lines", line=dict(color=TYPE_COLORS.get(t), width=2,
                        dash="dot" if t == "bf16" else "solid"), meta=t,
                        visible="legendonly" if t in LEGEND_ONLY else True,
                        hovertemplate=f"{t}: -c %{{x:,}} needs %{{y:.2f}} GiB<extra></extra>")
    fig.add_scatter(name="largest -c that fits", x=[], y=[], mode="markers",
                    marker=dict(symbol="diamond", size=10, color="#222222"), meta="fit",
                    hovertemplate="%{text}<extra></extra>")
    fig.add_scatter(name="this configuration", x=[], y=[], mode="markers", meta="current",
                    marker=dict(symbol="circle-open", size=14, line=dict(width=3), color="#e41a1c"),
                    hovertemplate="-c %{x:,}: %{y:.2f} GiB at start<extra>this configuration</extra>")
    fig.update_layout(height=460, yaxis_title="GiB allocated at start", xaxis_title="context (-c, tokens)",
                      margin=dict(t=70, r=20, l=60, b=50), hovermode="closest",
                      title=dict(x=0, xanchor="left", font=dict(size=14)))
    apply_context(fig, result, budget_bytes, si=si, usable=usable, current=current, title=title)
    return fig


def _edge_anchor(at: float, span: tuple[float, float]) -> str:
    """A label's anchor so it stays inside the plot: right-aligned near the right edge, left-aligned near the left
    (centred labels on a point at the largest context were cut off at the plot's edge)."""
    share = (at - span[0]) / (span[1] - span[0]) if span[1] > span[0] else 0.5
    return "right" if share > 0.8 else "left" if share < 0.2 else "center"


def apply_context(fig: Any, result: SweepResult, budget_bytes: int, *, si: int = 0,
                  usable: Sequence[bool] | None = None, current: tuple[int, int] | None = None,
                  title: str | None = None) -> None:
    """Set curves, markers, budget and current-context lines of a context_figure in place."""
    types = result.cache_types
    ok = list(usable) if usable is not None else [True] * len(types)
    idx = curve_indices(len(result.ctx))
    if (result.ctx[idx] >= 1024).sum() > 1:
        idx = idx[result.ctx[idx] >= 1024]  # the slider starts at 1K
    x = result.ctx[idx]
    need = result.start_bytes[:, :, si]
    for ti, trace in enumerate(fig.data[: len(types)]):
        trace.x = x.tolist() if ok[ti] else []
        trace.y = (need[idx, ti] / GiB).tolist() if ok[ti] else []
    fits, at = fit_points(result, budget_bytes, si)
    shown = [ti for ti in range(len(types)) if ok[ti] and fits[ti] > 0]
    marker = fig.data[len(types)]
    marker.x = [int(fits[ti]) for ti in shown]
    marker.y = [_in_gib(at[ti]) for ti in shown]
    marker.text = [f"{types[ti]}: {ctx_label(int(fits[ti]))}" for ti in shown]
    shapes = [dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=_in_gib(budget_bytes), y1=_in_gib(budget_bytes),
                   line=dict(color="#222222", width=2)),
              # shapes on a log axis take data values (annotations would take log10)
              dict(type="line", xref="x", x0=int(x[0]), x1=int(x[0]), yref="paper", y0=0, y1=1, visible=False,
                   line=dict(color="#e41a1c", width=1, dash="dot"))]
    notes = [dict(xref="paper", x=0, xanchor="left", yref="y", y=_in_gib(budget_bytes), yanchor="bottom", showarrow=False,
                  text=f"budget {_in_gib(budget_bytes):.2f} GiB", font=dict(size=11))]
    # the largest -c labels: one row each below the budget line, left to right by context, an arrow to its
    # diamond (labels drawn on the markers collided where several types fit at nearby contexts)
    order = sorted(shown, key=lambda ti: int(fits[ti]))
    span = (float(np.log10(int(x[0]))), float(np.log10(int(x[-1]))))
    notes += [dict(xref="x", x=float(np.log10(int(fits[ti]))), yref="y", y=_in_gib(at[ti]), showarrow=True,
                   arrowhead=0, arrowwidth=1, arrowcolor="#888888", ax=0, ay=22 + 16 * row,
                   xanchor=_edge_anchor(float(np.log10(int(fits[ti]))), span),
                   text=f"{types[ti]}: {ctx_label(int(fits[ti]))}", font=dict(size=10, color=TYPE_COLORS.get(types[ti], "#222222")),
                   bgcolor="rgba(255,255,255,0.85)")
              for row, ti in enumerate(order)]
    fig.layout.shapes = shapes
    fig.layout.annotations = notes
    apply_current(fig, current, len(types))
    lo, hi = int(x[0]), int(x[-1])
    ticks = [1 << k for k in range(int(np.ceil(np.log2(lo))), int(np.floor(np.log2(hi))) + 1)]
    fig.layout.xaxis.update(type="log", tickvals=ticks, ticktext=[ctx_label(t) for t in ticks],
                            range=[float(np.log10(lo)), float(np.log10(hi))])
    top = max([_in_gib(budget_bytes) * 1.1] + [float(np.nanmax(need[:, ti])) / GiB for ti in range(len(types)) if ok[ti]])
    fig.layout.yaxis.range = [0, top * 1.05]
    if title is not None:
        fig.layout.title = title


def apply_current(fig: Any, current: tuple[int, int] | None, n_types: int) -> None:
    """Move only the 'this configuration' marker and its dotted line (what a context change alters)."""
    cur = fig.data[n_types + 1]
    cur.x, cur.y = ([current[0]], [_in_gib(current[1])]) if current else ([], [])
    line = fig.layout.shapes[1]
    if current:
        line.update(x0=current[0], x1=current[0], visible=True)
    else:
        line.visible = False


# ---------------------------------------------------------------- (c) largest fitting context table


def format_fit_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Numbers as '131,072', 0 as 'none', None (type refused) as 'n/a'."""
    out = []
    for row in rows:
        out.append({k: (v if isinstance(v, str) else "n/a" if v is None else "none" if v == 0 else f"{v:,}")
                    for k, v in row.items()})
    return out


def fit_table_html(rows: Sequence[Mapping[str, Any]], caption: str = "") -> str:
    """The largest-context table as escaped HTML (no pandas)."""
    from kvbook.notebook.html import html_table

    return html_table(format_fit_rows(rows), caption=caption)


def fit_table_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """The same table as a plotly Table."""
    import plotly.graph_objects as go

    shown = format_fit_rows(rows)
    cols = list(shown[0]) if shown else []
    fig = go.Figure(go.Table(header=dict(values=cols, align="left", fill_color="#e8e8e8"),
                             cells=dict(values=[[r[c] for r in shown] for c in cols], align="left")))
    fig.update_layout(title=title or None, height=80 + 28 * len(shown), margin=dict(t=40 if title else 10, b=10, l=10, r=10))
    return fig


# ---------------------------------------------------------------- the blog post's figures


def blog_figure(comparison: Any) -> Any:
    """The post's weights + KV next to kvbook's breakdown at both contexts, against both budgets."""
    from kvbook.notebook import blog_post
    bars: list[Bar] = []
    for plan in comparison.plans:
        ctx = plan.memory.shape.n_ctx
        bars.append((f"post, {ctx_label(ctx)}", {"weights": blog_post.POST_WEIGHTS_GB * 1e9,
                                                  "kv": blog_post.POST_KV_GB[ctx] * 1e9}))
        bars.append((f"kvbook, {ctx_label(ctx)}: Metal", plan_parts(plan)))
        if ram_line(plan):
            bars.append((f"kvbook, {ctx_label(ctx)}: all in RAM", memory_parts(plan.memory)))
    budget = plan_budget(comparison.plans[0])
    return breakdown_figure(bars, budget, title="The post's arithmetic (GB as written) against kvbook's plan",
                            extra_lines=[(f"the post's working set, {blog_post.POST_WORKING_SET_GB} GB",
                                          blog_post.POST_WORKING_SET_GB * 1e9), *ram_line(comparison.plans[0])])
