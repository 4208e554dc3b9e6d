"""Interactive sizing UI, one panel: every control of a llama-server command line (the line itself, model, device,
context as a slider and an exact box, slots, cache types, flash attention, batch sizes, -ngl, --n-cpu-moe, -ts, -ot
presets), one bar per device against its own budget, memory against context, the largest-context table, the
solver's ranked placements and the command line to copy, all updated in place by handlers that plan through
kvbook.plan.api, as `kvbook plan` does.

`build_sizing_ui(params)` returns a SizingUI holding the layout and every widget, so tests drive it without a
browser: set `ui.context.value = 131072`, then read `ui.breakdown.data` (one bar per device).

What each control recomputes in the handler (the foreground, kept under ~100 ms):
- context, K/V cache type, -ngl, --n-cpu-moe, -ts, -ot: one plan without the context search (bars, marker, status);
- device, budget: the device, a new sweep, then the above;
- slots, unified, ubatch, batch, flash attention, --swa-full: a new vectorised sweep, then the above;
- model, command line: the model, the slider's range, then everything.
The searches (largest context overall and per device, the largest-context table, the solver's ranking) follow in a
background thread, newest change only, so a slider never waits for them (`background=False`: inline, for tests).
"""

from __future__ import annotations

import dataclasses
import html
import math
import shlex
import threading
import time
from collections.abc import Mapping
from typing import Any

from kvbook.errors import BadInput, KvbookError
from kvbook.interface import GiB, MemoryPlan, ModelArch, Plan, ServerFlags
from kvbook.memory.rules import CTX_PAD
from kvbook.memory.sweep import SweepResult
from kvbook.notebook import figures, placement_view, sizing
from kvbook.plan import api
from kvbook.plan.api import PlanRequest
from kvbook.plan.flags import CACHE_TYPES, parse_server_args, replace

SLOT_CHOICES = (-1, 1, 2, 3, 4, 6, 8, 16)
BATCH_CHOICES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
SLIDER_STEP = 1 / 16  # log2 steps: 16 positions per doubling of the context
SEARCH_DELAY_S = 0.3  # the searches start once the controls rest this long
BARS_WAIT_S = 0.4  # the curve waits this long at most for the browser to report the new bars drawn
CACHE_STATES = 256  # plans and sweeps kept per control state (oldest dropped first)
# -ot presets: (label, PATTERN=BUFFER_TYPE or "" for what the command line gives)
OT_PRESETS: tuple[tuple[str, str], ...] = (
    ("-ot: as the command line gives", ""),
    ("-ot: MoE experts on the CPU", r"\.ffn_(up|down|gate)_exps\.=CPU"),
    ("-ot: every FFN on the CPU", r"\.ffn_.*=CPU"),
    ("-ot: output layer on the CPU", r"^output\.weight=CPU"),
)


def _choices(values: tuple[int, ...], current: int) -> list[int]:
    return sorted(set(values) | {current})


def _slot_options(current: int) -> list[tuple[str, int]]:
    return [("auto (4, unified)" if n < 0 else str(n), n) for n in _choices(SLOT_CHOICES, current)]


def _ngl_options(n_layer: int, current: str) -> list[tuple[str, str]]:
    """-ngl choices: llama-server's auto (the default: --fit places what fits), all layers, or a count (the model's
    n_layer repeating layers plus the output layer: n_layer + 1 is all)."""
    counts = [str(n) for n in range(n_layer + 2)]
    extra = [current] if current and current not in ("auto", "all") and current not in counts else []
    return ([("auto (default: fit what the device holds)", ""), (f"all layers ({n_layer + 1})", "all")]
            + [(n, n) for n in counts + extra])


def command_text(plan: Plan) -> str:
    """The planned llama-server command line, shell-quoted, to copy."""
    return shlex.join(["llama-server", *plan.flags.argv[1:]] if plan.flags.argv[:1] == ["llama-server"]
                      else ["llama-server", *plan.flags.argv])


class SizingUI:
    """The sizing controls, figures and the state behind them, in one panel."""

    def __init__(self, params: sizing.SizingParams, *, background: bool = True):
        import ipywidgets as w

        self._resolved: dict[str, Any] = {}  # model spec -> kvbook.model.resolve.ResolvedModel
        self._busy = 0  # the thread running a handler (0: none); its own changes to other controls are not handled
        self._handling = threading.Lock()
        self._background = background
        self._generation = 0  # the newest change: a background result for an older one is dropped
        self._timer: threading.Timer | None = None
        # plotly's FigureWidget.batch_update is not thread-safe: the handler and the background searches draw in turn
        self._draw = threading.RLock()
        self.timings: list[tuple[str, float]] = []  # (what changed, ms) per handler call
        self._plans: dict[tuple[Any, ...], Plan] = {}  # control state -> plan (no search)
        self._curve_pending: tuple[bool, tuple[int, int]] | None = None  # (whole curve?, current) to draw
        self._curve_timer: threading.Timer | None = None
        self._slider_sent: float | None = None  # the last value the kernel gave the context slider
        self._sweeps: dict[tuple[Any, ...], tuple[ModelArch, SweepResult]] = {}
        self.error: str | None = None
        self.max_ctx = 0
        self.per_device: dict[str, int] = {}
        self.solution: Any = None
        # what no control here moves, planned as given
        self._fixed: dict[str, Any] = {"allow_over_max": params.allow_over_max, "compare_blog_post": params.compare_blog_post,
                                       "output_dir": params.output_dir, "solve": params.solve,
                                       "objective": params.objective, "command_line": params.command_line}
        self._make_controls(w, params)
        self._first_view()
        half = w.Layout(width="50%")
        self.layout = w.VBox([
            self.command_line,
            w.HBox([self.model, self.model_path]),
            w.HBox([self.device, self.budget_gib]),
            w.HBox([self.context, self.context_exact]),
            w.HBox([self.slots, self.kv_unified, self.swa_full]),
            w.HBox([self.cache_type_k, self.cache_type_v, self.flash_attn]),
            w.HBox([self.ubatch, self.batch]),
            w.HBox([self.ngl, self.n_cpu_moe, self.ts, self.ot]),
            self.status,
            self.copy_line,
            w.HBox([w.Box([self.breakdown], layout=half), w.Box([self.curve], layout=half)]),
            w.HBox([w.Box([self.table], layout=half), w.Box([self.ranked], layout=half)]),
        ])
        self.layout.add_class("kvbook-sizing")
        for widget, level in ((self.model, "model"), (self.model_path, "model"), (self.command_line, "command_line"),
                              (self.device, "budget"), (self.budget_gib, "budget"), (self.context, "point"),
                              (self.context_exact, "exact"), (self.cache_type_k, "point"), (self.cache_type_v, "point"),
                              (self.ngl, "point"), (self.n_cpu_moe, "point"), (self.ts, "point"), (self.ot, "point"),
                              (self.slots, "sweep"), (self.kv_unified, "sweep"), (self.ubatch, "sweep"),
                              (self.batch, "sweep"), (self.flash_attn, "sweep"), (self.swa_full, "sweep")):
            widget.observe(self._handler(level), names="value")

    def _make_controls(self, w: Any, p: sizing.SizingParams) -> None:
        """One widget per sizing parameter, set to `p` (the model is loaded to bound the context slider)."""
        from kvbook.model.sources import preset_ids
        from kvbook.plan.devices import device_ids

        presets = preset_ids()
        preset = p.model if p.model in presets else (presets[0] if presets else "")
        wide = {"description_width": "initial"}
        self.command_line = w.Textarea(value=p.command_line, description="command line", style=wide,
                                       placeholder="paste a llama-server command line: every control below follows it",
                                       continuous_update=False, layout=w.Layout(width="95%", height="3.2em"))
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
                                        description="context (-c)", readout=False, continuous_update=True,
                                        style=wide, layout=w.Layout(width="520px"))
        # the exact -c: what is typed is planned as typed (llama-server pads it as the planner does)
        self.context_exact = w.BoundedIntText(value=p.context, min=CTX_PAD, max=top, step=CTX_PAD, description="exact -c",
                                              style=wide, layout=w.Layout(width="200px"))
        self._exact = p.context
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
                                          description="flash attention (-fa)",
                                          style={"description_width": "initial", "button_width": "56px"})
        self.swa_full = w.Checkbox(value=p.swa_full, description="--swa-full", indent=False)
        ngl = "" if p.n_gpu_layers in ("", "auto") else p.n_gpu_layers
        self.ngl = w.Dropdown(options=_ngl_options(self.arch.n_layer, ngl), value=ngl, description="-ngl", style=wide)
        self.n_cpu_moe = w.BoundedIntText(value=p.n_cpu_moe, min=-1, max=self.arch.n_layer,
                                          description="--n-cpu-moe (-1: all)", style=wide,
                                          disabled=not getattr(self.arch, "n_expert", 0),
                                          layout=w.Layout(width="210px"))
        self.ts = w.Text(value=p.tensor_split, description="-ts", placeholder="e.g. 3,1 (empty: by free memory)",
                         continuous_update=False, style=wide, layout=w.Layout(width="260px"))
        self.ot = w.Dropdown(options=[(label, value) for label, value in OT_PRESETS], value="", style=wide,
                             layout=w.Layout(width="300px"))
        self.status = w.HTML()
        self.copy_line = w.HTML()
        self.table = w.HTML()
        self.ranked = w.HTML()

    def _first_view(self) -> None:
        """The first computation, then the figures built from it."""
        self.device_record = self._device()
        self._device_key = (self.device.value, self._budget(), self._fixed["command_line"])
        self.sweep: SweepResult = self._sweep_for(self.params)
        self.memory: MemoryPlan | None = None
        self.plan: Plan | None = None
        self.breakdown = placement_view.device_figure([], widget=True)
        self.breakdown.on_drawn = self._draw_pending_curve
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
            n_gpu_layers=self.ngl.value,
            n_cpu_moe=int(self.n_cpu_moe.value),
            tensor_split=self.ts.value.strip(),
            **self._fixed,
        )

    @property
    def context_tokens(self) -> int:
        """The -c planned: the exact box's value (the slider, moved, writes its nearest multiple of 256 there)."""
        return int(self._exact)

    @property
    def flags(self) -> ServerFlags:
        return self._flags(self.params, self.ot.value)

    def _flags(self, p: sizing.SizingParams, ot: str) -> ServerFlags:
        flags = sizing.server_flags(p, self.arch.n_ctx_train, self.resolved.source)
        if ot:
            try:
                overrides = parse_server_args(["-m", "x", "-ot", ot]).tensor_overrides
            except BadInput as exc:
                raise BadInput(f"-ot preset: {exc}") from None
            flags = replace(flags, tensor_overrides=overrides)
        return flags

    @property
    def request(self) -> PlanRequest:
        """What the controls ask kvbook.plan.api now."""
        return PlanRequest.of(self.resolved, self.flags, self.device_record)

    def _device(self, p: sizing.SizingParams | None = None) -> Any:
        """The device of `p` (default: the controls now)."""
        name, budget = (p.device, p.budget_gib) if p is not None else (self.device.value, self._budget())
        base = sizing.parse_command_line(self._fixed["command_line"]) if self._fixed["command_line"] else None
        return sizing.resolve_device("" if name == sizing.CUSTOM_DEVICE else name, budget, base.rpc if base else ())

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
        self._set_slider(value)
        self.context.min, self.context.max = lo, hi
        self._exact = min(self._exact, top)
        self.context_exact.max = max(top, self.context_exact.value)
        self.context_exact.value = self._exact
        self.context_exact.max = top
        self._set_ngl(self.ngl.value)
        self.n_cpu_moe.max = self.arch.n_layer
        self.n_cpu_moe.disabled = not getattr(self.arch, "n_expert", 0)

    def _set_ngl(self, value: str) -> None:
        """The -ngl choices of this model, with `value` kept (a count above this model's layers stays as given:
        llama-server reads it as all layers)."""
        self.ngl.options = _ngl_options(self.arch.n_layer, value)
        self.ngl.value = value

    def _read_command_line(self) -> None:
        """The command line box's line becomes the run: every control is set from it (its knobs read as
        `kvbook run 01-sizing` reads them)."""
        line = self.command_line.value.strip()
        self._fixed["command_line"] = line
        if not line:
            return
        flags = sizing.parse_command_line(line)
        resolved = sizing.resolve_model_of(flags, "command_line")
        knobs = sizing.knobs_of(flags, resolved.arch.n_ctx_train, resolved.source)
        self._resolved.pop(knobs["model"], None)
        if knobs["model"] in self.model.options:
            self.model_path.value = ""
            self.model.value = knobs["model"]
        else:
            self.model_path.value = knobs["model"]
        self.arch = self._load(self._model_spec())
        self._set_slider_range()
        self._exact = int(knobs["context"])
        self._set_slider(float(self._exact))
        self.context_exact.value = self._exact
        self.slots.options = _slot_options(int(knobs["slots"]))
        for name in ("slots", "kv_unified", "cache_type_k", "cache_type_v", "flash_attn", "swa_full", "n_cpu_moe"):
            getattr(self, name).value = knobs[name]
        self.ubatch.options = _choices(BATCH_CHOICES, int(knobs["ubatch"]))
        self.batch.options = _choices(BATCH_CHOICES, int(knobs["batch"]))
        self.ubatch.value, self.batch.value = knobs["ubatch"], knobs["batch"]
        self._set_ngl(knobs["n_gpu_layers"])
        self.ts.value = knobs["tensor_split"]
        self.ot.value = ""

    # ------------------------------------------------------------ handlers

    def _handler(self, level: str):
        def handle(change: Mapping[str, Any]) -> None:
            if self._busy == threading.get_ident():
                return  # a control the handler itself moved (the box following the slider, a command line's knobs)
            with self._handling:  # ipykernel 7 runs comm handlers on more than one thread: one change at a time
                self._handle(level, change)
        return handle

    def _handle(self, level: str, change: Mapping[str, Any]) -> None:
        """One control change: the context box and slider kept together, then the refresh from its level."""
        self._busy = threading.get_ident()
        t0 = time.perf_counter()
        try:
            slider = change.get("owner")
            if level == "point" and slider is not None and slider is self.context:
                # the slider's value now, not the change's: changes may be handled out of order (one thread each)
                if self._slider_echo(float(slider.value)):
                    return
                self._exact = max(CTX_PAD, int(round(float(slider.value) / CTX_PAD)) * CTX_PAD)
                self.context_exact.value = self._exact
            elif level == "exact":
                self._exact = int(self.context_exact.value)
                self._set_slider(float(min(max(self._exact, 2 ** self.context.min), 2 ** self.context.max)))
            self._refresh("point" if level == "exact" else level)
        finally:
            self._busy = 0
            self.timings.append((level, (time.perf_counter() - t0) * 1000))

    def _set_slider(self, value: float) -> None:
        """Move the context slider from the kernel (to follow the exact box or a command line)."""
        self._slider_sent = value
        self.context.value = value

    def _slider_echo(self, value: float) -> bool:
        """Whether a slider change is the browser snapping a value the kernel set to the slider's grid (it sends
        the snapped value back): then the exact -c stays as typed (100000 became 101,120 before)."""
        sent, self._slider_sent = self._slider_sent, None
        return sent is not None and abs(math.log2(value) - math.log2(sent)) <= self.context.step / 2 + 1e-9

    def _refresh(self, level: str) -> None:
        """Recompute from `level` down and update the figures in place, the per-device bars first (what a change
        is for) and the curve, the command line and the status after them; the searches follow (`_searches`)."""
        try:
            if level == "command_line":
                self._read_command_line()
                level = "model"
            if level == "model":
                self.arch = self._load(self._model_spec())
                self._set_slider_range()
            # one reading of the controls for everything below: ipykernel 7 sets a widget's value from another
            # thread while a handler runs, and a plan kept under one state must be the plan of that state
            p, ot = self.params, self.ot.value
            device_key = (p.device, p.budget_gib, self._fixed["command_line"])
            if level in ("model", "budget", "all") or device_key != self._device_key:
                self.budget_gib.disabled = p.device != sizing.CUSTOM_DEVICE
                self.device_record, self._device_key = self._device(p), device_key
            sizing.check_sizing_params(p, self.arch)
            self.kv_unified.disabled = p.slots < 0  # auto slots always share one KV
            request = PlanRequest.of(self.resolved, self._flags(p, ot), self.device_record)
            plan = self._plan_for((p, ot), request)
        except KvbookError as exc:
            self._show_error(exc)
            return
        with self._draw:  # with the searches' thread shut out: it reads and replaces self.plan under this lock
            self.error = None
            self.memory = plan.memory
            self.plan = dataclasses.replace(plan, max_ctx=self.max_ctx)
            self._generation += 1
            sent = self.breakdown._last_layout_edit_id
            with self.breakdown.batch_update():
                self._draw_devices()
            bars_sent = self.breakdown._last_layout_edit_id != sent
            self.copy_line.value = (f'<pre class="kvbook-command" style="user-select:all;white-space:pre-wrap">'
                                    f"{html.escape(command_text(plan))}</pre>")
            self.status.value = self._status_html(searching=True)
        try:
            if level in ("model", "sweep", "all", "budget"):  # the device's backend sizes the compute buffer
                self.sweep = self._sweep_for(p)
        except KvbookError as exc:
            self._show_error(exc)
            return
        self._draw_curve_after_bars(level, (p.context, plan.memory.start_bytes), wait=bars_sent)
        self._start_searches(request, p, level, self._generation)

    def _draw_curve_after_bars(self, level: str, current: tuple[int, int], wait: bool) -> None:
        """Update the memory-against-context curve once the browser has drawn the new bars (the breakdown's
        redraw report, or BARS_WAIT_S without one). Sent together, the curve's redraw (100-300 ms of the page's
        time on a loaded machine) ran before the bars could be painted; a newer change replaces a waiting one."""
        with self._draw:
            full = level != "point" or (self._curve_pending is not None and self._curve_pending[0])
            self._curve_pending = (full, current)
        if not (wait and self._background):
            self._draw_pending_curve()
            return
        if self._curve_timer is not None:
            self._curve_timer.cancel()
        self._curve_timer = threading.Timer(BARS_WAIT_S, self._draw_pending_curve)
        self._curve_timer.daemon = True
        self._curve_timer.start()

    def _draw_pending_curve(self) -> None:
        with self._draw:
            if self._curve_pending is None:
                return
            full, current = self._curve_pending
            self._curve_pending = None
            with self.curve.batch_update():
                if full:
                    figures.apply_context(self.curve, self.sweep, self.budget_bytes, usable=self._usable(),
                                          current=current)
                else:
                    figures.apply_current(self.curve, current, len(self.sweep.cache_types))

    def _show_error(self, exc: Exception) -> None:
        self.error = str(exc)
        self.status.value = f'<p style="color:#b00020"><b>Cannot plan this:</b> {html.escape(str(exc))}</p>'

    def _plan_for(self, key: tuple[sizing.SizingParams, str], request: PlanRequest) -> Plan:
        """The plan without the context search, kept per control state (moving back to a state is a look-up)."""
        plan = self._plans.get(key)
        if plan is None:
            plan = api.plan(request, search=False)
            if len(self._plans) >= CACHE_STATES:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def _sweep_for(self, p: sizing.SizingParams) -> SweepResult:
        """The context sweep of the model, device and sweep-level controls, kept per state like the plans."""
        key = (self._model_spec(), self._fixed["command_line"], self._sweep_top(), sizing.compute_backend_of(
            self.device_record), p.slots, p.kv_unified, p.ubatch, p.batch, p.flash_attn != "off", p.swa_full)
        hit = self._sweeps.get(key)
        if hit is None or hit[0] is not self.arch:
            hit = (self.arch, sizing.sweep_for(self.arch, p, self._sweep_top(), self.device_record))
            if len(self._sweeps) >= CACHE_STATES:
                self._sweeps.pop(next(iter(self._sweeps)))
            self._sweeps[key] = hit
        return hit[1]

    def _draw_devices(self) -> None:
        assert self.plan is not None
        rows = placement_view.device_rows(self.plan)
        placement_view.apply_devices(self.breakdown, rows, figures.plan_title(self.plan), self.per_device)

    def _start_searches(self, request: PlanRequest, p: sizing.SizingParams, level: str, generation: int) -> None:
        """The searches for this change, in a background thread that starts once the controls rest for
        SEARCH_DELAY_S and gives up as soon as a newer change arrives (so they never slow a moving slider)."""
        def stale() -> bool:
            return generation != self._generation

        def work() -> None:
            try:
                found = self._searches(request, p, level, stale)
            except sizing.Superseded:
                return
            except KvbookError as exc:
                found = {"error": str(exc)}
            with self._draw:
                if not stale():
                    self._show_searches(found)

        if not self._background:
            work()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(SEARCH_DELAY_S, work)
        self._timer.daemon = True
        self._timer.start()

    def _searches(self, request: PlanRequest, p: sizing.SizingParams, level: str,
                  stale: Any = None) -> dict[str, Any]:
        """What the slow part shows: the largest context (overall and per device), the table, the solver."""
        def check() -> None:
            if stale is not None and stale():
                raise sizing.Superseded()

        out: dict[str, Any] = {"max_ctx": api.largest_context(request)}
        check()
        out["per_device"] = sizing.largest_context_per_pool(request, self._sweep_top(), stale)
        if level != "point" or not self.table.value:
            rows = sizing.fit_rows(request, p, self.sweep, stale)
            out["table"] = figures.fit_table_html(
                rows, caption=f"Largest -c that starts on {self.device_record.name} ({self.arch.name})")
        check()
        out["solution"] = api.solve(request, p.objective)
        return out

    def _show_searches(self, found: Mapping[str, Any]) -> None:
        if "error" in found:
            self.ranked.value = f"<p><em>Not searched: {html.escape(found['error'])}</em></p>"
            return
        self.max_ctx, self.per_device = found["max_ctx"], found["per_device"]
        if self.plan is not None:
            self.plan = dataclasses.replace(self.plan, max_ctx=self.max_ctx)
            with self.breakdown.batch_update():
                self._draw_devices()
        if "table" in found:
            self.table.value = found["table"]
        self.solution = found["solution"]
        ranked, _ = sizing.solver_rows(self.solution)
        from kvbook.notebook.html import html_table

        self.ranked.value = html_table(
            [{k: r[k] for k in ("rank", "verdict", "n_ctx", "-ngl", "--n-cpu-moe", "-ts", "cache")} for r in ranked],
            caption=f"The solver's placements, best first for {self.solution.objective}")
        self.status.value = self._status_html(searching=False)

    def wait(self, timeout: float = 60.0) -> None:
        """Until the background searches and the curve of the last change are shown (tests, benchmarks)."""
        if self._timer is not None:
            self._timer.join(timeout)
        if self._curve_timer is not None:
            self._curve_timer.join(timeout)

    def _status_html(self, searching: bool) -> str:
        plan, mem = self.plan, self.memory
        assert plan is not None and mem is not None
        color = {"fits": "#1b7f3b", "tight": "#b36b00", "does not fit": "#b00020"}[plan.verdict.value]
        kv = f"{mem.kv_bytes / GiB:.2f} GiB KV"
        rec = f", {mem.recurrent_bytes / GiB:.2f} GiB recurrent" if mem.recurrent_bytes else ""
        largest = "searching ..." if searching else f"{self.max_ctx:,}"
        return (f'<p><b style="color:{color}">{html.escape(plan.verdict.value.upper())}</b> on '
                f"{html.escape(self.device_record.name)}: {mem.start_bytes / GiB:.2f} GiB at start ({kv}{rec}), "
                f"{mem.total_bytes / GiB:.2f} GiB with run-time growth; each device against its own budget below. "
                f"n_ctx {mem.shape.n_ctx:,} over {mem.shape.n_seq} slot(s); largest -c that starts: {largest}.</p>")


def build_sizing_ui(params: sizing.SizingParams | Mapping[str, Any] | None = None, *,
                    background: bool = True) -> SizingUI:
    """The sizing UI for these parameters (a SizingParams or the notebook's parameter dict); `background` False
    runs the searches inline (tests)."""
    if params is None:
        p = sizing.SizingParams()
    elif isinstance(params, sizing.SizingParams):
        p = params
    else:
        names = {f.name for f in dataclasses.fields(sizing.SizingParams)}
        p = sizing.SizingParams.from_mapping({k: v for k, v in params.items() if k in names})
    p, _ = sizing.request_for(p)  # checks every parameter (with command_line: its knobs read from it)
    return SizingUI(p, background=background)
