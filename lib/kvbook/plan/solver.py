"""The placement solver: for a model, devices with budgets and the flags the user fixed, every placement
llama.cpp could be given (-ngl, --n-cpu-moe, an exact -ts layer split, -c at the chosen -np, the KV cache
type when the user left it open), ranked by an objective, each with its llama-server argv, and every option
that does not fit with the reason.

Objectives: `max-context` (the largest -c that starts at the chosen slots) and `fastest-decode` (the fewest
bytes read from host RAM per generated token: the roofline's rule, every dense weight and n_used/n_expert of
the experts of each CPU layer, plus the KV cache kept on the CPU; with -c open a placement must reach
llama.cpp --fit's minimum context, 4096 per slot, or the training context if smaller).

A search runs a fast per-layer model of the planner (the same layer assignment, cache and compute rules);
every placement it returns is then planned by `planner.place` itself, so a ranked row is exactly what
`kvbook plan` says for its argv.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from kvbook.errors import BadInput
from kvbook.interface import (
    Alternative,
    Device,
    FlashAttn,
    MemoryPlan,
    MiB,
    ModelArch,
    Note,
    Plan,
    PoolUsage,
    ServerFlags,
    Verdict,
)
from kvbook.memory.roofline import expert_read_fraction
from kvbook.memory.rules import CTX_PAD, plan_memory
from kvbook.plan.devices import effective_device, split_shares, with_rpc
from kvbook.plan.flags import fields_set, replace
from kvbook.plan.placement import (
    CPU,
    assign,
    device_compute_bound,
    estimated_groups,
    layer_cache_bytes,
)
from kvbook.plan.planner import override_devices, place, rpc_compute, worst
from kvbook.plan.weights import overrides_as_cpu_moe, pinned_groups

Objective = Literal["max-context", "fastest-decode"]
OBJECTIVES = ("max-context", "fastest-decode")
FIT_MIN_CTX = 4096  # llama.cpp --fit-ctx default: --fit never lowers the context below this (per slot)
QUANTIZED_KV = "q8_0"


@dataclass(frozen=True)
class Placement:
    """One placement that starts: its llama-server argv, context, layers and host reads per token."""

    rank: int
    argv: tuple[str, ...]
    n_ctx: int
    n_gpu_layers: int  # as a count of the n_layer + 1 layers (the output layer counts)
    n_cpu_moe: int  # -1: --cpu-moe
    tensor_split: tuple[float, ...]  # () = llama.cpp's split by free memory
    cache_type: str
    host_read_bytes: int  # bytes read from host RAM per generated token, context full
    verdict: Verdict
    pools: tuple[PoolUsage, ...]


@dataclass(frozen=True)
class Rejected:
    """A placement that does not start (or misses the objective's bar), and why (a rejected.* code and its text)."""

    option: str
    reason: Note


@dataclass(frozen=True)
class Solution:
    objective: str
    fixed: tuple[str, ...]  # the fields the user's flags set, kept as given
    searched: int  # placements evaluated
    fitting: int  # how many of them fit
    placements: tuple[Placement, ...]  # the best first, at most `top`
    rejected: tuple[Rejected, ...]


@dataclass(frozen=True)
class _Option:
    ngl: int
    ncmoe: int
    cache: str
    split: tuple[float, ...] | None = None  # None: the greedy exact split at each context; () default split


@dataclass(frozen=True)
class _Model:
    """The per-layer sizes one search needs, read once."""

    arch: ModelArch
    n_all: int
    dense: tuple[int, ...]  # non-expert bytes of each layer
    experts: tuple[int, ...]
    output: int  # the output layer's bytes on its device (a tied output's copy of the embeddings included)
    output_host: int  # the output layer's bytes when it stays on the CPU
    host_fixed: int  # token embeddings and anything ungrouped: always on the CPU
    devices: tuple[str, ...]  # offload pools, llama.cpp's order
    kinds: tuple[str, ...]
    budgets: tuple[int, ...]
    host: str
    host_budget: int
    pinned: tuple[tuple[str, int], ...] = ()  # bytes the user's -ot entries keep on a device whatever -ngl is


def _model(arch: ModelArch, device: Device, flags: ServerFlags) -> _Model:
    groups = dict(arch.tensor_groups) or estimated_groups(arch)
    pinned: dict[str, int] = {}
    if flags.tensor_overrides and arch.tensors:
        groups, pinned = pinned_groups(arch.tensors, flags.tensor_overrides, override_devices(device))
    elif flags.tensor_overrides:  # shapes only: whole layers' experts on the CPU, as --n-cpu-moe would
        moe = overrides_as_cpu_moe(flags.tensor_overrides, arch.source)
        for key in [k for k in groups if k.endswith(".exps") and (moe < 0 or int(k[1:].split(".")[0]) < moe)]:
            pinned[CPU] = pinned.get(CPU, 0) + groups[key]
            groups[key] = 0
    n_all = arch.n_layer + arch.n_layer_nextn
    dense, experts = [0] * n_all, [0] * n_all
    host_fixed = 0
    for key, size in groups.items():
        if key.startswith("L"):
            il = int(key[1:].split(".")[0])
            if il < n_all:
                (experts if key.endswith(".exps") else dense)[il] += size
                continue
        if key != "output":
            host_fixed += size
    out = groups.get("output", 0)
    tied = out < groups.get("token_embd", 0) // 100
    offload = [] if device.unified else [p for p in device.pools if p.kind in ("gpu", "rpc")]
    host = device.pools[0] if device.unified else next((p for p in device.pools if p.kind == "host"), device.pools[0])
    return _Model(arch, n_all, tuple(dense), tuple(experts), out + (groups.get("token_embd", 0) if tied else 0), out,
                  host_fixed, tuple(p.name for p in offload), tuple(p.kind for p in offload),
                  tuple(p.budget_bytes for p in offload), host.name, host.budget_bytes,
                  tuple((host.name if d == CPU else d, n) for d, n in sorted(pinned.items())))


class _Search:
    """Memoised memory plans and the fast per-layer check over one model, device and flag set."""

    def __init__(self, arch: ModelArch, flags: ServerFlags, device: Device, model: _Model):
        self.arch, self.flags, self.device, self.m = arch, flags, device, model
        self._memory: dict[tuple[int, str], tuple[MemoryPlan, tuple[tuple[int, int], ...], int]] = {}
        # several offload devices (or RPC): -ts sizing reserves the per-device compute bound on each
        self.per_device = "rpc" in model.kinds or len(model.devices) > 1

    def flags_for(self, ctx: int, cache: str) -> ServerFlags:
        changes: dict[str, object] = {"ctx": ctx}  # ServerFlags field -> value, for replace
        if cache:
            changes.update(type_k=cache, type_v=cache)
            if self.flags.flash_attn is not FlashAttn.ON:
                changes["flash_attn"] = FlashAttn.ON
        return replace(self.flags, **changes)

    def memory(self, ctx: int, cache: str) -> tuple[MemoryPlan, tuple[tuple[int, int], ...], int]:
        key = (ctx, cache)
        if key not in self._memory:
            mem = plan_memory(self.arch, self.flags_for(ctx, cache))
            self._memory[key] = (mem, layer_cache_bytes(self.arch, mem),
                                 device_compute_bound(self.arch, mem) if self.per_device else mem.compute.bytes)
        return self._memory[key]

    def split_for(self, opt: _Option, ctx: int) -> tuple[float, ...]:
        """The -ts layer counts that fill the offload devices in order (llama.cpp gives device i the layers
        up to its cumulative share, so counts are an exact split); the last device takes the rest."""
        m = self.m
        if len(m.devices) < 2 or opt.split is not None or opt.ngl == 0:
            return opt.split or ()
        _, caches, compute = self.memory(ctx, opt.cache)
        first = max(m.n_all + 1 - opt.ngl, 0)
        costs = [self._layer_cost(il, opt, caches) for il in range(first, m.n_all)] + [m.output]
        counts, i = [], 0
        for d, budget in enumerate(m.budgets):
            if d == len(m.budgets) - 1:
                counts.append(len(costs) - i)
                break
            room, n = budget - compute, 0
            while i < len(costs) and costs[i] <= room:
                room -= costs[i]
                i, n = i + 1, n + 1
            counts.append(n)
        return tuple(counts)

    def _layer_cost(self, il: int, opt: _Option, caches: tuple[tuple[int, int], ...]) -> int:
        cost = self.m.dense[il] + (0 if opt.ncmoe < 0 or il < opt.ncmoe else self.m.experts[il])
        return cost + (0 if self.flags.no_kv_offload else caches[il][0] + caches[il][1])

    def needs(self, opt: _Option, ctx: int) -> tuple[dict[str, int], tuple[float, ...]]:
        """Start bytes per pool (host included) for this option at -c ctx, and the split used."""
        m = self.m
        mem, caches, compute = self.memory(ctx, opt.cache)
        if not self.per_device and m.devices and opt.ngl >= m.n_all + 1 and not opt.ncmoe and not m.pinned:
            # everything offloaded to the one local GPU: the planner puts all weights, KV and compute there
            kv = mem.kv_bytes + mem.recurrent_bytes
            need = {m.host: mem.output_bytes + (kv if self.flags.no_kv_offload else 0), **dict.fromkeys(m.devices, 0)}
            need[m.devices[0]] += mem.weights_bytes + compute + (0 if self.flags.no_kv_offload else kv)
            return need, ()
        split = self.split_for(opt, ctx)
        off = assign(m.n_all, opt.ngl, m.devices, _shares(split, m))
        need = {m.host: m.host_fixed + mem.output_bytes, **dict.fromkeys(m.devices, 0)}
        for pool, n in m.pinned:
            need[pool] += n
        for il, dev in enumerate(off.layers):
            pool = m.host if dev == CPU else dev
            cpu_exps = opt.ncmoe < 0 or il < opt.ncmoe
            need[pool] += m.dense[il] + (0 if cpu_exps else m.experts[il])
            if cpu_exps:
                need[m.host] += m.experts[il]
            need[m.host if self.flags.no_kv_offload else pool] += caches[il][0] + caches[il][1]
        need[m.host if off.output == CPU else off.output] += m.output if off.output != CPU else m.output_host
        busy = {d for d in (*off.layers, off.output) if d != CPU}
        if busy:  # the planner's per-device estimate (planner.rpc_compute), so both agree on what fits
            estimate = rpc_compute(self.arch, replace(self.flags_for(ctx, opt.cache), cpu_moe_layers=opt.ncmoe), mem, off)
            for d in busy:
                need[d] += estimate.get(d, 0)
            need[m.host] += estimate.get(CPU, 0)
        else:
            need[m.host] += mem.compute.bytes
        return need, split

    def fits(self, opt: _Option, ctx: int) -> bool:
        try:
            need, _ = self.needs(opt, ctx)
        except BadInput:
            return False
        budgets = dict(zip(self.m.devices, self.m.budgets))
        budgets[self.m.host] = self.m.host_budget
        return all(v <= budgets[k] for k, v in need.items())


def _shares(split: tuple[float, ...], m: _Model) -> list[float]:
    """The layer shares over the offload devices: -ts as llama.cpp pads it (devices.split_shares), else the budgets."""
    return (split_shares(split, len(m.devices)) if m.devices else []) or [float(b) for b in m.budgets]


def _options(arch: ModelArch, flags: ServerFlags, model: _Model, fixed: frozenset[str]) -> list[_Option]:
    """The placements to try: -ngl over every count (with --n-cpu-moe at the user's value), and for MoE
    models every --n-cpu-moe with all layers offloaded; each at every open cache type."""
    full = model.n_all + 1
    if not model.devices:
        ngls = [0]
    elif "gpu_layers" in fixed and flags.gpu_layers != "auto":
        ngls = [full if flags.gpu_layers in ("all", "-1") else min(int(flags.gpu_layers), full)]
    else:
        ngls = list(range(full, -1, -1))
    moe_open = bool(arch.n_expert) and "cpu_moe_layers" not in fixed and bool(model.devices)
    base_moe = flags.cpu_moe_layers
    pairs = [(n, base_moe) for n in ngls]
    if moe_open:
        pairs += [(ngls[0], k) for k in range(1, arch.n_layer)] + [(ngls[0], -1)]
    caches = [""]  # the user's own cache types
    open_types = not {"type_k", "type_v", "flash_attn"} & fixed or (
        not {"type_k", "type_v"} & fixed and flags.flash_attn is not FlashAttn.OFF)
    if open_types and (flags.type_k, flags.type_v) != (QUANTIZED_KV, QUANTIZED_KV):
        caches.append(QUANTIZED_KV)
    split = tuple(int(x) if float(x).is_integer() else x for x in flags.tensor_split) if "tensor_split" in fixed else None
    return [_Option(n, k, c, split) for n, k in pairs for c in caches]


def _describe(opt: _Option, model: _Model) -> str:
    parts = [f"-ngl {'all' if opt.ngl >= model.n_all + 1 else opt.ngl}"]
    if opt.ncmoe:
        parts.append("--cpu-moe" if opt.ncmoe < 0 else f"--n-cpu-moe {opt.ncmoe}")
    if opt.split:
        parts.append("-ts " + ",".join(map(str, opt.split)))
    if opt.cache:
        parts.append(f"-ctk {opt.cache} -ctv {opt.cache}")
    return " ".join(parts)


def _host_reads(s: _Search, opt: _Option, ctx: int) -> int:
    """Bytes read from host RAM per token at a full context (see the module docstring)."""
    m = s.m
    mem, caches, _ = s.memory(ctx, opt.cache)
    split = s.split_for(opt, ctx)
    off = assign(m.n_all, opt.ngl, m.devices, _shares(split, m)) if m.devices else assign(m.n_all, 0, (), ())
    frac = expert_read_fraction(s.arch)
    total = 0
    for il, dev in enumerate(off.layers):
        on_cpu = dev == CPU
        cpu_exps = on_cpu or opt.ncmoe < 0 or il < opt.ncmoe
        total += (m.dense[il] if on_cpu else 0) + (int(m.experts[il] * frac) if cpu_exps else 0)
        if on_cpu or s.flags.no_kv_offload:
            total += caches[il][0] + caches[il][1]
    pinned_host = sum(n for pool, n in m.pinned if pool == m.host)  # -ot tensors kept on the CPU are read there too
    return total + pinned_host + (m.output_host if off.output == CPU else 0)


def solve(arch: ModelArch, flags: ServerFlags, device: Device, objective: str = "max-context",
          top: int = 5) -> Solution:
    """Ranked placements of `flags` on `device` that start, and every option that does not, with why."""
    if objective not in OBJECTIVES:
        raise BadInput(f"--objective: unknown '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    device = with_rpc(device, flags.rpc)  # binds the --rpc endpoints (a no-op without RPC devices)
    device = effective_device(device, flags)
    if "rpc" in {p.kind for p in device.pools} and not arch.tensor_groups:
        raise BadInput(f"{arch.source}: a multi-device plan needs the GGUF's tensors (a preset or config.json has "
                       "no per-layer sizes); pass the GGUF path or URL")
    fixed = fields_set(flags)
    model = _model(arch, device, flags)
    search = _Search(arch, flags, device, model)
    slots = flags.parallel if flags.parallel > 0 else 1
    step = CTX_PAD * (slots if flags.parallel > 0 and not flags.kv_unified else 1)
    ctx_fixed = "ctx" in fixed and flags.ctx > 0
    hi = max(1, arch.n_ctx_train // step)
    floor_ctx = 0 if ctx_fixed or objective != "fastest-decode" else min(FIT_MIN_CTX * slots, hi * step)
    found: list[tuple[_Option, int]] = []
    rejected: list[Rejected] = []
    options = _options(arch, flags, model, fixed)
    for opt in options:
        ctx = _largest(search, opt, flags.ctx if ctx_fixed else 0, step, hi)
        if not ctx:
            rejected.append(Rejected(_describe(opt, model), _why(search, opt, flags.ctx if ctx_fixed else step)))
        elif ctx < floor_ctx:
            rejected.append(Rejected(_describe(opt, model), Note(
                "rejected.under-fit-minimum", f"largest context {ctx} is under --fit's minimum {floor_ctx}")))
        else:
            found.append((opt, ctx))
    ranked = _rank(search, found, objective)
    out: list[Placement] = []
    for opt, ctx in ranked:  # planned by the planner; a few more than shown, so 'fits' can go before 'tight'
        if len(out) >= 2 * top:
            break
        placed = _verify(search, opt, ctx, 0, 0 if ctx_fixed else step)
        if isinstance(placed, Rejected):
            rejected.append(placed)
        else:
            out.append(placed)
    def goal(p: Placement) -> tuple[int, bool]:
        """The objective first (larger context, or fewer bytes read from the host), fitting before tight."""
        return (-p.n_ctx if objective == "max-context" else p.host_read_bytes), p.verdict is not Verdict.FITS

    out = sorted(out, key=goal)[:top]  # stable: keeps the rest of the order
    out = [dataclasses.replace(p, rank=i) for i, p in enumerate(out, start=1)]
    return Solution(objective=objective, fixed=tuple(sorted(fixed - {"model"})), searched=len(options),
                    fitting=len(found), placements=tuple(out), rejected=tuple(rejected))


def _largest(s: _Search, opt: _Option, ctx_fixed: int, step: int, hi: int) -> int:
    """The fixed -c if it fits, else the largest fitting multiple of `step` (0: none); fits only worsens
    as the context grows, so this bisects."""
    if ctx_fixed:
        return ctx_fixed if s.fits(opt, ctx_fixed) else 0
    if s.fits(opt, hi * step):
        return hi * step
    if not s.fits(opt, step):
        return 0
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if s.fits(opt, mid * step) else (lo, mid)
    return lo * step


def _why(s: _Search, opt: _Option, ctx: int) -> Note:
    """Why an option does not start at `ctx`: the planner refuses it by name, or the devices over their budgets."""
    try:
        need, _ = s.needs(opt, ctx)
    except BadInput as exc:
        return Note("rejected.refused", str(exc))
    budgets = dict(zip(s.m.devices, s.m.budgets))
    budgets[s.m.host] = s.m.host_budget
    over = [f"{k} needs {v / MiB:.0f} of {budgets[k] / MiB:.0f} MiB" for k, v in need.items() if v > budgets[k]]
    return Note("rejected.does-not-start", f"does not start even at -c {ctx}: " + "; ".join(over))


def _rank(s: _Search, found: list[tuple[_Option, int]], objective: str) -> list[tuple[_Option, int]]:
    def flag_count(opt: _Option) -> int:
        return (opt.ncmoe != 0) + bool(opt.split) + bool(opt.cache)

    if objective == "max-context":
        key = lambda f: (-f[1], _host_reads(s, f[0], f[1]), flag_count(f[0]))  # noqa: E731
    else:
        key = lambda f: (_host_reads(s, f[0], f[1]), -f[1], flag_count(f[0]))  # noqa: E731
    return sorted(found, key=key)


def _verify(s: _Search, opt: _Option, ctx: int, rank: int, step: int = 0) -> Placement | Rejected:
    """The placement planned by the planner itself: its rows. Where the planner needs more than the fast model
    (the CPU's mapped range, say), the largest context it accepts below `ctx` (multiples of `step`; none
    with a fixed -c), else a rejection with the planner's reason."""
    placed = _planned(s, opt, ctx, rank)
    if not isinstance(placed, Rejected) or not step or ctx <= step:
        return placed
    lo, hi = 0, ctx // step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if not isinstance(_planned(s, opt, mid * step, rank), Rejected) else (lo, mid)
    return _planned(s, opt, lo * step, rank) if lo else placed


def _planned(s: _Search, opt: _Option, ctx: int, rank: int) -> Placement | Rejected:
    m = s.m
    split = s.split_for(opt, ctx)
    changes: dict[str, object] = {"gpu_layers": "all" if opt.ngl >= m.n_all + 1 else str(opt.ngl), "fit": False}
    if opt.ncmoe != s.flags.cpu_moe_layers:
        changes["cpu_moe_layers"] = opt.ncmoe
    if split and tuple(split) != tuple(s.flags.tensor_split):
        changes["tensor_split"] = tuple(float(x) for x in split)
    flags = replace(s.flags_for(ctx, opt.cache), **changes)
    if not m.devices:
        flags = replace(flags, gpu_layers=s.flags.gpu_layers)
    try:
        pools = place(s.arch, flags, plan_memory(s.arch, flags), s.device)
    except BadInput as exc:
        return Rejected(_describe(opt, m), Note("rejected.refused", str(exc)))
    verdict = worst(pools)
    if verdict is Verdict.DOES_NOT_FIT:
        over = [f"{u.pool} needs {u.need_bytes / MiB:.0f} of {u.budget_bytes / MiB:.0f} MiB" for u in pools
                if u.verdict is Verdict.DOES_NOT_FIT]
        return Rejected(_describe(opt, m), Note("rejected.planner-check", f"the planner's check at -c {ctx}: "
                                                + "; ".join(over)))
    argv = flags.argv[1:] if flags.argv and not flags.argv[0].startswith("-") else flags.argv
    return Placement(rank=rank, argv=tuple(argv), n_ctx=ctx, n_gpu_layers=opt.ngl, n_cpu_moe=opt.ncmoe,
                     tensor_split=tuple(split), cache_type=opt.cache or s.flags.type_k, host_read_bytes=_host_reads(s, opt, ctx),
                     verdict=verdict, pools=pools)


def host_read_bytes(arch: ModelArch, flags: ServerFlags, device: Device) -> int:
    """Bytes read from host RAM per generated token for a given command line (the fastest-decode measure),
    to score a placement chosen elsewhere (llama.cpp --fit's) on the solver's scale."""
    device = with_rpc(device, flags.rpc)  # binds the --rpc endpoints (a no-op without RPC devices)
    device = effective_device(device, flags)
    model = _model(arch, device, flags)
    full = model.n_all + 1
    ngl = 0 if not model.devices else full if flags.gpu_layers in ("all", "-1", "auto") else min(int(flags.gpu_layers), full)
    split = tuple(int(x) if float(x).is_integer() else x for x in flags.tensor_split)
    search = _Search(arch, flags, device, model)
    return _host_reads(search, _Option(ngl, flags.cpu_moe_layers, "", split), flags.ctx)


def with_placement_alternative(plan: Plan, arch: ModelArch, flags: ServerFlags, device: Device) -> Plan:
    """A plan that does not fit on a device with offload pools gains the solver's best placement of the flags the
    user left open (-ngl, --n-cpu-moe, -ts) as an alternative: what llama-server's --fit would look for at start."""
    offload = not device.unified and any(p.kind in ("gpu", "rpc") for p in plan.device.pools)
    if plan.verdict is Verdict.FITS or not offload or any(a.verdict is Verdict.FITS for a in plan.alternatives):
        return plan
    try:
        solution = solve(arch, flags, device, "max-context", 1)
    except BadInput:
        return plan
    if not solution.placements:
        note = Note("solve.no-placement", f"no placement of -ngl / --n-cpu-moe / -ts starts on {plan.device.name} "
                    f"either (searched {solution.searched}); `kvbook plan --solve` lists every option and why it "
                    "does not start")
        return dataclasses.replace(plan, notes=(*plan.notes, note))
    best = solution.placements[0]
    moved = [f"-ngl {'all' if best.n_gpu_layers >= arch.n_layer + arch.n_layer_nextn + 1 else best.n_gpu_layers}"]
    if best.n_cpu_moe:
        moved.append("--cpu-moe" if best.n_cpu_moe < 0 else f"--n-cpu-moe {best.n_cpu_moe}")
    if best.tensor_split:
        moved.append("-ts " + ",".join(map(str, best.tensor_split)))
    if best.cache_type and best.cache_type != flags.type_k:
        moved.append(f"-ctk {best.cache_type} -ctv {best.cache_type}")
    if best.n_ctx != plan.memory.shape.n_ctx:
        moved.append(f"-c {best.n_ctx}")
    alt = Alternative(change="placement (kvbook plan --solve; what --fit would look for at start): " + " ".join(moved),
                      flags=best.argv, n_ctx=best.n_ctx, total_bytes=sum(u.need_bytes for u in best.pools),
                      verdict=best.verdict)
    return dataclasses.replace(plan, alternatives=(*plan.alternatives, alt))
