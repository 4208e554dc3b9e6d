"""The sizing notebook's logic: resolve and check its parameters, plan, sweep, summarise, and
check the blog post's memory figures against kvbook's own numbers.

Every bad parameter raises BadInput naming the parameter, so a failed run says which one to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvbook.errors import BadInput, KvbookError
from kvbook.interface import Device, GiB, MiB, ModelArch, Plan, ServerFlags, to_dict
from kvbook.memory.rules import CACHE_TYPE_LAYOUT, CTX_PAD, SERVER_AUTO_SLOTS, row_bytes
from kvbook.memory.sweep import SweepResult, largest_fitting_ctx, sweep
from kvbook.plan.flags import CACHE_TYPES, parse_server_args

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


def load_arch(model: str) -> ModelArch:
    """The model parameter as a ModelArch; any failure names the parameter."""
    from kvbook.model.sources import load_model

    if not isinstance(model, str) or not model.strip():
        raise BadInput("parameter 'model' is empty: give a preset id, a GGUF path or URL, or a config.json")
    try:
        return load_model(model.strip())
    except KvbookError as exc:
        raise BadInput(f"parameter 'model': {exc}") from None


def resolve_device(device: str, budget_gib: float = 0.0) -> Device:
    """A device preset, this machine, or a custom unified budget (budget_gib > 0 always wins)."""
    from kvbook.plan.devices import custom_budget, device_ids, load_device

    if budget_gib and budget_gib > 0:
        try:
            return custom_budget(float(budget_gib))
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
        return load_device(device)
    except BadInput as exc:
        raise BadInput(f"parameter 'device': {exc}") from None


def check_params(p: SizingParams, arch: ModelArch) -> None:
    """Value checks the notebook's type checks cannot make; each names its parameter."""
    if p.context < 1:
        raise BadInput(f"parameter 'context' must be a positive number of tokens, got {p.context}")
    if p.context > arch.n_ctx_train and not p.allow_over_max:
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
    return argv


def server_flags(p: SizingParams) -> ServerFlags:
    return parse_server_args(server_argv(p))


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


def sweep_for(arch: ModelArch, p: SizingParams, max_ctx: int | None = None) -> SweepResult:
    """Every cache type x (chosen + standard) slot counts over a context grid up to the model's maximum."""
    top = max(arch.n_ctx_train, p.context if p.allow_over_max else 0) if max_ctx is None else max_ctx
    return sweep(arch, context_grid(top), CACHE_TYPES, table_slots(p.slots), unified=p.kv_unified,
                 ubatch=p.ubatch, batch=p.batch, flash_attn=p.flash_attn != "off", swa_full=p.swa_full)


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


# ---------------------------------------------------------------- one resolved run


@dataclass(frozen=True)
class Sizing:
    """Resolved parameters and everything the notebook shows."""

    params: SizingParams
    arch: ModelArch
    device: Device
    flags: ServerFlags
    plan: Plan
    sweep: SweepResult

    @property
    def budget_bytes(self) -> int:
        return budget_of(self.device)

    @property
    def flash(self) -> bool:
        return self.params.flash_attn != "off"

    def fit_rows(self) -> list[dict[str, Any]]:
        return largest_fitting_rows(self.arch, self.sweep, self.budget_bytes, self.params.kv_unified, self.flash)


def budget_of(device: Device) -> int:
    """The budget of the pool that holds weights and KV (the only pool on unified memory)."""
    return device.pools[0].budget_bytes if device.unified else device.main_pool.budget_bytes


def resolve(params: SizingParams | Mapping[str, Any]) -> Sizing:
    """Check every parameter, then plan and sweep. Raises BadInput naming the first bad parameter."""
    from kvbook.plan.planner import make_plan

    p = params if isinstance(params, SizingParams) else SizingParams.from_mapping(params)
    arch = load_arch(p.model)
    device = resolve_device(p.device, p.budget_gib)
    check_params(p, arch)
    flags = server_flags(p)
    try:
        plan = make_plan(arch, flags, device)
    except BadInput as exc:
        raise BadInput(f"these parameters do not describe a server llama-server would start: {exc}") from None
    return Sizing(params=p, arch=arch, device=device, flags=flags, plan=plan, sweep=sweep_for(arch, p))


def summary(s: Sizing, blog: BlogComparison | None = None) -> dict[str, Any]:
    """summary.json: the plan's JSON contract plus the parameters, the fit table and the blog rows."""
    from kvbook.plan.summary import plan_summary

    out: dict[str, Any] = {"kind": "sizing", **plan_summary(s.plan)}
    out["params"] = {k: v for k, v in dataclasses.asdict(s.params).items() if k != "output_dir"}
    out["device_name"] = s.device.name
    out["model_max_ctx"] = s.arch.n_ctx_train
    out["largest_fitting_ctx"] = s.fit_rows()
    out["blog_post"] = blog.to_dict() if blog is not None else None
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


# ---------------------------------------------------------------- the blog post, checked

POST_MODEL = "qwen3.6-35b-a3b"
POST_DEVICE = "m1-max-64"
POST_CONTEXTS = (262144, 65536)
# What the post states (shared/reference/seed-post.txt); it writes "GB" throughout.
POST_WEIGHTS_GB = 21
POST_KV_GB = {262144: 48, 65536: 12}
POST_TOTAL_GB = {262144: 69, 65536: 33}
POST_WORKING_SET_GB = 54
POST_ARGV = ("-ngl", "999", "--flash-attn", "on", "-b", "4096", "-ub", "2048", "--fit", "off",
             "--cache-type-k", "bf16", "--cache-type-v", "bf16", "-n", "32768", "--jinja")
# A shape whose bf16 KV is the post's 192 KiB/token: Qwen2.5-14B (48 layers, 8 KV heads, head_dim 128),
# model-facts.md 1.4.
IMPLIED_SHAPE = {"layers": 48, "kv_heads": 8, "head_dim": 128, "example": "Qwen2.5-14B"}


@dataclass(frozen=True)
class ComparisonRow:
    item: str
    post_says: str
    kvbook_computes: str
    explanation: str


@dataclass(frozen=True)
class BlogComparison:
    """The post's figures next to kvbook's, for Qwen3.6-35B-A3B UD-Q4_K_M on a 64 GB M1 Max."""

    rows: tuple[ComparisonRow, ...]
    plans: tuple[Plan, ...]  # one per POST_CONTEXTS entry
    kv_bytes_per_token: int
    implied_kv_bytes_per_token: int

    def table(self) -> list[dict[str, str]]:
        return [{"item": r.item, "the post says": r.post_says, "kvbook computes": r.kvbook_computes,
                 "why": r.explanation} for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        from kvbook.plan.summary import plan_summary

        return {
            "model": POST_MODEL,
            "device": POST_DEVICE,
            "post": {"weights_gb": POST_WEIGHTS_GB, "kv_gb": {str(k): v for k, v in POST_KV_GB.items()},
                     "total_gb": {str(k): v for k, v in POST_TOTAL_GB.items()}, "working_set_gb": POST_WORKING_SET_GB},
            "scenarios": {str(p.memory.shape.n_ctx): plan_summary(p) for p in self.plans},
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "implied_kv_bytes_per_token": self.implied_kv_bytes_per_token,
            "rows": to_dict(self.rows),
        }


def fmt_bytes(n: float) -> str:
    """'5.00 GiB (5.37 GB)', or MiB below 1 GiB."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB ({n / 1e9:.2f} GB)"
    return f"{n / MiB:.1f} MiB"


def kv_bytes_per_token(arch: ModelArch, cache_type: str = "bf16") -> int:
    """K+V bytes one token adds to the main KV cache (attention layers only)."""
    return sum(row_bytes(cache_type, arch.head_k_at(il) * arch.n_head_kv[il])
               + row_bytes(cache_type, arch.head_v_at(il) * arch.n_head_kv[il])
               for il in range(arch.n_layer) if arch.has_kv(il))


def post_plans() -> tuple[ModelArch, Device, tuple[Plan, ...]]:
    """The post's command line at each of its contexts, planned on the m1-max-64 preset."""
    from kvbook.model.sources import load_model
    from kvbook.plan.devices import load_device
    from kvbook.plan.planner import make_plan

    arch, device = load_model(POST_MODEL), load_device(POST_DEVICE)
    plans = tuple(make_plan(arch, parse_server_args(["-m", POST_MODEL, "-c", str(c), *POST_ARGV]), device)
                  for c in POST_CONTEXTS)
    return arch, device, plans


def blog_post_comparison() -> BlogComparison:
    """Rows of (item, post says, kvbook computes, why), all kvbook numbers computed now from the presets."""
    arch, device, plans = post_plans()
    big, small = plans
    mb, ms = big.memory, small.memory
    budget = budget_of(device)
    n_attn = sum(arch.has_kv(il) for il in range(arch.n_layer))
    n_rec = sum(arch.is_recurrent)
    per_tok = kv_bytes_per_token(arch)
    kv_heads = next(arch.n_head_kv[il] for il in range(arch.n_layer) if arch.has_kv(il))
    attn_layer = per_tok // max(1, n_attn)
    all_attn_kv = attn_layer * arch.n_layer * POST_CONTEXTS[0]
    implied = POST_KV_GB[262144] * GiB // 262144
    implied_small = POST_KV_GB[65536] * GiB // 65536
    shape = IMPLIED_SHAPE
    shape_bytes = shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * 2
    rec_seq = mb.recurrent_bytes // max(1, mb.shape.n_seq)
    ckpt = mb.host_extras.checkpoint_bytes
    cram = mb.host_extras.cache_ram_bytes
    bw = device.pools[0].bandwidth_gbps or 0.0
    kv_ms = {c: (p.memory.kv_bytes / (bw * 1e9) * 1e3 if bw else float("nan")) for c, p in zip(POST_CONTEXTS, plans)}
    ws_sources = dict(device.sources)
    ratio = POST_KV_GB[262144] * GiB / mb.kv_bytes  # the post's GB are GiB (see the implied-shape row)

    def verdict_text(p: Plan) -> str:
        use = p.pools[0]
        return (f"{p.verdict.value}: {fmt_bytes(p.memory.start_bytes)} at start, {fmt_bytes(use.need_bytes)} with the "
                f"prompt cache and checkpoints full, of {use.budget_bytes / GiB:.2f} GiB "
                f"(headroom {use.headroom_bytes / GiB:.2f} GiB)")

    rows = [
        ComparisonRow(
            "Weights, UD-Q4_K_M", f"~{POST_WEIGHTS_GB} GB", fmt_bytes(mb.weights_bytes),
            f"Roughly right. The file is {mb.weights_bytes:,} bytes; the post's 21 matches it in GiB "
            f"({mb.weights_bytes / GiB:.1f}).",
        ),
        ComparisonRow(
            "KV cache at -c 262144, bf16", f"~{POST_KV_GB[262144]} GB", fmt_bytes(mb.kv_bytes),
            f"The post is about {ratio:.1f}x too high. Only {n_attn} of the {arch.n_layer} layers are attention "
            f"layers with a KV cache ({kv_heads} KV heads of {arch.head_k} dims): {per_tok:,} bytes per token. The other {n_rec} are Gated DeltaNet layers whose "
            "state has a fixed size whatever the context.",
        ),
        ComparisonRow(
            "KV cache at -c 65536, bf16", f"~{POST_KV_GB[65536]} GB", fmt_bytes(ms.kv_bytes),
            f"Same error at a quarter of the context: {per_tok:,} bytes x 65,536 tokens.",
        ),
        ComparisonRow(
            "What the post's KV arithmetic implies",
            f"{POST_KV_GB[262144]} GB / 262,144 = {POST_KV_GB[65536]} GB / 65,536 tokens",
            f"{implied:,} B/token = {shape['layers']} x {shape['kv_heads']} x {shape['head_dim']} x 2 x 2"
            + ("" if implied == implied_small == shape_bytes else " (does not factor exactly)"),
            f"Read as GiB, both figures are {implied // 1024} KiB per token: at 2 bytes for K and V that is "
            f"layers x KV heads x head dim = {implied // 4:,}, e.g. a dense {shape['layers']}-layer model with "
            f"{shape['kv_heads']} KV heads of {shape['head_dim']} like {shape['example']}. That is a different model. "
            f"Even if all {arch.n_layer} layers of this model kept a KV cache, it would be {fmt_bytes(all_attn_kv)} "
            "at 262,144 tokens.",
        ),
        ComparisonRow(
            "Total at -c 262144", f"~{POST_TOTAL_GB[262144]} GB", f"{fmt_bytes(mb.start_bytes)} at start; "
            f"{fmt_bytes(mb.total_bytes)} with run-time growth",
            f"Weights {mb.weights_bytes / GiB:.2f} + KV {mb.kv_bytes / GiB:.2f} + "
            f"recurrent {mb.recurrent_bytes / GiB:.2f} + compute {mb.compute.bytes / GiB:.2f} + "
            f"logits {mb.output_bytes / GiB:.3f} GiB; then up to "
            f"{mb.host_extras.bytes / GiB:.2f} GiB of prompt cache and context checkpoints as the server runs.",
        ),
        ComparisonRow(
            "Total at -c 65536", f"~{POST_TOTAL_GB[65536]} GB", f"{fmt_bytes(ms.start_bytes)} at start; "
            f"{fmt_bytes(ms.total_bytes)} with run-time growth",
            "The post's total is its weights plus its KV figure; kvbook adds compute, recurrent state and run-time growth.",
        ),
        ComparisonRow(
            "GPU working set on a 64 GB M1 Max", f"{POST_WORKING_SET_GB} GB",
            f"{budget / MiB:,.0f} MiB ({budget / GiB:.0f} GiB)",
            "kvbook plans against the measured Metal recommendedMaxWorkingSetSize of a 64 GB M1 Max "
            f"({ws_sources.get('budget_mib', 'device preset')}). 54 GB needs a raised limit "
            "(sudo sysctl iogpu.wired_limit_mb=<MiB>).",
        ),
        ComparisonRow(
            "Does -c 262144 fit?", "No: 15 GB over the working set", verdict_text(big),
            "It fits even in the lower, measured limit. The start allocation is what must fit for the server to start; "
            "the rest grows as prompts are cached.",
        ),
        ComparisonRow(
            "Does -c 65536 fit?", "Yes, well within", verdict_text(small),
            f"Dropping to 65,536 saves {(mb.start_bytes - ms.start_bytes) / GiB:.2f} GiB at start: "
            f"{(mb.kv_bytes - ms.kv_bytes) / GiB:.2f} GiB of KV and "
            f"{(mb.compute.bytes - ms.compute.bytes) / GiB:.2f} GiB of compute buffer.",
        ),
        ComparisonRow(
            "Slowdown at 262K: KV cache", "the cause: it pushes the total past the working set", fmt_bytes(mb.kv_bytes),
            "Not the cause: a 5 GiB cache sits comfortably inside the working set.",
        ),
        ComparisonRow(
            "Slowdown at 262K: compute buffer at -ub 2048", "not mentioned",
            f"{fmt_bytes(mb.compute.bytes)} at 262K vs {fmt_bytes(ms.compute.bytes)} at 65K",
            f"Grows with context: the flash-attention mask is context x ubatch (2048). An estimate, "
            f"worst error seen {mb.compute.error_pct:.0f}%.",
        ),
        ComparisonRow(
            "Slowdown at 262K: recurrent state of 4 auto slots", "not mentioned",
            f"{fmt_bytes(mb.recurrent_bytes)} = {mb.shape.n_seq} x {fmt_bytes(rec_seq)}",
            f"Without -np, llama-server opens {mb.shape.n_seq} slots sharing one KV; each slot keeps its own "
            "DeltaNet state. Small, and the same at every context.",
        ),
        ComparisonRow(
            "Slowdown at 262K: prompt cache and context checkpoints", "not mentioned",
            f"up to {fmt_bytes(cram)} prompt cache + {fmt_bytes(ckpt)} checkpoints",
            f"--cache-ram defaults to 8192 MiB, and each slot may keep up to 32 checkpoints of its state. They live in host "
            f"RAM, which on Apple silicon is the same memory: together up to {fmt_bytes(mb.total_bytes)} of the 64 GB, "
            "leaving less for macOS and other apps as they fill.",
        ),
        ComparisonRow(
            "Slowdown at 262K: attention cost", "not mentioned",
            f"{fmt_bytes(mb.kv_bytes)} of KV read per generated token when full "
            f"(~{kv_ms[262144]:.0f} ms at {bw:.0f} GB/s) vs {kv_ms[65536]:.1f} ms at 65K",
            "The likely cause. -c only caps the context; what slows generation is a long conversation filling it. "
            "Every new token reads the whole filled KV cache, and prompt processing grows with the square of the "
            "prompt length. A 65K cap stops conversations from growing that long.",
        ),
    ]
    return BlogComparison(rows=tuple(rows), plans=plans, kv_bytes_per_token=per_tok, implied_kv_bytes_per_token=implied)
