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
from kvbook.plan.devices import detection_note, effective_device, split_note, split_shares, with_rpc
from kvbook.plan.flags import replace
from kvbook.plan.placement import (
    CPU,
    assign,
    caches_by_device,
    device_compute_bound,
    estimated_groups,
    weights_by_device,
)

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
    return int(ngl) >= arch.n_layer + arch.n_layer_nextn + 1


def offload_pools(device: Device) -> list[str]:
    """The offload devices (local GPUs and RPC servers) in llama.cpp's order; none on unified memory."""
    return [] if device.unified else [p.name for p in device.pools if p.kind in ("gpu", "rpc")]


def per_device_compute(device: Device) -> bool:
    """Whether each offload device that runs layers reserves a compute buffer of its own, and the CPU one too
    (several offload devices, or any RPC device): the bound `device_compute_bound`, not one main buffer."""
    return len(offload_pools(device)) > 1 or any(p.kind == "rpc" for p in device.pools)


def _spread(arch: ModelArch, flags: ServerFlags, device: Device) -> bool:
    """Whether the plan needs llama.cpp's per-layer assignment: several offload devices (RPC or local GPUs),
    a partial -ngl on a discrete GPU, or experts kept on the CPU."""
    if any(p.kind == "rpc" for p in device.pools) or len(offload_pools(device)) > 1:
        return True
    if device.unified or not any(p.kind == "gpu" for p in device.pools):
        return False
    partial = flags.gpu_layers not in ("auto", "all", "-1") and 0 < int(flags.gpu_layers) < arch.n_layer + arch.n_layer_nextn + 1
    return partial or (flags.cpu_moe_layers != 0 and bool(arch.n_expert))


def _rpc_layers(arch: ModelArch, flags: ServerFlags, device: Device) -> int:
    """-ngl as a layer count for a spread plan. With RPC devices auto is refused (it is the server's --fit
    choice, not a placement); on a local GPU auto means all, which --fit may lower at start."""
    rpc = any(p.kind == "rpc" for p in device.pools)
    if flags.gpu_layers in ("all", "-1") or (flags.gpu_layers == "auto" and not rpc):
        return arch.n_layer + arch.n_layer_nextn + 1
    if flags.gpu_layers == "auto":
        raise BadInput("--rpc needs -ngl N (or -ngl all): with -ngl auto llama-server's --fit picks the layers, and "
                       "kvbook plans a given placement")
    return int(flags.gpu_layers)


def _by_device(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device, host: str) -> dict[str, dict]:
    """Bytes per pool when layers spread over devices: llama.cpp's assignment (placement.py)."""
    if not arch.tensor_groups and any(p.kind == "rpc" for p in device.pools):
        raise BadInput(f"{arch.source}: a multi-device plan needs the GGUF's tensors (a preset or config.json has "
                       "no per-layer sizes); pass the GGUF path or URL")
    groups = dict(arch.tensor_groups) or _estimated(arch)
    devices = [p.name for p in device.pools if p.kind in ("gpu", "rpc")]
    split = split_shares(flags.tensor_split, len(devices)) or [float(p.budget_bytes) for p in device.pools
                                                                if p.kind in ("gpu", "rpc")]
    offload = assign(arch.n_layer + arch.n_layer_nextn, _rpc_layers(arch, flags, device), devices, split)
    weights = weights_by_device(groups, offload, arch.tensor_ranges, flags.cpu_moe_layers)
    caches = caches_by_device(arch, memory, offload, flags.no_kv_offload)
    out = {p.name: dict.fromkeys(("weights", "kv", "recurrent", "compute", "output", "extras"), 0) for p in device.pools}
    for name in (CPU, *devices):
        pool = host if name == CPU else name
        out[pool]["weights"] += weights.get(name, 0)
        out[pool]["kv"] += caches[name][0]
        out[pool]["recurrent"] += caches[name][1]
    busy = {*offload.layers, offload.output} & set(devices)
    if busy and per_device_compute(device):  # every offload device that runs layers, and the CPU, reserve their own
        bound = device_compute_bound(arch, memory)
        for name in busy:
            out[name]["compute"] += bound
        out[host]["compute"] += bound
        return out
    # the main compute buffer: on a local GPU that runs the output layer, else on the host
    compute_on = offload.output if offload.output != CPU and next(
        p.kind for p in device.pools if p.name == offload.output) == "gpu" else host
    out[compute_on]["compute"] += memory.compute.bytes
    return out


def _estimated(arch: ModelArch) -> dict[str, int]:
    """`estimated_groups` with its rounding left on the token embeddings, so the groups add up to the weights."""
    groups = estimated_groups(arch)
    groups["token_embd"] = groups.get("token_embd", 0) + arch.weights_bytes - sum(groups.values())
    return groups


def layer_devices(arch: ModelArch, flags: ServerFlags, device: Device) -> tuple[tuple[str, ...], str]:
    """(pool of each repeating layer, pool of the output layer) as llama.cpp assigns them."""
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    n_all = arch.n_layer + arch.n_layer_nextn
    if _spread(arch, flags, device):
        devices = [p.name for p in device.pools if p.kind in ("gpu", "rpc")]
        split = split_shares(flags.tensor_split, len(devices)) or [float(p.budget_bytes) for p in device.pools
                                                                    if p.kind in ("gpu", "rpc")]
        off = assign(n_all, _rpc_layers(arch, flags, device), devices, split)
        return tuple(host if d == CPU else d for d in off.layers), host if off.output == CPU else off.output
    main = device.pools[0].name if device.unified else (device.main_pool.name if _offloaded(arch, flags, device) else host)
    return (main,) * n_all, main


def place(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device) -> tuple[PoolUsage, ...]:
    """Bytes each pool must hold, by kind. Unified memory: one pool holds everything, host extras included."""
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    if memory.lora_bytes and _spread(arch, flags, device):
        raise BadInput("--lora with layers spread over devices: the adapters follow each base tensor's device, "
                       "which kvbook does not model yet")
    if memory.draft is not None and any(p.kind == "rpc" for p in device.pools):
        raise BadInput("-md with --rpc devices: how llama.cpp spreads the draft then is not modelled yet")
    if memory.draft is not None and len(offload_pools(device)) > 1:
        raise BadInput(f"-md with several GPUs ({', '.join(offload_pools(device))}): how llama.cpp splits the draft "
                       "over them is not modelled yet (keep one GPU with -dev or -sm none: the draft inherits them)")
    if memory.projector is not None and any(p.kind == "rpc" for p in device.pools):
        raise BadInput("--mmproj with --rpc devices: where llama.cpp puts the projector then is not modelled yet")
    if _spread(arch, flags, device):
        parts = _by_device(arch, flags, memory, device, host)
    else:  # one offload device or none: -ts changes nothing (split_note)
        parts = {p.name: dict.fromkeys(("weights", "kv", "recurrent", "compute", "output", "extras"), 0)
                 for p in device.pools}
        main = device.main_pool.name if _offloaded(arch, flags, device) else host
        if device.unified:
            main = host = device.pools[0].name
        kv_pool = host if flags.no_kv_offload else main
        parts[main]["weights"] += memory.weights_bytes + memory.lora_bytes
        parts[main]["compute"] += memory.compute.bytes
        parts[kv_pool]["kv"] += memory.kv_bytes
        parts[kv_pool]["recurrent"] += memory.recurrent_bytes
    parts[host]["output"] += memory.output_bytes
    parts[host]["extras"] += memory.host_extras.bytes
    if memory.draft is not None:
        if not memory.draft.shape.n_ctx:
            raise BadInput("the draft model has no context")
        pool = draft_pool(arch, flags, device)
        d = memory.draft
        parts[pool]["weights"] += d.weights_bytes
        kv_pool = host if flags.no_kv_offload else pool  # the draft inherits -nkvo
        parts[kv_pool]["kv"] += d.kv_bytes
        parts[kv_pool]["recurrent"] += d.recurrent_bytes
        parts[pool]["compute"] += d.compute.bytes
        parts[host]["output"] += d.output_bytes
        parts[host]["extras"] += d.host_extras.bytes
    proj = projector_pool(memory, device)
    if proj is not None and memory.projector is not None:
        parts[proj]["weights"] += memory.projector.weights_bytes
        parts[proj]["compute"] += memory.projector.compute_bytes
    usages = []
    for pool in device.pools:
        part = parts[pool.name]
        start = part["weights"] + part["kv"] + part["recurrent"] + part["compute"] + part["output"]
        need = start + part["extras"]
        if start > pool.budget_bytes:
            verdict = Verdict.DOES_NOT_FIT
        elif need > pool.budget_bytes - margin_bytes(pool.budget_bytes):
            verdict = Verdict.TIGHT
        else:
            verdict = Verdict.FITS
        usages.append(PoolUsage(pool=pool.name, need_bytes=need, budget_bytes=pool.budget_bytes, verdict=verdict,
                                weights_bytes=part["weights"], kv_bytes=part["kv"], recurrent_bytes=part["recurrent"],
                                compute_bytes=part["compute"], output_bytes=part["output"],
                                host_extras_bytes=part["extras"]))
    return tuple(usages)


def draft_pool(arch: ModelArch, flags: ServerFlags, device: Device) -> str:
    """Where the draft's weights, KV and compute sit: its -ngld (auto by default) read like -ngl; a partial
    offload of the draft is refused."""
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    if device.unified:
        return device.pools[0].name
    gpu = next((p.name for p in device.pools if p.kind == "gpu"), None)
    if gpu is None or arch.draft is None:
        return host
    ngl = flags.draft_gpu_layers
    if ngl in ("auto", "all", "-1") or int(ngl) >= arch.draft.n_layer + 1:
        return gpu
    if int(ngl) == 0:
        return host
    raise BadInput(f"-ngld {ngl}: a draft split between the GPU and the CPU is not modelled yet (use -ngld 0 or all)")


def projector_pool(memory: MemoryPlan, device: Device) -> str | None:
    """Where the projector sits: clip uses the first GPU whenever there is one and offload is on (whatever
    -ngl says), else the CPU; on unified memory the one pool."""
    if memory.projector is None:
        return None
    if device.unified:
        return device.pools[0].name
    gpu = next((p.name for p in device.pools if p.kind == "gpu"), None)
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    return gpu if gpu and memory.projector.on_gpu else host


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
    if now is Verdict.TIGHT and flags.cache_ram_mib != 0:
        for mib in (4096, 2048, 1024, 0):  # a smaller prompt cache: the largest that fits, or none
            if 0 <= flags.cache_ram_mib <= mib:
                continue
            smaller = replace(flags, cache_ram_mib=mib)
            if verdict_of(arch, smaller, device) is Verdict.FITS:
                options.append((f"smaller prompt cache: --cache-ram {mib}", smaller))
                break
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
    detected = detection_note(device)
    device = with_rpc(device, flags.rpc)  # binds the --rpc endpoints (a no-op without RPC devices)
    device = effective_device(device, flags)
    memory = memory or plan_memory(arch, flags)
    usages = place(arch, flags, memory, device)
    layers_on, output_on = layer_devices(arch, flags, device)
    notes_extra = []
    if _spread(arch, flags, device):
        gpus = [p.name for p in device.pools if p.kind == "gpu"] if not device.unified else []
        if any(p.kind == "rpc" for p in device.pools):
            how = ("each RPC device that runs layers and the CPU reserve a compute buffer of their own, counted as an "
                   "upper bound fitted to loopback RPC runs (not a calibration: a median 3x high over the measured runs)")
            if gpus:
                how += f"; the local GPUs ({', '.join(gpus)}) get the same bound, not calibrated for their backend"
        elif len(gpus) > 1:
            how = (f"each GPU that runs layers ({', '.join(gpus)}) and the CPU reserve a compute buffer of their own, "
                   "counted with the upper bound fitted to loopback RPC runs: not calibrated for "
                   f"{gpus[0].rstrip('0123456789') or 'GPU'}")
        else:
            how = ("each offload device also reserves a compute buffer of its own (not modelled yet: the estimate is "
                   "on the GPU holding the output, else the CPU)")
        notes_extra.append("layers spread over devices: " + how + "; repacked CPU weights (CPU_REPACK) are not counted")
        if not arch.tensor_groups:
            notes_extra.append("per-layer and expert sizes estimated from the model's shapes (no GGUF tensors)")
    if flags.cpu_moe_layers and not arch.n_expert:
        notes_extra.append(f"--cpu-moe / --n-cpu-moe / -ot on experts: {arch.name} has no experts, so nothing moves to "
                           "the CPU (llama-server accepts the flag and its overrides match no tensor)")
    if split_note(flags, device):
        notes_extra.append(split_note(flags, device))
    verdict = worst(usages)
    notes = list(notes_extra) + ([f"this machine: {detected}"] if detected else [])
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
        litellm_max_input_tokens=min(memory.shape.n_ctx_seq, flags.slot_ctx_cap or memory.shape.n_ctx_seq),
        notes=tuple(notes),
        compute_backend=compute_backend(arch, flags, device),
        accounting=accounting,
        layers_on=layers_on,
        output_on=output_on,
    )
