"""Per-device views for the sizing notebook: one stacked bar per device against its own budget, the
solver's ranked placements and rejections as rows, and sliders for -ngl, --n-cpu-moe and -ts that replan."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from kvbook.errors import BadInput, KvbookError
from kvbook.interface import GiB, Plan, ServerFlags
from kvbook.notebook.figures import COMPONENTS
from kvbook.notebook.sizing import solver_rows  # noqa: F401 - the notebook's one import for placements
from kvbook.plan.flags import replace

_PARTS = (("weights", "weights_bytes"), ("kv", "kv_bytes"), ("recurrent", "recurrent_bytes"),
          ("compute", "compute_bytes"), ("output", "output_bytes"), ("host_extras", "host_extras_bytes"))


def device_rows(plan: Plan) -> list[dict[str, Any]]:
    from kvbook.plan.summary import plan_summary

    return list(plan_summary(plan)["devices"])


def apply_devices(fig: Any, devices: Sequence[Mapping[str, Any]], title: str) -> None:
    """Update the traces in place (same count and order as device_figure made them)."""
    names = [d["name"] for d in devices]
    for trace, (_, key) in zip(fig.data, _PARTS):
        trace.x, trace.y = names, [d[key] / GiB for d in devices]
    budget = fig.data[len(_PARTS)]
    budget.x, budget.y = names, [d["budget_bytes"] / GiB for d in devices]
    budget.text = [d["verdict"] for d in devices]
    fig.layout.title = title


def device_figure(devices: Sequence[Mapping[str, Any]], title: str = "Per device: what it holds against its budget",
                  widget: bool = False) -> Any:
    import plotly.graph_objects as go

    fig = go.FigureWidget() if widget else go.Figure()
    for (part, _), (_, label, color) in zip(_PARTS, COMPONENTS):
        fig.add_bar(name=label, marker_color=color)
    fig.add_scatter(name="budget", mode="markers+text", textposition="top center",
                    marker={"symbol": "line-ew-open", "size": 40, "color": "#222", "line": {"width": 3}})
    fig.update_layout(barmode="stack", yaxis_title="GiB", height=420)
    apply_devices(fig, devices, title)
    return fig


class PlacementUI:
    """Sliders for -ngl and --n-cpu-moe and a -ts box over a planning request (kvbook.plan.api, as `kvbook plan`
    plans it); each change replans and redraws the device bars. Tests drive it without a browser (set
    `.ngl.value`, read `.figure.data` and `.status.value`)."""

    def __init__(self, request: Any):
        import ipywidgets as w

        self.request = request
        arch, flags, device = request.model, request.flags, request.device
        self.arch, self.base, self.device = arch, flags, device
        self.error: str | None = None
        top = arch.n_layer + 1
        start = top if flags.gpu_layers in ("auto", "all", "-1") else min(top, int(flags.gpu_layers or 0))
        self.ngl = w.IntSlider(value=start, min=0, max=top, description="-ngl", continuous_update=False)
        moe = bool(getattr(arch, "n_expert", 0))
        self.n_cpu_moe = w.IntSlider(value=max(0, flags.cpu_moe_layers), min=0, max=arch.n_layer,
                                     description="--n-cpu-moe", disabled=not moe, continuous_update=False)
        self.ts = w.Text(value=",".join(f"{x:g}" for x in flags.tensor_split), description="-ts",
                         placeholder="e.g. 3,1 (empty: by free memory)")
        self.status = w.HTML()
        plan = self._plan()
        self.figure = device_figure(device_rows(plan) if plan else [], widget=True)
        self._show(plan)
        for control in (self.ngl, self.n_cpu_moe, self.ts):
            control.observe(self._changed, names="value")
        self.layout = w.VBox([w.HBox([self.ngl, self.n_cpu_moe, self.ts]), self.status, self.figure])
        self.layout.add_class("kvbook-placement")  # lets a browser test tell it from the sizing UI

    def flags(self) -> ServerFlags:
        try:
            split = tuple(float(x) for x in self.ts.value.split(",") if x.strip())
        except ValueError:
            raise BadInput(f"-ts: {self.ts.value!r} is not a comma-separated list of numbers") from None
        return replace(self.base, gpu_layers=str(self.ngl.value), cpu_moe_layers=self.n_cpu_moe.value,
                                   tensor_split=split)

    def _plan(self) -> Plan | None:
        from kvbook.ops.fit_params import FIT_PARAMS
        from kvbook.plan.api import plan as make_plan

        try:
            plan = make_plan(self.request.with_flags(self.flags()), fit_fallback=FIT_PARAMS)
        except KvbookError as exc:
            self.error = str(exc).splitlines()[0]
            return None
        self.error = None
        return plan

    def _show(self, plan: Plan | None) -> None:
        if plan is None:
            self.status.value = f"<span style='color:#c62828'>{html.escape(self.error or '')}</span>"
            return
        with self.figure.batch_update():
            apply_devices(self.figure, device_rows(plan), f"-ngl {self.ngl.value}: {plan.verdict.value}, "
                                                         f"largest context {plan.max_ctx}")
        self.status.value = f"<b>{html.escape(plan.verdict.value)}</b>, largest context {plan.max_ctx}"

    def _changed(self, _change: Mapping[str, Any]) -> None:
        self._show(self._plan())
