"""The planner: place a MemoryPlan on a device's pools, give a verdict, the largest fitting
context, and alternatives that fit. Pure functions over typed inputs."""

from __future__ import annotations

from collections.abc import Callable

from kvbook.errors import BadInput
from kvbook.interface import (
    Alternative,
    Device,
    FlashAttn,
    GiB,
    MemoryPlan,
    ModelArch,
    Plan,
    PoolUsage,
    ServerFlags,
    Verdict,
)
from kvbook.memory.rules import CTX_PAD, plan_memory
from kvbook.plan.flags import replace

_ORDER = {Verdict.FITS: 0, Verdict.TIGHT: 1, Verdict.DOES_NOT_FIT: 2}


def margin_bytes(budget: int) -> int:
    """Headroom below which a plan is only 'tight': 1 GiB (llama.cpp --fit's default), at most 10%."""
    return min(GiB, budget // 10)


def _offloaded(arch: ModelArch, flags: ServerFlags, device: Device) -> bool:
    """True when weights, KV and compute sit on the GPU pool (all layers offloaded)."""
    if device.unified or not any(p.kind == "gpu" for p in device.pools):
        return False
    ngl = flags.gpu_layers
    if ngl in ("auto", "all", "-1"):
        return True
    n = int(ngl)
    if n == 0:
        return False
    if n >= arch.n_layer + 1:
        return True
    raise BadInput(f"-ngl {n} offloads part of the model's {arch.n_layer + 1} layers; kvbook models all or none yet")


def place(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device) -> tuple[PoolUsage, ...]:
    """Bytes each pool must hold. Unified memory: one pool holds everything, host extras included."""
    need: dict[str, int] = {p.name: 0 for p in device.pools}
    start_need: dict[str, int] = dict(need)
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    main = device.main_pool.name if _offloaded(arch, flags, device) else host
    if device.unified:
        main = host = device.pools[0].name
    kv_pool = host if flags.no_kv_offload else main
    start_need[main] += memory.weights_bytes + memory.compute.bytes
    start_need[kv_pool] += memory.kv_bytes + memory.recurrent_bytes
    start_need[host] += memory.output_bytes
    for name in need:
        need[name] = start_need[name]
    need[host] += memory.host_extras.bytes
    usages = []
    for pool in device.pools:
        if start_need[pool.name] > pool.budget_bytes:
            verdict = Verdict.DOES_NOT_FIT
        elif need[pool.name] > pool.budget_bytes - margin_bytes(pool.budget_bytes):
            verdict = Verdict.TIGHT
        else:
            verdict = Verdict.FITS
        usages.append(PoolUsage(pool=pool.name, need_bytes=need[pool.name], budget_bytes=pool.budget_bytes, verdict=verdict))
    return tuple(usages)


def worst(usages: tuple[PoolUsage, ...]) -> Verdict:
    return max((u.verdict for u in usages), key=_ORDER.__getitem__)


def starts(arch: ModelArch, flags: ServerFlags, device: Device) -> bool:
    """True when the start allocation fits every pool."""
    return worst(place(arch, flags, plan_memory(arch, flags), device)) is not Verdict.DOES_NOT_FIT


def verdict_of(arch: ModelArch, flags: ServerFlags, device: Device) -> Verdict:
    return worst(place(arch, flags, plan_memory(arch, flags), device))


def largest_context(arch: ModelArch, flags: ServerFlags, device: Device, accept: Callable[[Verdict], bool],
                    below: int | None = None) -> int:
    """Largest -c (a multiple of 256 per slot, at most the training context, under `below` when given) whose
    verdict `accept` takes; 0 if none. The verdict only worsens as the context grows, so this bisects."""
    slots = flags.parallel if flags.parallel > 0 else 1
    step = CTX_PAD * (slots if flags.parallel > 0 and not flags.kv_unified else 1)
    hi_n = max(1, arch.n_ctx_train // step) if below is None else min(arch.n_ctx_train, below - 1) // step
    if hi_n < 1:
        return 0
    ok = lambda n: accept(verdict_of(arch, replace(flags, ctx=n * step), device))  # noqa: E731
    if ok(hi_n):
        return hi_n * step
    if not ok(1):
        return 0
    lo_n = 1
    while hi_n - lo_n > 1:
        mid = (lo_n + hi_n) // 2
        lo_n, hi_n = (mid, hi_n) if ok(mid) else (lo_n, mid)
    return lo_n * step


def max_context(arch: ModelArch, flags: ServerFlags, device: Device) -> int:
    """Largest -c (a multiple of 256, at most the training context) whose start allocation fits; 0 if none."""
    return largest_context(arch, flags, device, lambda v: v is not Verdict.DOES_NOT_FIT)


def _better(v: Verdict, than: Verdict) -> bool:
    return _ORDER[v] < _ORDER[than]


def alternatives(arch: ModelArch, flags: ServerFlags, device: Device) -> tuple[Alternative, ...]:
    """Command lines that each change one thing (context, cache type, slots) and get a better verdict;
    every other flag of the user's line is kept."""
    memory = plan_memory(arch, flags)
    now = worst(place(arch, flags, memory, device))
    options: list[tuple[str, ServerFlags]] = []
    asked = memory.shape.n_ctx
    shorter = largest_context(arch, flags, device, lambda v: v is Verdict.FITS, below=asked)
    if not shorter and now is Verdict.DOES_NOT_FIT:
        shorter = largest_context(arch, flags, device, lambda v: v is not Verdict.DOES_NOT_FIT, below=asked)
    if shorter:
        options.append((f"shorter context: -c {shorter}", replace(flags, ctx=shorter)))
    for qtype in ("q8_0", "q4_0"):
        if (flags.type_k, flags.type_v) == (qtype, qtype):
            continue
        if flags.flash_attn is FlashAttn.OFF:
            quant, note = replace(flags, type_k=qtype, type_v=qtype, flash_attn=FlashAttn.ON), " (needs -fa on)"
        else:
            quant, note = replace(flags, type_k=qtype, type_v=qtype), ""
        options.append((f"{qtype} KV cache{note}", quant))
    if flags.parallel != 1:
        options.append(("one slot: -np 1", replace(flags, parallel=1, kv_unified=None)))
    out = []
    for change, alt in options:
        try:
            alt_memory = plan_memory(arch, alt)
        except BadInput:
            continue  # e.g. a quantized cache this model's row widths do not allow
        verdict = worst(place(arch, alt, alt_memory, device))
        if _better(verdict, now):
            argv = alt.argv[1:] if alt.argv and not alt.argv[0].startswith("-") else alt.argv
            out.append(Alternative(change=change, flags=tuple(argv), n_ctx=alt_memory.shape.n_ctx,
                                   total_bytes=alt_memory.total_bytes, verdict=verdict))
    return tuple(out)


def compute_backend(arch: ModelArch, flags: ServerFlags, device: Device) -> str:
    """The backend that holds the main compute buffer: the GPU pool's backend (CUDA0 -> CUDA, Metal) when
    the model runs there, else CPU."""
    gpu = next((p for p in device.pools if p.kind == "gpu"), None)
    if gpu is None or not (device.unified or _offloaded(arch, flags, device)):
        return "CPU"
    return gpu.name.rstrip("0123456789") or "GPU"


def make_plan(arch: ModelArch, flags: ServerFlags, device: Device, *, memory: MemoryPlan | None = None,
              accounting: str = "kvbook") -> Plan:
    """Plan one command line on one device. `memory` comes from elsewhere (llama.cpp's own accounting) for an
    architecture kvbook has no rule for; then no context is searched and no alternative is offered."""
    searched = memory is None
    memory = memory or plan_memory(arch, flags)
    usages = place(arch, flags, memory, device)
    verdict = worst(usages)
    notes = []
    if not arch.weights_exact:
        notes.append(f"weights are {arch.weights_note}")
    if memory.shape.n_ctx_seq > arch.n_ctx_train:
        notes.append(f"n_ctx_seq {memory.shape.n_ctx_seq} exceeds the training context {arch.n_ctx_train}")
    if flags.fit:
        notes.append("--fit is on (default): llama-server may lower an unset -c or -ngl at start if it does not fit")
    if flags.from_env:
        notes.append("read from the environment, as llama-server reads them (the command line wins): "
                     + " ".join(flags.from_env))
    if flags.cache_ram_mib < 0:
        notes.append("--cache-ram -1: the prompt cache has no limit; host growth is unbounded")
    return Plan(
        model=arch,
        flags=flags,
        device=device,
        memory=memory,
        pools=usages,
        verdict=verdict,
        max_ctx=max_context(arch, flags, device) if searched else 0,
        alternatives=alternatives(arch, flags, device) if searched and verdict is not Verdict.FITS else (),
        litellm_max_input_tokens=memory.shape.n_ctx_seq,
        notes=tuple(notes),
        compute_backend=compute_backend(arch, flags, device),
        accounting=accounting,
    )
