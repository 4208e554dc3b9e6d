"""Interactive sizing UI: ipywidgets controls for every sizing parameter, two plotly FigureWidgets
and a table, all updated in place by handlers that call kvbook's pure functions.

`build_sizing_ui(params)` returns a SizingUI holding the layout and every widget, so tests drive it
without a browser: set `ui.context.value = 131072`, then read `ui.breakdown.data`.

Every plan goes through kvbook.plan.api, as `kvbook plan` does, with every flag of the run (its command_line,
-ngl, --n-cpu-moe, -ts, ...): only the knobs a control moved are edited into it.

What each control recomputes (nothing more):
- context, K/V cache type: one plan of the chosen configuration without the context search (bar, marker, status);
- device, budget: the budget line, markers, table and status, from the sweep already computed;
- slots, unified, ubatch, batch, flash attention, --swa-full: a new vectorised sweep, then the above;
- model: the model, the slider's range, then everything.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
from collections.abc import Mapping
from typing import Any

from kvbook.errors import BadInput, KvbookError
from kvbook.interface import GiB, MemoryPlan, ModelArch, Plan, ServerFlags
from kvbook.memory.rules import CTX_PAD
from kvbook.memory.sweep import SweepResult
from kvbook.notebook import figures, sizing
from kvbook.plan import api
from kvbook.plan.api import PlanRequest
from kvbook.plan.flags import CACHE_TYPES

SLOT_CHOICES = (-1, 1, 2, 3, 4, 6, 8, 16)
BATCH_CHOICES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
SLIDER_STEP = 1 / 16  # log2 steps: 16 positions per doubling of the context


def _choices(values: tuple[int, ...], current: int) -> list[int]:
    return sorted(set(values) | {current})


def _slot_options(current: int) -> list[tuple[str, int]]:
    return [("auto (4, unified)" if n < 0 else str(n), n) for n in _choices(SLOT_CHOICES, current)]


class SizingUI:
    """The sizing controls, figures and the state behind them."""

    def __init__(self, params: sizing.SizingParams):
        import ipywidgets as w

        self._resolved: dict[str, Any] = {}  # model spec -> kvbook.model.resolve.ResolvedModel
        self._busy = False
        self.timings: list[tuple[str, float]] = []  # (what changed, ms) per handler call
        self.error: str | None = None
        # what no control here moves, planned as given (the placement flags and command_line included)
        self._fixed: dict[str, Any] = {"allow_over_max": params.allow_over_max, "compare_blog_post": params.compare_blog_post,
                       "output_dir": params.output_dir, "n_gpu_layers": params.n_gpu_layers,
                       "n_cpu_moe": params.n_cpu_moe, "tensor_split": params.tensor_split, "solve": params.solve,
                       "objective": params.objective, "command_line": params.command_line}
        self._make_controls(w, params)
        self._first_view()
        self.layout = w.VBox([
            w.HBox([self.model, self.model_path]),
            w.HBox([self.device, self.budget_gib]),
            self.context,
            w.HBox([self.slots, self.kv_unified, self.swa_full]),
            w.HBox([self.cache_type_k, self.cache_type_v]),
            self.flash_attn,
            w.HBox([self.ubatch, self.batch]),
            self.status,
            self.breakdown,
            self.curve,
            self.table,
        ])
        for widget, level in ((self.model, "model"), (self.model_path, "model"), (self.device, "budget"),
                              (self.budget_gib, "budget"), (self.context, "point"), (self.cache_type_k, "point"),
                              (self.cache_type_v, "point"), (self.slots, "sweep"), (self.kv_unified, "sweep"),
                              (self.ubatch, "sweep"), (self.batch, "sweep"), (self.flash_attn, "sweep"),
                              (self.swa_full, "sweep")):
            widget.observe(self._handler(level), names="value")

    def _make_controls(self, w: Any, p: sizing.SizingParams) -> None:
        """One widget per sizing parameter, set to `p` (the model is loaded to bound the context slider)."""
        from kvbook.model.sources import preset_ids
        from kvbook.plan.devices import device_ids

        presets = preset_ids()
        preset = p.model if p.model in presets else (presets[0] if presets else "")
        wide = {"description_width": "initial"}
        self.model = w.Dropdown(options=presets, value=preset or None, description="model", style=wide)
        self.model_path = w.Text(value="" if p.model in presets else p.model,
                                 placeholder="or a GGUF path / URL / config.json", continuous_update=False,
                                 layout=w.Layout(width="420px"))
        self.device = w.Dropdown(options=device_ids() + [sizing.CUSTOM_DEVICE],
                                 value=sizing.CUSTOM_DEVICE if p.budget_gib > 0 else p.device, description="device",
                                 style=wide)
        self.budget_gib = w.BoundedFloatText(value=p.budget_gib if p.budget_gib > 0 else 48.0, min=0.1, max=1 << 20,
                                             step=1.0, description="custom budget (GiB)", style=wide,
                                             disabled=p.budget_gib <= 0)
        self.arch = self._load(p.model)
        top = max(self.arch.n_ctx_train, p.context if p.allow_over_max else 0)
        self.context = w.FloatLogSlider(value=p.context, base=2, min=min(10.0, math.log2(max(CTX_PAD, p.context))),
                                        max=math.log2(top), step=SLIDER_STEP,
                                        description="context (-c)", readout_format=",.0f", continuous_update=True,
                                        style=wide, layout=w.Layout(width="640px"))
        self.slots = w.Dropdown(options=_slot_options(p.slots), value=p.slots, description="slots (-np)", style=wide)
        self.kv_unified = w.Checkbox(value=p.kv_unified, description="unified KV (-kvu)", indent=False)
        self.cache_type_k = w.Dropdown(options=list(CACHE_TYPES), value=p.cache_type_k, description="K cache (-ctk)",
                                       style=wide)
        self.cache_type_v = w.Dropdown(options=list(CACHE_TYPES), value=p.cache_type_v, description="V cache (-ctv)",
                                       style=wide)
        self.ubatch = w.Dropdown(options=_choices(BATCH_CHOICES, p.ubatch), value=p.ubatch, description="ubatch (-ub)",
                                 style=wide)
        self.batch = w.Dropdown(options=_choices(BATCH_CHOICES, p.batch), value=p.batch, description="batch (-b)",
                                style=wide)
        self.flash_attn = w.ToggleButtons(options=list(sizing.FLASH_CHOICES), value=p.flash_attn,
                                          description="flash attention (-fa)", style=wide)
        self.swa_full = w.Checkbox(value=p.swa_full, description="--swa-full", indent=False)
        self.status = w.HTML()
        self.table = w.HTML()

    def _first_view(self) -> None:
        """The first computation, then the figures built from it."""
        self.device_record = self._device()
        self.sweep: SweepResult = sizing.sweep_for(self.arch, self.params, self._sweep_top(), self.device_record)
        self.max_ctx = 0
        self.memory: MemoryPlan | None = None
        self.plan: Plan | None = None
        self.breakdown = figures.breakdown_figure([("-c", {})], self.budget_bytes, widget=True)
        self.curve = figures.context_figure(self.sweep, self.budget_bytes, usable=self._usable(), widget=True,
                                            title="Memory at start against context (K = V cache type)")
        self._refresh("all")

    # ------------------------------------------------------------ current values

    def _model_spec(self) -> str:
        return self.model_path.value.strip() or (self.model.value or "")

    def _budget(self) -> float:
        return float(self.budget_gib.value) if self.device.value == sizing.CUSTOM_DEVICE else 0.0

    @property
    def params(self) -> sizing.SizingParams:
        """The parameters the controls describe now (what a params YAML for this view would hold)."""
        return sizing.SizingParams(
            model=self._model_spec(),
            device=self.device.value,
            budget_gib=self._budget(),
            context=self.context_tokens,
            slots=int(self.slots.value),
            kv_unified=bool(self.kv_unified.value),
            cache_type_k=self.cache_type_k.value,
            cache_type_v=self.cache_type_v.value,
            ubatch=int(self.ubatch.value),
            batch=int(self.batch.value),
            flash_attn=self.flash_attn.value,
            swa_full=bool(self.swa_full.value),
            **self._fixed,
        )

    @property
    def context_tokens(self) -> int:
        """The slider's value as a -c: a multiple of 256."""
        return max(CTX_PAD, int(round(float(self.context.value) / CTX_PAD)) * CTX_PAD)

    @property
    def flags(self) -> ServerFlags:
        return sizing.server_flags(self.params, self.arch.n_ctx_train, self.resolved.source)

    @property
    def request(self) -> PlanRequest:
        """What the controls ask kvbook.plan.api now."""
        return PlanRequest.of(self.resolved, self.flags, self.device_record)

    def _device(self) -> Any:
        base = sizing.parse_command_line(self._fixed["command_line"]) if self._fixed["command_line"] else None
        return sizing.resolve_device("" if self.device.value == sizing.CUSTOM_DEVICE else self.device.value,
                                     self._budget(), base.rpc if base else ())

    @property
    def budget_bytes(self) -> int:
        return sizing.budget_of(self.device_record)

    def _sweep_top(self) -> int:
        return max(self.arch.n_ctx_train, self.context_tokens if self._fixed["allow_over_max"] else 0)

    def _usable(self) -> list[bool]:
        flash = self.flash_attn.value != "off"
        return [sizing.type_usable(self.arch, t, flash) for t in self.sweep.cache_types]

    def _load(self, spec: str) -> ModelArch:
        """The model `spec` as it loads with the run's other flags (its projector, draft and LoRA adapters)."""
        if spec not in self._resolved:
            line = self._fixed["command_line"]
            if line:
                base = sizing.parse_command_line(line)
                own = sizing.resolve_model_of(base, "command_line")
                if spec in (base.model, own.source):
                    resolved = own
                else:  # another model with the command line's other flags
                    resolved = sizing.resolve_model_of(sizing.replace(base, model=spec), "model")
            else:
                resolved = sizing.resolve_model(spec)
            if not resolved.has_rule:
                raise BadInput(f"parameter 'model': {resolved.unknown}; this view needs kvbook's rules (the plan "
                               "above used llama-fit-params)")
            self._resolved[spec] = resolved
        self.resolved = self._resolved[spec]
        return self.resolved.arch

    def _set_slider_range(self) -> None:
        top = self._sweep_top()
        hi = math.log2(top)
        lo = min(10.0, math.log2(max(CTX_PAD, self.context_tokens)))
        value = min(float(self.context.value), float(top))
        # widen first so the value never falls outside while min and max move
        self.context.min, self.context.max = min(lo, self.context.min), max(hi, self.context.max)
        self.context.value = value
        self.context.min, self.context.max = lo, hi

    # ------------------------------------------------------------ handlers

    def _handler(self, level: str):
        def handle(change: Mapping[str, Any]) -> None:
            if self._busy:
                return
            self._busy = True
            t0 = time.perf_counter()
            try:
                self._refresh(level, source=change.get("owner"))
            finally:
                self._busy = False
                self.timings.append((level, (time.perf_counter() - t0) * 1000))
        return handle

    def _refresh(self, level: str, source: Any = None) -> None:
        """Recompute from `level` down, then update the figures in place."""
        try:
            if level == "model":
                self.arch = self._load(self._model_spec())
                self._set_slider_range()
            if level in ("model", "budget", "all"):
                self.budget_gib.disabled = self.device.value != sizing.CUSTOM_DEVICE
                self.device_record = self._device()
            p = self.params
            sizing.check_sizing_params(p, self.arch)
            if level in ("model", "sweep", "all", "budget"):  # the device's backend sizes the compute buffer
                self.kv_unified.disabled = p.slots < 0  # auto slots always share one KV
                self.sweep = sizing.sweep_for(self.arch, p, self._sweep_top(), self.device_record)
            search = level != "point" or self.max_ctx == 0 or source in (self.cache_type_k, self.cache_type_v)
            plan = api.plan(self.request, search=search)
            if search:
                self.max_ctx = plan.max_ctx
        except KvbookError as exc:
            self.error = str(exc)
            self.status.value = f'<p style="color:#b00020"><b>Cannot plan this:</b> {html.escape(str(exc))}</p>'
            return
        self.error = None
        memory = plan.memory
        self.memory = memory
        self.plan = plan if search else dataclasses.replace(plan, max_ctx=self.max_ctx)
        budget = self.budget_bytes
        current = (p.context, memory.start_bytes)
        with self.breakdown.batch_update():
            bar = (f"-c {figures.ctx_label(p.context)}", figures.plan_parts(self.plan))
            figures.apply_breakdown(self.breakdown, [bar], budget, title=figures.plan_title(self.plan),
                                    extra_lines=figures.ram_line(self.plan))
        with self.curve.batch_update():
            if level == "point":
                figures.apply_current(self.curve, current, len(self.sweep.cache_types))
            else:
                figures.apply_context(self.curve, self.sweep, budget, usable=self._usable(), current=current)
        if level != "point":
            rows = sizing.fit_rows(self.request, p, self.sweep)
            self.table.value = figures.fit_table_html(
                rows, caption=f"Largest -c that starts on {self.device_record.name} ({self.arch.name})")
        self.status.value = self._status_html()

    def _status_html(self) -> str:
        plan, mem = self.plan, self.memory
        assert plan is not None and mem is not None
        color = {"fits": "#1b7f3b", "tight": "#b36b00", "does not fit": "#b00020"}[plan.verdict.value]
        kv = f"{mem.kv_bytes / GiB:.2f} GiB KV"
        rec = f", {mem.recurrent_bytes / GiB:.2f} GiB recurrent" if mem.recurrent_bytes else ""
        return (f'<p><b style="color:{color}">{html.escape(plan.verdict.value.upper())}</b> on '
                f"{html.escape(self.device_record.name)}: {mem.start_bytes / GiB:.2f} GiB at start ({kv}{rec}), "
                f"{mem.total_bytes / GiB:.2f} GiB with run-time growth, of {self.budget_bytes / GiB:.2f} GiB. "
                f"n_ctx {mem.shape.n_ctx:,} over {mem.shape.n_seq} slot(s); largest -c that fits: {plan.max_ctx:,}. "
                f"<code>{html.escape(' '.join(plan.flags.argv))}</code></p>")


def build_sizing_ui(params: sizing.SizingParams | Mapping[str, Any] | None = None) -> SizingUI:
    """The sizing UI for these parameters (a SizingParams or the notebook's parameter dict)."""
    if params is None:
        p = sizing.SizingParams()
    elif isinstance(params, sizing.SizingParams):
        p = params
    else:
        names = {f.name for f in dataclasses.fields(sizing.SizingParams)}
        p = sizing.SizingParams.from_mapping({k: v for k, v in params.items() if k in names})
    p, _ = sizing.request_for(p)  # checks every parameter (with command_line: its knobs read from it)
    return SizingUI(p)
