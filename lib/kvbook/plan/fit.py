"""What llama-server's `--fit` (on by default) will do to a command line at start, predicted over kvbook's own
per-device memory model: the pinned build's algorithm (common/fit.cpp `common_params_fit_impl`) step by step,
with each of its test allocations replaced by kvbook's plan of the same flags.

fit changes only what the user left unset. In order: (1) nothing when every device keeps --fit-target MiB
(1024 by default) free; (2) an unset -c is lowered, by linear interpolation between the training context and
--fit-ctx (4096) per stream, aligned to 256 per stream; on one device (or none) that ends it; (3) otherwise,
if -ngl, -ts (several devices) and -ot / --cpu-moe / --n-cpu-moe are all unset, layers are filled onto the
devices back to front (for a MoE model with every layer's experts on the CPU but the first), bisecting each
device's count by false position; (4) for a MoE model whose dense weights all fit, layers then get their
experts back front to front, and part of one more layer (ffn_up / ffn_gate kept, or attention only) is tried.
A step that finds a flag the user set gives up ("fit fails"), keeping the context it already lowered; the
server then starts with the flags as they are.

Pure: devices arrive as data. A device's free memory is its pool's budget (a preset's figure stands for what
the backend reports free; an RPC device's for `--rpc-gib`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbook.errors import BadInput
from kvbook.interface import Device, FitOutcome, MemoryPlan, MiB, ModelArch, Note, PoolUsage, ServerFlags
from kvbook.memory.rules import context_shape, plan_memory
from kvbook.plan.flags import fields_set, replace

UINT32_MAX = 2**32 - 1
# common/fit.cpp common_layer_fraction_t: what of the first partial layer of a device stays on it
ATTN, UP, GATE, MOE = 1, 2, 3, 4
_FRACTION = {ATTN: "attention only", UP: "attention + ffn_up", GATE: "attention + ffn_up + ffn_gate",
             MOE: "all but the experts"}
_PATTERN = {ATTN: r"blk\.{il}\.ffn_(gate|up|gate_up|down).*", UP: r"blk\.{il}\.ffn_(gate|gate_up|down).*",
            GATE: r"blk\.{il}\.ffn_down.*", MOE: r"blk\.{il}\.ffn_(up|down|gate_up|gate)_(ch|)exps"}
_OVERFLOW = {ATTN: "ATTN", UP: "UP", GATE: "GATE", MOE: "MOE"}  # as fit's log names them
_MOE_ALL = r"blk\.\d+\.ffn_(up|down|gate_up|gate)_(ch|)exps"


@dataclass(frozen=True)
class _Ngl:
    """fit's ngl_t: a device's layer count, of which `n_part` (its first ones after the full layers) are partial."""

    n_layer: int = 0
    n_part: int = 0
    overflow: int = MOE  # of the first partial layer; the others keep everything but their experts

    @property
    def n_full(self) -> int:
        return self.n_layer - self.n_part


class _Fails(Exception):
    """fit gives up (common_params_fit_exception): the server starts with the flags as they are by then."""


class _Unpredicted(Exception):
    """A step kvbook cannot size (said why): the plan keeps the flags as given."""


# the planner's placement of one candidate (plan/planner.py place): kvbook's stand-in for fit's test allocation
Place = Callable[[ModelArch, ServerFlags, MemoryPlan, Device], tuple[PoolUsage, ...]]


def _cdiv(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _u32(x: int) -> int:
    """An int64 converted to uint32_t, as C++ does it (a negative wraps)."""
    return x % 2**32


class _Fit:
    """One prediction: the model, the user's flags, the devices, and kvbook's plan of any candidate."""

    def __init__(self, arch: ModelArch, flags: ServerFlags, device: Device, place: Place):
        self.arch, self.flags, self.device, self.place = arch, flags, device, place
        self.fixed = fields_set(flags)
        self.names = [device.pools[0].name] if device.unified else [
            p.name for p in device.pools if p.kind in ("gpu", "rpc")]  # the offload devices, in llama.cpp's order
        self.nd = len(self.names)
        host = next((p for p in device.pools if p.kind == "host"), device.pools[0])
        self.host = host
        budgets = {p.name: p.budget_bytes for p in device.pools}
        self.free = [budgets[n] for n in self.names]
        given = list(flags.fit_target_mib) or [1024]
        per = [given[0]] * max(self.nd, 1) if len(given) == 1 else [
            given[i] if i < len(given) else 1024 for i in range(max(self.nd, 1))]
        self.margins = [m * MiB for m in per]
        self.hp_ngl = arch.n_layer
        self.moe = bool(arch.n_expert)
        self.exact = bool(arch.tensors)
        kinds = {p.name: p.kind for p in device.pools}
        self.bufts = [n if kinds.get(n) != "rpc" else "RPC0" + n[n.index("["):] for n in self.names]
        self.ctx = flags.ctx
        self.changes: list[str] = []
        self.use: list[int] = []
        self.caveats: list[str] = []  # what kvbook could not size exactly, said after the changes
        self.evaluations = 0
        self.known: dict[ServerFlags, tuple[PoolUsage, ...]] = {}  # plans made, by flags

    # ---- kvbook's plan of one candidate: fit's common_get_device_memory_data --------------------------------
    def used(self, flags: ServerFlags) -> list[int]:
        """Model + context + compute bytes per device (fit's measure), or on the host when there is no device."""
        if flags not in self.known:
            self.evaluations += 1
            self.known[flags] = self.place(self.arch, flags, plan_memory(self.arch, flags), self.device)
        usages = {u.pool: u for u in self.known[flags]}
        pools = self.names or [self.host.name]
        # fit's host "model" figure leaves out the CPU_REPACK copies (llama-fit-params' Host column, checked in
        # shared/reference/llama-cpp-memory.md 9): they are not counted against system memory here either
        return [usages[n].weights_bytes - usages[n].repack_bytes + usages[n].kv_bytes + usages[n].recurrent_bytes
                + usages[n].compute_bytes for n in pools]

    def at_ctx(self, ctx: int) -> ServerFlags:
        return replace(self.flags, ctx=ctx)

    def measure(self, ngl: list[_Ngl], bufts: list[int | None]) -> list[int]:
        """Bytes per device for one of fit's layer assignments. Where a partial layer keeps only part of its dense
        FFN (UP / GATE / ATTN), the planner bounds every device's compute (dense matmuls on the CPU are not in its
        calibration); fit moves one layer's worth, so the compute is taken from the same assignment without it."""
        use = self.used(self.layered(ngl, bufts))
        if not any(n.n_part and n.overflow != MOE for n in ngl):
            return use
        plain = [dataclasses.replace(n, overflow=MOE) for n in ngl]
        self.used(self.layered(plain, [None] * self.nd))
        exact = {u.pool: u for u in self.known[self.layered(ngl, bufts)]}
        base = {u.pool: u for u in self.known[self.layered(plain, [None] * self.nd)]}
        return [exact[n].weights_bytes + exact[n].kv_bytes + exact[n].recurrent_bytes + base[n].compute_bytes
                for n in self.names]

    def layered(self, ngl: list[_Ngl], bufts: list[int | None], as_fit: bool = False) -> ServerFlags:
        """fit's set_ngl_tensor_split_tbo: -ngl, -ts per device (several), and its -ot list, as kvbook flags
        (`as_fit`: its -ot list even where kvbook plans the same bytes another way)."""
        total = sum(n.n_layer for n in ngl)
        changes: dict[str, object] = {"gpu_layers": str(total)}  # ServerFlags field -> value, for replace
        if self.nd > 1:
            changes["tensor_split"] = tuple(float(n.n_layer) for n in ngl) if total else ()
        il0 = self.hp_ngl + 1 - total
        overrides: list[tuple[str, str]] = []
        cpu_expert_layers = 0
        for d, n in enumerate(ngl):
            il0 += n.n_full
            for il in range(il0, il0 + n.n_part):
                if il >= self.hp_ngl:  # fit names the output layer too; no tensor matches it
                    continue
                fraction = n.overflow if il == il0 else MOE
                to = bufts[d] if il == il0 else None
                overrides.append((_PATTERN[fraction].format(il=il), "CPU" if to is None else self.bufts[to]))
                cpu_expert_layers += 1
                if fraction != MOE and not self.exact and not as_fit:
                    raise _Unpredicted("part of a layer's dense FFN moved")
            il0 += n.n_part
        if self.exact or as_fit:
            changes["tensor_overrides"] = tuple(overrides)
        elif overrides:
            if self.nd > 1:
                raise _Unpredicted(f"fit moves single layers' experts over {self.nd} devices; {self.arch.source} has no "
                                   "GGUF tensors to size that (pass the GGUF path or URL)")
            # one device, experts of the same size in every layer: the bytes of --n-cpu-moe with as many layers
            changes["cpu_moe_layers"] = (self.hp_ngl + 1 - total) + cpu_expert_layers
        return replace(self.flags_now(), **changes)

    def flags_now(self) -> ServerFlags:
        return self.at_ctx(self.ctx) if self.ctx != self.flags.ctx else self.flags

    # ---- the algorithm ---------------------------------------------------------------------------------------
    def run(self) -> ServerFlags:
        arch, flags = self.arch, self.flags
        if flags.split_mode == "tensor":
            raise _Fails("llama_params_fit is not implemented for SPLIT_MODE_TENSOR")
        shape = context_shape(arch, flags)
        n_streams = 1 if shape.kv_unified else max(1, shape.n_seq)
        ctx_auto = flags.ctx == 0
        ctx_min = UINT32_MAX if ("ctx" in self.fixed and flags.ctx == 0) else flags.fit_ctx
        n_ctx_max = min(arch.n_ctx_train * n_streams, UINT32_MAX)
        n_ctx_min_total = min(ctx_min * n_streams, UINT32_MAX)
        full = self.used(self.flags)  # -c 0 is the training context per stream (kvbook's rule, as fit sets it)
        self.use = full
        nd, margins = self.nd, self.margins
        if nd == 0:
            used_sum, free_sum = full[0], self.host.budget_bytes
            if free_sum - used_sum >= margins[0]:
                return self.flags
        else:
            used_sum, free_sum = sum(full), sum(self.free)
            if all(f - u >= m for f, u, m in zip(self.free, full, margins)):
                return self.flags
        surplus = free_sum - used_sum - sum(margins[:max(nd, 1)])
        if surplus < 0:
            if not ctx_auto:
                self.changes.append(f"-c {flags.ctx} set: not lowered")
            elif n_ctx_max <= n_ctx_min_total:
                self.changes.append("-c 0 given: the full training context is kept" if ctx_min == UINT32_MAX else
                                    f"the training context {n_ctx_max} is not above --fit-ctx's minimum: kept")
            else:
                target = free_sum - sum(margins[:max(nd, 1)])
                if nd > 1:
                    ngl_user = self.hp_ngl if flags.gpu_layers in ("auto", "all") else min(int(flags.gpu_layers), self.hp_ngl)
                    model_sum = sum(self._weights(full_flags=self.flags_now()))
                    per_layer = model_sum // max(ngl_user, 1)
                    target -= (nd + 1) * per_layer // (6 if self.moe else 2)
                self.ctx = n_ctx_min_total
                at_min = sum(self.used(self.flags_now()))
                if target > at_min:
                    step = _cdiv((n_ctx_max - n_ctx_min_total) * (target - at_min), used_sum - at_min)
                    ctx = _u32(self.ctx + step)
                    align = 256 * n_streams
                    self.ctx = max(ctx - ctx % align, n_ctx_min_total)
                    self.changes.append(f"-c lowered from {n_ctx_max} to {self.ctx} (unset; linear estimate between "
                                        f"the training context and --fit-ctx {ctx_min} per stream)")
                    if nd <= 1:
                        self.use = self.used(self.flags_now())
                        return self.flags_now()
                else:
                    self.changes.append(f"-c lowered from {n_ctx_max} to its minimum {self.ctx} (--fit-ctx {ctx_min} "
                                        "per stream)")
        if nd == 0:
            raise _Fails("was unable to fit model into system memory by reducing context")
        if flags.gpu_layers != "auto":
            raise _Fails(f"n_gpu_layers already set by user to {flags.gpu_layers}")
        if nd > 1 and any(x != 0 for x in flags.tensor_split[:nd]):
            raise _Fails("model_params::tensor_split already set by user")
        if nd > 1 and flags.split_mode == "row":
            raise _Fails("changing weight allocation for LLAMA_SPLIT_MODE_ROW not implemented")
        if flags.tensor_overrides or flags.cpu_moe_layers:
            raise _Fails("model_params::tensor_buft_overrides already set by user")
        if self.device.unified:
            raise _Unpredicted("fit would move layers off the GPU; on unified memory kvbook plans one pool, where "
                               "that frees nothing")
        return self._layers(full)

    def _weights(self, full_flags: ServerFlags) -> list[int]:
        self.used(full_flags)
        usages = {u.pool: u for u in self.known[full_flags]}
        return [usages[n].weights_bytes for n in self.names]

    def _layers(self, full: list[int]) -> ServerFlags:
        surplus_cpu_moe = 0
        if self.moe:
            all_moe = replace(self.flags_now(), gpu_layers="all", **(
                {"tensor_overrides": ((_MOE_ALL, "CPU"),)} if self.exact else {"cpu_moe_layers": -1}))
            cpu_moe = self.used(all_moe)
            surplus_cpu_moe = sum(f - u - m for f, u, m in zip(self.free, cpu_moe, self.margins))
        targets = [f - m for f, m in zip(self.free, self.margins)]
        found = search_layers(self.hp_ngl, self.moe, targets, surplus_cpu_moe, self.measure)
        if found.unsized:
            self.caveats.append("fit also tries to keep part of one more layer (its ffn_up, ffn_gate or attention) on "
                                f"the device: not sized, {self.arch.source} has no GGUF tensors")
        self.use = found.mem
        self.ngl, self.final_bufts = found.ngl, found.bufts
        return self.layered(found.ngl, found.bufts)


@dataclass(frozen=True)
class LayerSearch:
    """Steps 3 and 4's result: each device's layers, where its first partial layer overflows to (None: the CPU,
    else a device index), the bytes measured for that, and whether a partial-layer try could not be sized."""

    ngl: list[_Ngl]
    bufts: list[int | None]
    mem: list[int]
    unsized: bool = False


def search_layers(hp_ngl: int, moe: bool, targets: list[int], surplus_cpu_moe: int,
                  measure: Callable[[list[_Ngl], list[int | None]], list[int]]) -> LayerSearch:
    """common/fit.cpp's steps 3 and 4 over `measure` (bytes per device for a layer assignment): kvbook's plan in a
    prediction, the real server's logged test allocations in a replay (ops/fit_check.py)."""
    nd, hp = len(targets), hp_ngl
    bufts: list[int | None] = [None] * nd
    ngl = [_Ngl() for _ in range(nd)]
    mem = measure(ngl, bufts)
    for d in range(nd - 1, -1, -1):  # step 3: dense (or dense-only) layers, back to front
        unassigned = hp + 1 - sum(n.n_layer for n in ngl[d + 1:])
        if unassigned == 0:
            continue
        high = list(ngl)
        part = (unassigned if d < nd - 1 else unassigned - 1) if moe else 0
        high[d] = dataclasses.replace(high[d], n_layer=unassigned, n_part=part)
        mem_high = measure(high, bufts)
        if mem_high[d] > targets[d]:
            delta = high[d].n_layer - ngl[d].n_layer
            while delta > 1:
                step = _step(delta, targets[d], mem[d], mem_high[d])
                test = list(ngl)
                n = test[d]
                add = (step - 1 if d == nd - 1 and n.n_part == 0 else step) if moe else 0
                test[d] = dataclasses.replace(n, n_layer=n.n_layer + step, n_part=n.n_part + add)
                mem_test = measure(test, bufts)
                if mem_test[d] <= targets[d]:
                    ngl, mem = test, mem_test
                else:
                    high, mem_high = test, mem_test
                delta = high[d].n_layer - ngl[d].n_layer
        else:
            ngl, mem = high, mem_high
    if not moe or surplus_cpu_moe <= 0:
        return LayerSearch(ngl, bufts, mem)
    # step 4: MoE with every dense weight on the devices: whole layers again, front to back
    unsized = False
    dense_start = nd
    for d in range(nd - 1, -1, -1):
        if ngl[d].n_layer > 0:
            dense_start = d
            continue
        break
    d = 0
    while d <= dense_start < nd:
        high = list(ngl)
        for jd in range(dense_start, nd):
            move = high[jd].n_layer if jd < nd - 1 else high[jd].n_layer - 1
            high[d] = dataclasses.replace(high[d], n_layer=high[d].n_layer + move)
            high[jd] = dataclasses.replace(high[jd], n_layer=high[jd].n_layer - move, n_part=0)
        dense_start_high = nd - 1
        mem_high = measure(high, bufts)
        if mem_high[d] > targets[d]:
            delta = high[d].n_full - ngl[d].n_full
            while delta > 1:
                step = _step(delta, targets[d], mem[d], mem_high[d])
                test = list(ngl)
                start_test, converted = dense_start, 0
                while start_test < nd:
                    s = test[start_test]
                    n_conv = min(step - converted, s.n_part)
                    test[start_test] = dataclasses.replace(s, n_layer=s.n_layer - n_conv, n_part=s.n_part - n_conv)
                    test[d] = dataclasses.replace(test[d], n_layer=test[d].n_layer + n_conv)
                    converted += n_conv
                    if test[start_test].n_part > 0:
                        break
                    start_test += 1
                mem_test = measure(test, bufts)
                if mem_test[d] <= targets[d]:
                    ngl, mem, dense_start = test, mem_test, start_test
                else:
                    high, mem_high, dense_start_high = test, mem_test, start_test
                delta = high[d].n_full - ngl[d].n_full
        else:
            ngl, mem, dense_start = high, mem_high, dense_start_high
        if dense_start < nd and ngl[dense_start].n_layer > (0 if d < nd - 1 else 1):  # part of one more layer
            test = list(ngl)
            start_test = dense_start
            s = test[start_test]
            test[start_test] = dataclasses.replace(s, n_layer=s.n_layer - 1, n_part=s.n_part - 1)
            t = test[d]
            test[d] = dataclasses.replace(t, n_layer=t.n_layer + 1, n_part=t.n_part + 1, overflow=UP)
            if test[start_test].n_part == 0:
                start_test += 1
            bufts_test = list(bufts)
            if d < nd - 1:
                bufts_test[d] = d + 1
            part_mem: list[int] | None
            try:
                part_mem = measure(test, bufts_test)
            except _Unpredicted:
                unsized, part_mem = True, None
            if part_mem is not None and _fits_next(part_mem, targets, d):
                ngl, bufts, mem, dense_start = test, bufts_test, part_mem, start_test
                test = list(test)
                test[d] = dataclasses.replace(test[d], overflow=GATE)
                mem_test = measure(test, bufts_test)
                if _fits_next(mem_test, targets, d):
                    ngl, bufts, mem, dense_start = test, bufts_test, mem_test, start_test
            elif part_mem is not None:
                test[d] = dataclasses.replace(test[d], overflow=ATTN)
                mem_test = measure(test, bufts_test)
                if _fits_next(mem_test, targets, d):
                    ngl, bufts, mem, dense_start = test, bufts_test, mem_test, start_test
        d += 1
    return LayerSearch(ngl, bufts, mem, unsized)


def _fits_next(mem: list[int], targets: list[int], d: int) -> bool:
    """fit's test for a partial layer: under target (strictly) on this device and on the next one."""
    return mem[d] < targets[d] and (d + 1 == len(targets) or mem[d + 1] < targets[d + 1])


def _step(delta: int, target: int, low: int, high: int) -> int:
    """fit's false-position step: uint32_t(delta * (target - low) / (high - low)), within [1, delta - 1]."""
    step = _u32(_cdiv(delta * (target - low), high - low)) if high != low else delta - 1
    return min(max(step, 1), delta - 1)


def predict_fit(arch: ModelArch, flags: ServerFlags, device: Device, place: Place,
                usages: tuple[PoolUsage, ...] | None = None) -> tuple[ServerFlags, FitOutcome]:
    """The flags llama-server runs after --fit (`flags` itself with --fit off) and what fit changed. `device` is
    the one the plan uses (RPC endpoints bound, -dev / -sm applied); `place` is the planner's per-device placement
    (plan/planner.py, passed in so this module does not import the planner that calls it); `usages`, the plan of
    `flags` if made."""
    given = _args(flags)
    if not flags.fit:
        return flags, FitOutcome(status="off", given_args=given, adjusted_args=given)
    fit = _Fit(arch, flags, device, place)
    if usages is not None:
        fit.known[flags] = usages
    try:
        adjusted = fit.run()
    except _Fails as exc:
        adjusted = fit.flags_now()
        return adjusted, _outcome(fit, "failed", adjusted, f"fit fails: {exc}, abort (llama-server goes on with the "
                                                             "flags as they are)")
    except _Unpredicted as exc:
        return flags, _outcome(fit, "not predicted", flags, f"{exc}; planned as given")
    except BadInput as exc:
        return flags, _outcome(fit, "not predicted", flags, f"a candidate kvbook cannot plan ({exc}); planned as given")
    if adjusted == flags or adjusted.argv == flags.argv:
        return flags, _outcome(fit, "no change", flags, "")
    written = adjusted
    if hasattr(fit, "ngl"):
        fit.changes.extend(_describe_layers(fit))
        written = fit.layered(fit.ngl, fit.final_bufts, as_fit=True)
        if written != adjusted:
            fit.caveats.append(f"planned as --n-cpu-moe {adjusted.cpu_moe_layers}: on one device the same bytes as fit's "
                               f"-ot ({arch.source} has no GGUF tensors to name)")
    return adjusted, _outcome(fit, "adjusted", written, "")


def _describe_layers(fit: _Fit) -> list[str]:
    total = sum(n.n_layer for n in fit.ngl)
    out = [f"-ngl unset -> {total} of {fit.hp_ngl + 1} layers on the device(s)" + (
        " (all)" if total == fit.hp_ngl + 1 else f" (layers 0..{fit.hp_ngl - total} stay on the CPU)")]
    if fit.nd > 1:
        out.append("-ts unset -> " + ",".join(str(n.n_layer) for n in fit.ngl) + " (layers per device)")
    il0 = fit.hp_ngl + 1 - total
    for d, n in enumerate(fit.ngl):
        il0 += n.n_full
        real = [il for il in range(il0, il0 + n.n_part) if il < fit.hp_ngl]
        if real:
            first = real[0]
            moe = real[1:] if n.overflow != MOE else real
            if n.overflow != MOE:
                buft = fit.final_bufts[d]
                to = "the CPU" if buft is None else fit.names[buft]
                out.append(f"layer {first} on {fit.names[d]} keeps {_FRACTION[n.overflow]}; its other FFN tensors "
                           f"go to {to}")
            if moe:
                out.append(f"experts of {len(moe)} layer(s) {_span(moe)} on {fit.names[d]} moved to the CPU "
                           "(-ot ..._exps=CPU, as fit writes it)")
        il0 += n.n_part
    return out


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def _args(flags: ServerFlags) -> tuple[str, ...]:
    argv = flags.argv or ()
    return tuple(argv[1:] if argv and not argv[0].startswith("-") else argv)


def _outcome(fit: _Fit, status: str, flags: ServerFlags, reason: str) -> FitOutcome:
    targets = tuple(zip(fit.names, (f - m for f, m in zip(fit.free, fit.margins))))
    return FitOutcome(status=status, changes=tuple(fit.changes + fit.caveats), reason=reason, given_args=_args(fit.flags),
                      adjusted_args=_args(flags), targets=tuple((n, t) for n, t in targets),
                      used=tuple(zip(fit.names, fit.use)) if fit.names else (), evaluations=fit.evaluations,
                      layers=tuple((name, n.n_layer, n.n_part, _OVERFLOW[n.overflow]) for name, n in
                                   zip(fit.names, getattr(fit, "ngl", ()))))


def fit_notes(fit: FitOutcome) -> list[Note]:
    """The plan's notes on --fit: what it changed, that it fails, or that it was not predicted."""
    if fit.status == "off":
        return []
    if fit.status == "no change":
        return [Note("fit.no-change",
                     "--fit (on by default) changes nothing: every device keeps its --fit-target free with these flags")]
    code, head = {"adjusted": ("fit.adjusted", "--fit (on by default) changes the command line at start; planned as "
                                               "the server runs it"),
                  "failed": ("fit.failed", "--fit (on by default) gives up at start"),
                  "not predicted": ("fit.not-predicted", "--fit (on by default) not predicted")}[fit.status]
    parts = [f"fit: {c}" for c in fit.changes] + ([fit.reason] if fit.reason else [])
    out = [Note(code, head + (": " + "; ".join(parts) if parts else ""))]
    if fit.status == "adjusted":
        out.append(Note("fit.adjusted-args", "after --fit: " + " ".join(_short_ot(fit.adjusted_args))))
    return out


def _short_ot(args: tuple[str, ...]) -> list[str]:
    """The command line with a long -ot list shortened for text (--json has it whole)."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "-ot" and len(out[i + 1]) > 100:
            entries = out[i + 1].split(",blk")
            out[i + 1] = f"'{entries[0]},...' ({len(entries)} entries; --json has them all)"
    return out


def layer_use(arch: ModelArch, flags: ServerFlags, device: Device, place: Place,
              layers: Sequence[tuple[int, int, int]]) -> list[int]:
    """kvbook's bytes per device for one of fit's layer assignments, given as its log prints it ((n_layer, n_part,
    overflow_type) per device, 4 = all but the experts); `flags` at the context fit measured it."""
    fit = _Fit(arch, flags, device, place)
    ngl = [_Ngl(n, p, o) for n, p, o in layers]
    bufts: list[int | None] = [d + 1 if o != MOE and d < len(layers) - 1 else None for d, (_, _, o) in enumerate(layers)]
    return fit.measure(ngl, bufts)


def replay_layers(hp_ngl: int, moe: bool, targets: list[int], surplus_cpu_moe: int,
                  logged: dict[tuple[tuple[int, int, int], ...], list[int]]) -> list[tuple[int, int, int]]:
    """Steps 3 and 4 run over the memory a real fit logged for each assignment it tried: the assignment the same
    search ends with ((n_layer, n_part, overflow_type) per device). A KeyError means it asked for one the real
    fit never tried, i.e. the two searches went different ways."""
    def measure(ngl: list[_Ngl], bufts: list[int | None]) -> list[int]:
        return logged[tuple((n.n_layer, n.n_part, n.overflow) for n in ngl)]

    found = search_layers(hp_ngl, moe, targets, surplus_cpu_moe, measure)
    return [(n.n_layer, n.n_part, n.overflow) for n in found.ngl]
