"""Display helpers shared by notebooks and reports: escaped HTML tables (no pandas needed), plotly output
that survives export, and the run-result figures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbook.records.store import CheckRecord

_DONE = False


def setup_plotly() -> None:
    """Set plotly's default renderer once (plotly >= 6.1 otherwise emits only a mimetype nbconvert drops)."""
    global _DONE
    if _DONE:
        return
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"
    _DONE = True


def cell_text(value: Any) -> str:
    """A table cell as a reader sees it: never "None" (empty, or "n/a" inside an interval), an interval
    [low, high] as "low to high", other lists comma-separated, whole floats without ".0"."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else str(value)
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            low, high = (cell_text(v) or "n/a" for v in value)
            return f"{low} to {high}" + (" (too few samples)" if None in value else "")
        return ", ".join(cell_text(v) or "n/a" for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {cell_text(v) or 'n/a'}" for k, v in value.items())
    return str(value)


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "") -> str:
    """Rows of dicts as an HTML table (every value escaped, see cell_text), scrolling sideways inside its own box
    when wider than the page instead of being cut off."""
    if not rows:
        return f"<p><em>{html.escape(caption or 'nothing to show')}: no rows</em></p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell_text(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f'<div class="kvbook-table" style="overflow-x:auto;max-width:100%">'
            f'<table class="kvbook">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


class HTML:
    """Rich-display wrapper so a notebook can show a table without importing IPython."""

    def __init__(self, markup: str):
        self.markup = markup

    def _repr_html_(self) -> str:
        return self.markup


def latency_figure(results: Sequence[Any]):
    """Median total time per check, one bar per route side by side (checks on the x axis, horizontal labels)."""
    import statistics

    import plotly.graph_objects as go

    checks = list(dict.fromkeys(r.check for r in results))
    fig = go.Figure()
    for route in dict.fromkeys(r.route for r in results):
        ys = []
        for check in checks:
            times = [r.timings.total_s for r in results if r.route == route and r.check == check
                     and r.timings.total_s is not None]
            ys.append(1000 * statistics.median(times) if times else None)
        fig.add_bar(name=route, x=checks, y=ys, hovertemplate="%{x}: %{y:.0f} ms<extra>" + route + "</extra>")
    fig.update_layout(barmode="group", yaxis_title="total ms (median)", title="Total time per check and route",
                      height=420, xaxis_tickangle=0, legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    return fig


def pass_fail_figure(results: Sequence[Any]):
    """A check x route grid: green pass, red fail (required), grey fail (recorded only)."""
    import plotly.graph_objects as go

    checks = list(dict.fromkeys(r.check for r in results))
    routes = list(dict.fromkeys(r.route for r in results))
    z, text = [], []
    for check in checks:
        row, trow = [], []
        for route in routes:
            mine = [r for r in results if r.check == check and r.route == route]
            passed = sum(r.passed for r in mine)
            row.append(1.0 if mine and passed == len(mine) else (0.5 if mine and not mine[0].required else 0.0))
            trow.append(f"{passed}/{len(mine)}")
        z.append(row)
        text.append(trow)
    fig = go.Figure(go.Heatmap(z=z, x=routes, y=checks, text=text, texttemplate="%{text}", showscale=False,
                               zmin=0, zmax=1, colorscale=[[0, "#d9534f"], [0.5, "#bbbbbb"], [1, "#5cb85c"]]))
    fig.update_layout(title="Checks passed per route", height=60 + 40 * len(checks))
    return fig


def distribution_figure(records: Sequence[CheckRecord], labels: Sequence[str], check: str, key: str,
                        scale: float, title: str, unit: str):
    """One box per contender (every sample drawn) for a timing of one check."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label in labels:
        ys = [scale * t for r in records
              if r.label == label and r.check == check and r.passed and (t := r.timing(key)) is not None]
        fig.add_box(y=ys, name=label, boxpoints="all", jitter=0.4, pointpos=0)
    fig.update_layout(title=title, yaxis_title=unit, height=420, showlegend=False)
    return fig


def rate_figure(rows: Sequence[tuple[str, str, Any]]):
    """Pass rates with their 95% intervals as error bars: rows of (contender, metric, Rate)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for metric in dict.fromkeys(m for _, m, _ in rows):
        mine = [(label, rate) for label, m, rate in rows if m == metric and rate.total]
        fig.add_bar(name=metric, x=[label for label, _ in mine], y=[100 * r.value for _, r in mine],
                    error_y={"type": "data", "symmetric": False,
                             "array": [100 * (r.high - r.value) for _, r in mine],
                             "arrayminus": [100 * (r.value - r.low) for _, r in mine]})
    fig.update_layout(barmode="group", yaxis_title="% passed (95% Wilson interval)", yaxis_range=[0, 105],
                      title="Pass rates", height=420)
    return fig
