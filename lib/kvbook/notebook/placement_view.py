"""Per-device views for the sizing notebook: one stacked bar per device against its own budget (host growth on the
host's bar), and the solver's ranked placements and rejections as rows. The live panel is kvbook.notebook.widgets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvbook.interface import GiB, Plan
from kvbook.notebook.figures import COMPONENTS, ctx_label, figure_widget
from kvbook.notebook.sizing import solver_rows  # noqa: F401 - the notebook's one import for placements

_PARTS = (("weights", "weights_bytes"), ("kv", "kv_bytes"), ("recurrent", "recurrent_bytes"),
          ("compute", "compute_bytes"), ("output", "output_bytes"), ("host_extras", "host_extras_bytes"))


def device_rows(plan: Plan) -> list[dict[str, Any]]:
    from kvbook.plan.summary import plan_summary

    return list(plan_summary(plan)["devices"])


def apply_devices(fig: Any, devices: Sequence[Mapping[str, Any]], title: str,
                  largest: Mapping[str, int] | None = None) -> None:
    """Update the traces in place (same count and order as device_figure made them); `largest`: per device name,
    the largest -c its own share starts with (shown under its budget mark)."""
    names = [d["name"] for d in devices]
    for trace, (_, key) in zip(fig.data, _PARTS):
        trace.x, trace.y = names, [d[key] / GiB for d in devices]
    budget = fig.data[len(_PARTS)]
    budget.x, budget.y = names, [d["budget_bytes"] / GiB for d in devices]
    budget.text = [d["verdict"] + (f", largest -c {ctx_label(largest[d['name']])}" if largest and d["name"] in largest else "")
                   for d in devices]
    fig.layout.title.text = title


def device_figure(devices: Sequence[Mapping[str, Any]], title: str = "Per device: what it holds against its budget",
                  widget: bool = False, largest: Mapping[str, int] | None = None) -> Any:
    """One stacked bar per device (meta: the COMPONENTS key of each part), its budget as a black mark."""
    import plotly.graph_objects as go

    fig = figure_widget() if widget else go.Figure()
    for (part, _), (_, label, color) in zip(_PARTS, COMPONENTS):
        fig.add_bar(name=label, marker_color=color, meta=part,
                    hovertemplate=f"{label}: %{{y:.2f}} GiB<extra>%{{x}}</extra>")
    fig.add_scatter(name="budget", mode="markers+text", textposition="top center", meta="budget",
                    marker={"symbol": "line-ew-open", "size": 40, "color": "#222", "line": {"width": 3}},
                    hovertemplate="budget %{y:.2f} GiB<extra>%{x}</extra>")
    fig.update_layout(barmode="stack", yaxis_title="GiB", height=460, title=dict(x=0, xanchor="left", font=dict(size=14)),
                      margin=dict(t=80, r=20, l=60, b=40), legend=dict(orientation="h", x=0, y=-0.12, yanchor="top"))
    apply_devices(fig, devices, title, largest)
    return fig
