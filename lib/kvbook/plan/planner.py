"""The planner: place a MemoryPlan on a device's pools, give a verdict, the largest fitting
context, and alternatives that fit. Pure functions over typed inputs."""

from __future__ import annotations

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
from kvbook.plan.flags import render_args, replace

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


def max_context(arch: ModelArch, flags: ServerFlags, device: Device) -> int:
    """Largest -c (a multiple of 256, at most the training context) whose start allocation fits; 0 if none."""
    slots = flags.parallel if flags.parallel > 0 else 1
    step = CTX_PAD * (slots if flags.parallel > 0 and not flags.kv_unified else 1)
    hi = max(step, (arch.n_ctx_train // step) * step)
    if starts(arch, replace(flags, ctx=hi), device):
        return hi
    lo = step
    if not starts(arch, replace(flags, ctx=lo), device):
        return 0
    lo_n, hi_n = 1, hi // step
    while hi_n - lo_n > 1:
        mid = (lo_n + hi_n) // 2
        if starts(arch, replace(flags, ctx=mid * step), device):
            lo_n = mid
        else:
            hi_n = mid
    return lo_n * step


def alternatives(arch: ModelArch, flags: ServerFlags, device: Device) -> tuple[Alternative, ...]:
    """Changed command lines that fit: a shorter context, a quantized KV cache, fewer slots."""
    options: list[tuple[str, ServerFlags]] = []
    fits_ctx = max_context(arch, flags, device)
    if fits_ctx and fits_ctx != flags.ctx:
        options.append((f"shorter context: -c {fits_ctx}", replace(flags, ctx=fits_ctx)))
    for qtype in ("q8_0", "q4_0"):
        if (flags.type_k, flags.type_v) == (qtype, qtype):
            continue
        quant = replace(flags, type_k=qtype, type_v=qtype,
                        flash_attn=FlashAttn.ON if flags.flash_attn is FlashAttn.OFF else flags.flash_attn)
        try:
            ctx = flags.ctx if starts(arch, quant, device) else max_context(arch, quant, device)
        except BadInput:
            continue
        if ctx:
            options.append((f"{qtype} KV cache" + ("" if ctx == flags.ctx else f" and -c {ctx}"), replace(quant, ctx=ctx)))
    if flags.parallel != 1:
        single = replace(flags, parallel=1, kv_unified=None)
        ctx = flags.ctx if flags.ctx and starts(arch, single, device) else max_context(arch, single, device)
        if ctx:
            options.append(("one slot: -np 1" + ("" if ctx == flags.ctx else f" and -c {ctx}"), replace(single, ctx=ctx)))
    out = []
    for change, alt in options:
        memory = plan_memory(arch, alt)
        verdict = worst(place(arch, alt, memory, device))
        if verdict is not Verdict.DOES_NOT_FIT:
            out.append(Alternative(change=change, flags=tuple(render_args(alt)), n_ctx=memory.shape.n_ctx,
                                   total_bytes=memory.total_bytes, verdict=verdict))
    return tuple(out)


def make_plan(arch: ModelArch, flags: ServerFlags, device: Device) -> Plan:
    """Plan one command line on one device."""
    memory = plan_memory(arch, flags)
    usages = place(arch, flags, memory, device)
    verdict = worst(usages)
    notes = []
    if not arch.weights_exact:
        notes.append(f"weights are {arch.weights_note}")
    if memory.shape.n_ctx_seq > arch.n_ctx_train:
        notes.append(f"n_ctx_seq {memory.shape.n_ctx_seq} exceeds the training context {arch.n_ctx_train}")
    if flags.fit:
        notes.append("--fit is on (default): llama-server may lower an unset -c or -ngl at start if it does not fit")
    if flags.cache_ram_mib < 0:
        notes.append("--cache-ram -1: the prompt cache has no limit; host growth is unbounded")
    return Plan(
        model=arch,
        flags=flags,
        device=device,
        memory=memory,
        pools=usages,
        verdict=verdict,
        max_ctx=max_context(arch, flags, device),
        alternatives=alternatives(arch, flags, device) if verdict is not Verdict.FITS else (),
        litellm_max_input_tokens=memory.shape.n_ctx_seq,
        notes=tuple(notes),
    )
