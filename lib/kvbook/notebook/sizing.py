"""The sizing notebook's logic: resolve and check its parameters, plan, sweep and summarise
(the blog post's figures are checked in kvbook.notebook.blog_post).

Every bad parameter raises BadInput naming the parameter, so a failed run says which one to fix.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbook.errors import BadInput, KvbookError
from kvbook.interface import Device, FlashAttn, Host, ModelArch, Plan, ServerFlags
from kvbook.memory.backends import backend_of
from kvbook.memory.rules import CACHE_TYPE_LAYOUT, CTX_PAD, SERVER_AUTO_SLOTS, row_bytes
from kvbook.memory.sweep import SweepResult, largest_fitting_ctx, sweep
from kvbook.plan.api import PlanRequest
from kvbook.plan.flags import CACHE_TYPES, parse_server_args, replace

if TYPE_CHECKING:
    from kvbook.notebook.blog_post import BlogComparison

CUSTOM_DEVICE = "custom"
FLASH_CHOICES = ("on", "off", "auto")
TABLE_SLOTS = (-1, 1, 2, 4, 8)  # slot configurations in the largest-context table
SWEEP_POINTS = 1024  # context values in a sweep grid (steps of 256 up to 262,144)


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SizingParams:
    """The sizing notebook's parameters; defaults equal the notebook's `parameters` cell."""

    model: str = "qwen3.6-35b-a3b"
    device: str = "m1-max-64"
    budget_gib: float = 0.0
    context: int = 65536
    slots: int = -1
    kv_unified: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    ubatch: int = 512
    batch: int = 2048
    flash_attn: str = "auto"
    swa_full: bool = False
    allow_over_max: bool = False
    compare_blog_post: bool = False
    n_gpu_layers: str = ""  # -ngl: "" leaves it out (llama-server's auto), else a count, auto or all
    n_cpu_moe: int = 0  # --n-cpu-moe N (0: not given; -1: --cpu-moe)
    tensor_split: str = ""  # -ts, e.g. "3,1"
    solve: bool = False  # rank placements that fit (kvbook plan --solve)
    objective: str = "max-context"  # the solver's objective: max-context or fastest-decode
    command_line: str = ""  # a whole llama-server command line; when set, it is what is planned (knobs follow it)
    output_dir: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SizingParams:
        """Parameters from a dict (e.g. a params YAML); unknown names fail, naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"notebook"})
        if unknown:
            raise BadInput(f"unknown parameter '{unknown[0]}'; the sizing notebook takes: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def unified(self) -> bool:
        """Whether the KV is one shared buffer (llama-server's auto slots always are)."""
        return self.slots < 0 or self.kv_unified


def resolve_model(model: str) -> Any:
    """The model parameter as llama-server loads it (kvbook.model.resolve.ResolvedModel: an architecture without
    a kvbook rule comes back for llama-fit-params to size); any failure names the parameter."""
    if not isinstance(model, str) or not model.strip():
        raise BadInput("parameter 'model' is empty: give a preset id, a GGUF path or URL, or a config.json")
    return resolve_model_of(parse_server_args(["-m", model.strip()]), "model")


def load_arch(model: str) -> ModelArch:
    """The model parameter as a ModelArch kvbook has rules for; any failure names the parameter."""
    resolved = resolve_model(model)
    if not resolved.has_rule:
        raise BadInput(f"parameter 'model': {resolved.unknown}")
    return resolved.arch


def resolve_device(device: str, budget_gib: float = 0.0, endpoints: tuple[str, ...] = (),
                   host: Host | None = None) -> Device:
    """A device preset, this machine, or a custom unified budget (budget_gib > 0 always wins), with the command
    line's --rpc servers bound; `host`: this machine (detected when not given), as `kvbook plan` uses it."""
    from kvbook.ops.host import detect_host
    from kvbook.plan.devices import custom_budget, device_ids, load_device, with_rpc

    host = host or detect_host()
    if budget_gib and budget_gib > 0:
        try:
            return with_rpc(custom_budget(float(budget_gib), host.cpu), endpoints, host=host)
        except BadInput as exc:
            raise BadInput(f"parameter 'budget_gib': {exc}") from None
    if budget_gib < 0:
        raise BadInput(f"parameter 'budget_gib' must be 0 (use the device) or a positive number of GiB, got {budget_gib}")
    if device == CUSTOM_DEVICE:
        raise BadInput("parameter 'budget_gib' must be > 0 when device is 'custom'")
    if device not in device_ids():
        raise BadInput(f"parameter 'device': unknown device '{device}'. Try one of: "
                       f"{', '.join(device_ids() + [CUSTOM_DEVICE])}")
    try:
        return with_rpc(load_device(device, host), endpoints, host=host)
    except BadInput as exc:
        raise BadInput(f"parameter 'device': {exc}") from None


def check_sizing_params(p: SizingParams, arch: ModelArch) -> None:
    """Value checks the notebook's type checks cannot make; each names its parameter."""
    if p.context < 1:
        raise BadInput(f"parameter 'context' must be a positive number of tokens, got {p.context}")
    if p.context > arch.n_ctx_train and not p.allow_over_max and not p.command_line:
        raise BadInput(f"parameter 'context' = {p.context} is above {arch.name}'s maximum of {arch.n_ctx_train} tokens; "
                       "lower it or set allow_over_max: True")
    if p.slots == 0 or p.slots < -1:
        raise BadInput(f"parameter 'slots' must be -1 (auto: 4 slots, unified KV) or at least 1, got {p.slots}")
    for name in ("cache_type_k", "cache_type_v"):
        value = getattr(p, name)
        if value not in CACHE_TYPES:
            raise BadInput(f"parameter '{name}': unknown cache type '{value}'; choose one of {', '.join(CACHE_TYPES)}")
    for name in ("ubatch", "batch"):
        if getattr(p, name) < 1:
            raise BadInput(f"parameter '{name}' must be at least 1, got {getattr(p, name)}")
    if p.flash_attn not in FLASH_CHOICES:
        raise BadInput(f"parameter 'flash_attn' must be one of {', '.join(FLASH_CHOICES)}, got '{p.flash_attn}'")
    if p.flash_attn == "off" and CACHE_TYPE_LAYOUT[p.cache_type_v][0] > 1:
        raise BadInput(f"parameter 'cache_type_v' = {p.cache_type_v} is quantized, which needs flash attention; "
                       "set flash_attn to on or auto, or use f16/bf16/f32")
    for name in ("cache_type_k", "cache_type_v"):
        try:
            _check_widths(arch, getattr(p, name))
        except BadInput as exc:
            raise BadInput(f"parameter '{name}': {exc}") from None


def _check_widths(arch: ModelArch, cache_type: str) -> None:
    for il in range(arch.n_layer):
        if arch.has_kv(il):
            row_bytes(cache_type, arch.head_k_at(il) * arch.n_head_kv[il])
            row_bytes(cache_type, arch.head_v_at(il) * arch.n_head_kv[il])


def type_usable(arch: ModelArch, cache_type: str, flash_attn: bool) -> bool:
    """Whether llama-server accepts this cache type for both K and V with this model and FA setting."""
    if not flash_attn and CACHE_TYPE_LAYOUT[cache_type][0] > 1:
        return False
    try:
        _check_widths(arch, cache_type)
    except BadInput:
        return False
    return True


def server_argv(p: SizingParams) -> list[str]:
    """The llama-server command line these parameters describe."""
    argv = ["-m", p.model, "-c", str(p.context), "-np", str(p.slots), "-ctk", p.cache_type_k, "-ctv", p.cache_type_v,
            "-b", str(p.batch), "-ub", str(p.ubatch), "-fa", p.flash_attn]
    if p.kv_unified and p.slots > 0:
        argv.append("-kvu")
    if p.swa_full:
        argv.append("--swa-full")
    if p.n_gpu_layers:
        argv += ["-ngl", p.n_gpu_layers]
    if p.n_cpu_moe:
        argv += ["--cpu-moe"] if p.n_cpu_moe < 0 else ["--n-cpu-moe", str(p.n_cpu_moe)]
    if p.tensor_split:
        argv += ["-ts", p.tensor_split]
    return argv


# knob -> (ServerFlags field, the field's value for the knob): what command_line and the knobs share
_KNOBS: dict[str, tuple[str, Any]] = {
    "model": ("model", str),
    "context": ("ctx", int),
    "slots": ("parallel", int),
    "kv_unified": ("kv_unified", lambda v: True if v else None),
    "cache_type_k": ("type_k", str),
    "cache_type_v": ("type_v", str),
    "ubatch": ("ubatch", int),
    "batch": ("batch", int),
    "flash_attn": ("flash_attn", FlashAttn),
    "swa_full": ("swa_full", bool),
    "n_gpu_layers": ("gpu_layers", lambda v: v or "auto"),
    "n_cpu_moe": ("cpu_moe_layers", int),
    "tensor_split": ("tensor_split", lambda v: tuple(float(x) for x in str(v).split(",") if x.strip())),
}


def parse_command_line(command_line: str) -> ServerFlags:
    """The `command_line` parameter (a llama-server command line, shell quoting allowed) as ServerFlags."""
    try:
        return parse_server_args(shlex.split(command_line))
    except ValueError as exc:  # shlex: an unclosed quote
        raise BadInput(f"parameter 'command_line': {exc}") from None
    except BadInput as exc:
        raise BadInput(f"parameter 'command_line': {exc}") from None


def knobs_of(flags: ServerFlags, n_ctx_train: int, source: str = "") -> dict[str, Any]:
    """The knob values a command line sets (-c 0 or none: the model's trained context, as llama-server does;
    the model: its -m, else `source`, the file -hf or -mu loads)."""
    split = ",".join(f"{x:g}" for x in flags.tensor_split)
    return {"model": flags.model or source, "context": flags.ctx or n_ctx_train, "slots": flags.parallel,
            "kv_unified": bool(flags.kv_unified), "cache_type_k": flags.type_k, "cache_type_v": flags.type_v,
            "ubatch": flags.ubatch, "batch": flags.batch, "flash_attn": flags.flash_attn.value,
            "swa_full": flags.swa_full, "n_gpu_layers": "" if flags.gpu_layers == "auto" else flags.gpu_layers,
            "n_cpu_moe": flags.cpu_moe_layers, "tensor_split": split}


def with_command_line(p: SizingParams, flags: ServerFlags, n_ctx_train: int, source: str = "") -> SizingParams:
    """`p` with every knob read from its command line; a knob the parameters also set to something else fails,
    naming both (the command line is one source of truth, the knobs then drive the sliders)."""
    defaults = SizingParams()
    derived = knobs_of(flags, n_ctx_train, source)
    for name, value in derived.items():
        given = getattr(p, name)
        if given != getattr(defaults, name) and given != value:
            raise BadInput(f"parameter '{name}' = {given!r} and command_line's {value!r} disagree: set one of them")
    return dataclasses.replace(p, **derived)


def server_flags(p: SizingParams, n_ctx_train: int = 0, source: str = "") -> ServerFlags:
    """The flags these parameters describe: the knobs' command line (`server_argv`), or with `command_line` set,
    that line with the knobs that differ from it edited in (what a slider moved)."""
    if not p.command_line:
        return parse_server_args(server_argv(p))
    base = parse_command_line(p.command_line)
    derived = knobs_of(base, n_ctx_train, source)
    changes = {field: convert(getattr(p, knob)) for knob, (field, convert) in _KNOBS.items()
               if getattr(p, knob) != derived[knob]}
    return replace(base, **changes) if changes else base


# ---------------------------------------------------------------- sweep grid


def context_grid(max_ctx: int, points: int = SWEEP_POINTS) -> np.ndarray:
    """-c values from 256 up to max_ctx in equal steps (a multiple of 256), max_ctx itself included."""
    top = max(CTX_PAD, int(max_ctx) // CTX_PAD * CTX_PAD)
    step = CTX_PAD * max(1, -(-top // (CTX_PAD * points)))
    grid = np.arange(step, top + 1, step, dtype=np.int64)
    if grid[-1] != top:
        grid = np.append(grid, top)
    return grid


def table_slots(slots: int) -> tuple[int, ...]:
    """The chosen slot count first, then the table's standard ones."""
    return tuple(dict.fromkeys((slots,) + TABLE_SLOTS))


def compute_backend_of(device: Device | None) -> tuple[str, bool]:
    """(backend, unified memory) of the pool that holds the model: its GPU's backend (kvbook.memory.backends), CPU
    without one."""
    if device is None:
        return "CPU", False
    pool = device.pools[0] if device.unified else device.main_pool
    return (backend_of(pool.name) if pool.kind == "gpu" else "CPU"), device.unified


def sweep_for(arch: ModelArch, p: SizingParams, max_ctx: int | None = None, device: Device | None = None) -> SweepResult:
    """Every cache type x (chosen + standard) slot counts over a context grid up to the model's maximum, with the
    compute buffer of the device's backend (the CPU estimate without a device)."""
    top = max(arch.n_ctx_train, p.context if p.allow_over_max else 0) if max_ctx is None else max_ctx
    backend, unified_memory = compute_backend_of(device)
    return sweep(arch, context_grid(top), CACHE_TYPES, table_slots(p.slots), unified=p.kv_unified,
                 ubatch=p.ubatch, batch=p.batch, flash_attn=p.flash_attn != "off", swa_full=p.swa_full,
                 backend=backend, unified_memory=unified_memory)


def slots_label(slots: int, unified: bool) -> str:
    if slots < 0:
        return f"auto ({SERVER_AUTO_SLOTS} slots, unified)"
    return f"{slots} slot{'s' if slots > 1 else ''}" + (", unified" if unified and slots > 1 else "")


def largest_fitting_rows(arch: ModelArch, result: SweepResult, budget_bytes: int, kv_unified: bool,
                         flash_attn: bool) -> list[dict[str, Any]]:
    """One row per cache type (K = V): the largest swept -c whose start allocation fits, per slot count
    (None where llama-server would refuse the type). kv_unified: how explicit slot counts were swept."""
    fits = largest_fitting_ctx(result, budget_bytes)
    rows = []
    for ti, ctype in enumerate(result.cache_types):
        row: dict[str, Any] = {"cache type": ctype}
        for si, slots in enumerate(result.slots.tolist()):
            label = slots_label(int(slots), kv_unified)
            row[label] = int(fits[ti, si]) if type_usable(arch, ctype, flash_attn) else None
        rows.append(row)
    return rows


def planned_fit_rows(request: PlanRequest, slot_counts: tuple[int, ...], kv_unified: bool,
                     flash_attn: bool, stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """The same table as `largest_fitting_rows` from the planner's own search, device by device, with every
    placement flag of the request (-ngl, --n-cpu-moe, -ts, -ot): on several pools the start allocation is not one
    sum against one budget. The sweep gives the same numbers on unified memory, faster."""
    from kvbook.plan.api import largest_context

    rows = []
    for ctype in CACHE_TYPES:
        row: dict[str, Any] = {"cache type": ctype}
        for slots in slot_counts:
            label = slots_label(slots, kv_unified)
            if not type_usable(request.model, ctype, flash_attn):
                row[label] = None
                continue
            if stop is not None and stop():
                raise Superseded()
            flags = replace(request.flags, type_k=ctype, type_v=ctype, parallel=slots,
                            kv_unified=True if kv_unified and slots > 0 else None)
            row[label] = largest_context(request.with_flags(flags))
        rows.append(row)
    return rows


class Superseded(Exception):
    """A search given up because a newer request replaced it (the live panel's controls moved on)."""


def fit_rows(request: PlanRequest, p: SizingParams, result: SweepResult | None,
             stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """The largest-context table for this request: from the sweep on unified memory, from the planner's search
    where the devices are several pools (placement decides what fits); [] without a kvbook rule."""
    if result is None or not request.has_rule:
        return []
    flash = p.flash_attn != "off"
    if request.device.unified:
        return largest_fitting_rows(request.model, result, budget_of(request.device), p.kv_unified, flash)
    return planned_fit_rows(request, tuple(int(s) for s in result.slots.tolist()), p.kv_unified, flash, stop)


# ---------------------------------------------------------------- one resolved run


@dataclass(frozen=True)
class Sizing:
    """Resolved parameters and everything the notebook shows."""

    params: SizingParams
    request: PlanRequest  # what was planned (kvbook.plan.api): the model as it loads, the flags, the devices
    plan: Plan
    sweep: SweepResult | None  # None for an architecture without a kvbook rule (its plan is llama.cpp's accounting)
    solution: Any = None  # kvbook.plan.solver.Solution when params.solve

    @property
    def arch(self) -> ModelArch:
        return self.request.model

    @property
    def device(self) -> Device:
        return self.request.device

    @property
    def flags(self) -> ServerFlags:
        return self.request.flags

    @property
    def budget_bytes(self) -> int:
        return budget_of(self.device)

    @property
    def flash(self) -> bool:
        return self.params.flash_attn != "off"

    def fit_rows(self) -> list[dict[str, Any]]:
        return fit_rows(self.request, self.params, self.sweep)


def budget_of(device: Device) -> int:
    """The budget of the pool that holds weights and KV (the only pool on unified memory)."""
    return device.pools[0].budget_bytes if device.unified else device.main_pool.budget_bytes


def resolve_model_of(flags: ServerFlags, parameter: str) -> Any:
    """The model `flags` load (kvbook.model.resolve), any failure naming the parameter that gave it."""
    from kvbook.model.resolve import resolve_model

    try:
        return resolve_model(flags, os.environ)
    except KvbookError as exc:
        raise BadInput(f"parameter '{parameter}': {exc}") from None


def request_for(params: SizingParams | Mapping[str, Any], host: Host | None = None) -> tuple[SizingParams, PlanRequest]:
    """The parameters checked (with command_line set, its knobs read from it) and the planning request they make:
    the same request `kvbook plan --device DEVICE -- llama-server ...` builds for that command line."""
    p = params if isinstance(params, SizingParams) else SizingParams.from_mapping(params)
    if p.command_line:
        flags = parse_command_line(p.command_line)
        resolved = resolve_model_of(flags, "command_line")
        p = with_command_line(p, flags, resolved.arch.n_ctx_train, resolved.source)
        device = resolve_device(p.device, p.budget_gib, flags.rpc, host)
        if resolved.has_rule:
            check_sizing_params(p, resolved.arch)
    else:
        resolved = resolve_model(p.model)
        device = resolve_device(p.device, p.budget_gib, (), host)
        if resolved.has_rule:
            check_sizing_params(p, resolved.arch)
        flags = server_flags(p)
    from kvbook.ops.calibration import with_calibrations

    return p, PlanRequest.of(resolved, flags, with_calibrations(device))  # as kvbook plan: saved calibrations too


def resolve(params: SizingParams | Mapping[str, Any]) -> Sizing:
    """Check every parameter, then plan (kvbook.plan.api, as `kvbook plan` does) and sweep. Raises BadInput
    naming the first bad parameter."""
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.plan.api import plan, solve

    p, request = request_for(params)
    try:
        planned = plan(request, fit_fallback=FIT_PARAMS)
    except BadInput as exc:
        raise BadInput(f"these parameters do not describe a server llama-server would start: {exc}") from None
    solution = None
    if p.solve:
        try:
            solution = solve(request, p.objective)
        except BadInput as exc:
            raise BadInput(f"parameter 'objective' / the solver: {exc}") from None
    return Sizing(params=p, request=request, plan=planned,
                  sweep=sweep_for(request.model, p, device=request.device) if request.has_rule else None, solution=solution)


def solver_rows(solution: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ranked placements, rejected options) of kvbook.plan.solver.solve, as table rows."""
    ranked = [{"rank": p.rank, "verdict": p.verdict.value, "n_ctx": p.n_ctx, "-ngl": p.n_gpu_layers,
               "--n-cpu-moe": "all" if p.n_cpu_moe < 0 else p.n_cpu_moe,
               "-ts": ",".join(map(str, p.tensor_split)) or "-", "cache": p.cache_type,
               "host MiB read / token": round(p.host_read_bytes / 2**20, 1), "llama-server args": " ".join(p.argv)}
              for p in solution.placements]
    rejected = [{"option": r.option, "code": r.reason.code, "reason": r.reason.text} for r in solution.rejected]
    return ranked, rejected


def summary(s: Sizing, blog: BlogComparison | None = None) -> dict[str, Any]:
    """summary.json: the plan's JSON contract plus the parameters, the fit table and the blog rows."""
    from kvbook.plan.summary import plan_summary

    out: dict[str, Any] = {"kind": "sizing", **plan_summary(s.plan)}
    out["params"] = {k: v for k, v in dataclasses.asdict(s.params).items() if k != "output_dir"}
    out["device_name"] = s.device.name
    out["model_max_ctx"] = s.arch.n_ctx_train
    out["largest_fitting_ctx"] = s.fit_rows()
    out["blog_post"] = blog.to_dict() if blog is not None else None
    if s.solution is not None:
        ranked, rejected = solver_rows(s.solution)
        out["solver"] = {"objective": s.solution.objective, "placements": ranked, "rejected": rejected}
    return out


def finish(s: Sizing, output_dir: str = "", blog: BlogComparison | None = None) -> dict[str, Any]:
    """Write summary.json into output_dir (empty: a new folder under outputs/) and return it."""
    from kvbook.notebook.runner import new_run_id, write_summary
    from kvbook.paths import outputs_dir

    out_dir = Path(output_dir) if output_dir else outputs_dir() / new_run_id("sizing")
    data = summary(s, blog)
    data["output_dir"] = str(out_dir)
    write_summary(out_dir, data)
    return data


def largest_context_per_pool(request: PlanRequest, cap: int = 0, stop: Callable[[], bool] | None = None) -> dict[str, int]:
    """Per device of the plan: the largest -c (a multiple of 256, at most the training context or `cap`) at which
    that device's own share still starts within its budget, with the request's placement as llama-server makes it
    at that context (0: not even the smallest). Bisection per device over plans without the context search, which
    assumes a device's need grows with -c; needs kvbook's rules."""
    from kvbook.interface import Verdict
    from kvbook.plan.api import plan as make_plan

    top = max(CTX_PAD, (cap or request.model.n_ctx_train) // CTX_PAD * CTX_PAD)
    cache: dict[int, dict[str, bool]] = {}

    def fits(n_ctx: int) -> dict[str, bool]:
        if stop is not None and stop():
            raise Superseded()
        if n_ctx not in cache:
            planned = make_plan(request.with_flags(replace(request.flags, ctx=n_ctx)), search=False)
            cache[n_ctx] = {u.pool: u.verdict is not Verdict.DOES_NOT_FIT for u in planned.pools}
        return cache[n_ctx]

    out: dict[str, int] = {}
    for name in fits(top):
        lo, hi = 0, top // CTX_PAD  # in steps of 256: lo fits (0: nothing yet), hi is the top
        if fits(top)[name]:
            out[name] = top
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid * CTX_PAD).get(name, False):
                lo = mid
            else:
                hi = mid
        out[name] = lo * CTX_PAD
    return out
