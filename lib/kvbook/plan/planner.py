"""The planner: place a MemoryPlan on a device's pools, give a verdict, the largest fitting
context, and alternatives that fit. Pure functions over typed inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kvbook.errors import BadInput
from kvbook.interface import (
    Alternative,
    ComputeCalibration,
    CpuFeatures,
    Device,
    FlashAttn,
    GiB,
    MemoryPlan,
    ModelArch,
    Note,
    Plan,
    PoolUsage,
    ServerFlags,
    Verdict,
)
from kvbook.memory.backends import (
    GPU_BACKENDS,
    OP_OFFLOAD_MIN_BATCH,
    DeviceCompute,
    backend_compute,
    backend_of,
    cpu_matrix_bytes,
)
from kvbook.memory.compute import activation_width, coefficients
from kvbook.memory.rules import CTX_PAD, plan_memory
from kvbook.memory.speculative import check_mtp, uses_mtp
from kvbook.plan.devices import detection_note, effective_device, ram_note, split_note, split_shares, with_rpc
from kvbook.plan.flags import replace
from kvbook.plan.spec_offer import SpecOffer, speedup_interval
from kvbook.plan.placement import (
    CPU,
    SCHED_MAX_COPIES,
    Offload,
    PlacedTensor,
    assign,
    caches_by_device,
    compute_terms,
    device_compute,
    device_compute_bound,
    estimated_groups,
    group_buffers,
    pipeline_parallel,
    weights_by_device,
)
from kvbook.plan.weights import (
    PlacementMap,
    WeightBytes,
    cpu_ops,
    expert_devices,
    host_buffer_first,
    host_cpu,
    overrides_as_cpu_moe,
    tensor_buffers,
    tensor_weights,
    unmatched_patterns,
    weight_bytes,
)

_ORDER = {Verdict.FITS: 0, Verdict.TIGHT: 1, Verdict.DOES_NOT_FIT: 2}
_PARTS = ("weights", "kv", "recurrent", "compute", "output", "extras", "repack")  # repack: part of weights


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


def _spread(arch: ModelArch, flags: ServerFlags, device: Device) -> bool:
    """Whether the plan needs llama.cpp's per-layer assignment: several offload devices (RPC or local GPUs),
    a partial -ngl on a discrete GPU, or experts kept on the CPU."""
    if any(p.kind == "rpc" for p in device.pools) or len(offload_pools(device)) > 1:
        return True
    if device.unified or not any(p.kind == "gpu" for p in device.pools):
        return False
    partial = flags.gpu_layers not in ("auto", "all", "-1") and 0 < int(flags.gpu_layers) < arch.n_layer + arch.n_layer_nextn + 1
    # with the GGUF's tensors a fully offloaded discrete GPU is placed per tensor too: the input layer's token_embd
    # stays on the CPU (mapped) and the CPU backend keeps a compute buffer of its own (Vulkan_Host / CUDA_Host),
    # which one GPU pool holding every tensor would miss (measured on Vulkan, docs/accuracy.md); not yet with a
    # LoRA, a draft model or a projector, whose per-device placement the spread plan does not model
    full = (bool(arch.tensors) and not flags.lora and arch.draft is None and arch.projector is None and not uses_mtp(flags)
            and (flags.gpu_layers in ("auto", "all", "-1") or int(flags.gpu_layers) > 0))
    return partial or full or (flags.cpu_moe_layers != 0 and bool(arch.n_expert)) or _ot_moves(arch, flags)


def _ot_moves(arch: ModelArch, flags: ServerFlags) -> bool:
    """Whether -ot matches any tensor of the model (one that matches none is a no-op, as in llama-server); a model
    known by its shapes only can move experts, if it has any."""
    if not flags.tensor_overrides:
        return False
    if not arch.tensors:
        return bool(arch.n_expert)
    return len(unmatched_patterns(arch.tensors, flags.tensor_overrides)) < len(flags.tensor_overrides)


def repack_cpu(flags: ServerFlags, device: Device) -> CpuFeatures | None:
    """The CPU whose features decide what llama.cpp repacks into CPU_REPACK; None when nothing is: -nr, or an
    offload device's host buffer type comes first in the CPU's list (plan/weights.py)."""
    return None if not flags.repack or (host_buffer_first(device) and not flags.no_host) else host_cpu(device)


def tensor_limits(device: Device) -> dict[str, int]:
    """Pool name -> the largest tensor that device accepts, for the pools that have a limit (Pool.max_tensor_bytes)."""
    return {p.name: p.max_tensor_bytes for p in device.pools if p.max_tensor_bytes is not None}


def override_devices(device: Device) -> dict[str, str]:
    """-ot buffer-type names -> the device that holds them: RPC0[host:port] (every RPC device's buffer type is
    named RPC0[...], tell them apart by endpoint) and the local GPUs by name."""
    out = {p.name: p.name for p in device.pools if p.kind == "gpu"}
    out.update({"RPC0" + p.name[p.name.index("["):]: p.name for p in device.pools if p.kind == "rpc"})
    return out


def _tensor_map(arch: ModelArch, flags: ServerFlags, device: Device, offload: Offload
                ) -> tuple[tuple[PlacedTensor, ...], WeightBytes]:
    """Every tensor's device and buffer for this offload and the weights per device summed from them, tensor by
    tensor from the GGUF's tensors; else by group from the shapes (where -ot can only keep whole layers' experts
    on the CPU), each group placed."""
    if arch.tensors:
        placed = tensor_buffers(arch.tensors, offload, overrides=flags.tensor_overrides,
                                cpu_moe_layers=flags.cpu_moe_layers, repack_on=repack_cpu(flags, device),
                                bufts=override_devices(device), max_tensor=tensor_limits(device),
                                mmap=_maps_weights(flags))
        return placed, weight_bytes(placed, offload.devices)
    moe = overrides_as_cpu_moe(flags.tensor_overrides, arch.source) if flags.tensor_overrides else 0
    moe = -1 if moe < 0 or flags.cpu_moe_layers < 0 else max(moe, flags.cpu_moe_layers)
    groups = dict(arch.tensor_groups) or _estimated(arch)
    weights = weights_by_device(groups, offload, arch.tensor_ranges, moe)
    return group_buffers(groups, offload, moe), WeightBytes(weights, weights[CPU], 0)


def _weights(arch: ModelArch, flags: ServerFlags, device: Device, offload: Offload) -> WeightBytes:
    """Weights per device for this offload (`_tensor_map`'s sums)."""
    return _tensor_map(arch, flags, device, offload)[1]


def _host_pool(device: Device) -> str:
    """The pool of the CPU's buffers: the host pool, else the device's first (one unified pool)."""
    return next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)


def placement_map(arch: ModelArch, flags: ServerFlags, device: Device) -> PlacementMap:
    """Where this command line puts the model, computed once: unified memory with two limits (Apple: the layers
    on Metal, the CPU's tensors on RAM), layers spread per device (several offload devices, a partial -ngl, experts
    on the CPU, a GGUF on a discrete GPU), or one pool that holds every layer (or none: the CPU)."""
    host = _host_pool(device)
    n_all = arch.n_layer + arch.n_layer_nextn
    limits = two_limits(device)
    tensors: tuple[PlacedTensor, ...]
    spread, offloaded_all = _spread(arch, flags, device), _offloaded(arch, flags, device)
    if spread:
        compute: Offload | None = offload_of(arch, flags, device)
    else:
        gpu_main = device.pools[0].name if device.unified else (device.main_pool.name if offloaded_all else "")
        compute = _one_gpu(arch, device, gpu_main) if gpu_main else None
    if limits or spread:
        mode, main = ("two-limits", limits[0]) if limits else ("spread", "")
        offload = _unified_offload(arch, flags, limits[0]) if limits else compute or offload_of(arch, flags, device)
        tensors, weights = _tensor_map(arch, flags, device, offload)
        layers_on = tuple(host if d == CPU else d for d in offload.layers)
        output_on = host if offload.output == CPU else offload.output
    else:
        mode = "one-pool"
        main = device.main_pool.name if offloaded_all else host
        if device.unified:
            main = host = device.pools[0].name
        gpu = any(p.kind == "gpu" for p in device.pools)
        offloaded = gpu and main != next((p.name for p in device.pools if p.kind == "host"), "")
        n_gpu = n_all + 1 if flags.gpu_layers in ("auto", "all", "-1") else int(flags.gpu_layers)
        offload = assign(n_all, n_gpu, (main,), (1.0,)) if gpu and (device.unified or offloaded) else assign(
            n_all, 0, (), ())
        tensors = ()
        if not arch.tensors or (offloaded and not device.unified):  # every tensor in the one pool, as in the file
            if flags.tensor_overrides:
                _weights(arch, flags, device, assign(n_all, 0, (), ()))  # its refusals
            weights = WeightBytes({main: arch.weights_bytes}, arch.weights_bytes, 0)
        else:
            tensors, wb = _tensor_map(arch, flags, device, offload)
            held = arch.weights_bytes + wb.repack if gpu and device.unified else wb.mapped + wb.repack
            weights = WeightBytes({main: held}, held - wb.repack, wb.repack)
        layers_on, output_on = (main,) * n_all, main
    return PlacementMap(mode=mode, host=host, main=main, offload=offload, layers_on=layers_on, output_on=output_on,
                        experts_on=expert_pools(arch, flags, device, layers_on), weights=weights, spread=spread,
                        compute=compute, tensors=tensors)


def _rpc_layers(arch: ModelArch, flags: ServerFlags, device: Device) -> int:
    """-ngl as a layer count for a spread plan: auto (the default) and all are every layer and the output
    (llama_model::n_gpu_layers); with --fit on, make_plan has already replaced an auto -ngl that does not fit
    by fit's own count (plan/fit.py)."""
    del device
    if flags.gpu_layers in ("all", "-1", "auto"):
        return arch.n_layer + arch.n_layer_nextn + 1
    return int(flags.gpu_layers)


def offload_of(arch: ModelArch, flags: ServerFlags, device: Device) -> Offload:
    """llama.cpp's layer assignment over the device's offload pools (placement.assign) for this command line."""
    devices = [p.name for p in device.pools if p.kind in ("gpu", "rpc")]
    split = split_shares(flags.tensor_split, len(devices)) or [float(p.budget_bytes) for p in device.pools
                                                                if p.kind in ("gpu", "rpc")]
    return output_stays(arch, device, assign(arch.n_layer + arch.n_layer_nextn, _rpc_layers(arch, flags, device),
                                             devices, split))


def output_stays(arch: ModelArch, device: Device, offload: Offload) -> Offload:
    """The offload marked `output_kept` when the output weight (output.weight, or token_embd when tied) is larger
    than the output layer's device accepts (Pool.max_tensor_bytes): that MUL_MAT's weight falls back to the CPU's
    buffer list (plan/weights.py), so the logits are computed there; the output norm stays on the device."""
    limit = tensor_limits(device).get(offload.output)
    if limit is None:
        return offload
    names = {t.name: t.nbytes for t in arch.tensors}
    size = names.get("output.weight", names.get("token_embd.weight", 0))
    return dataclasses.replace(offload, output_kept=True) if size > limit else offload


def rpc_compute(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, offload: Offload,
                n_outputs: int | None = None) -> dict[str, int]:
    """Each backend's compute buffer with RPC devices: the calibrated per-device estimate (placement.compute_terms,
    coefficients in data/compute_coefficients.json 'per_device'); `n_outputs` as llama-server reserves by default."""
    overrides = flags.cpu_moe_layers != 0 or bool(flags.tensor_overrides)
    copies = SCHED_MAX_COPIES if pipeline_parallel(arch, len(offload.devices), _rpc_layers_n(arch, offload, flags),
                                                   flags.split_mode, flags.no_kv_offload, overrides) else 1
    on_cpu = cpu_ops(arch.tensors, offload, flags.tensor_overrides) if flags.tensor_overrides and arch.tensors else {}
    terms = compute_terms(arch, memory, offload, copies=copies, cpu_moe_layers=flags.cpu_moe_layers,
                          no_kv_offload=flags.no_kv_offload, n_outputs=n_outputs, cpu_ops=on_cpu)
    estimate = device_compute(terms, coefficients()["per_device"]["coef"])
    if any("dense" in ops for ops in on_cpu.values()):  # such splits are not calibrated: the bound on every device
        bound = device_compute_bound(arch, memory)
        estimate = {d: max(v, bound) for d, v in estimate.items()}
    return estimate


def gpu_terms(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, offload: Offload
              ) -> tuple[str, dict[str, dict[str, int]]] | None:
    """(backend, graph terms per device) when the offload devices are local GPUs of one backend (placement.
    compute_terms with the build's reserved logits rows); None for the CPU alone, RPC devices or mixed backends."""
    backends = {backend_of(d) for d in offload.devices}
    if len(backends) != 1 or not backends <= set(GPU_BACKENDS):
        return None
    shape = memory.shape
    overrides = flags.cpu_moe_layers != 0 or bool(flags.tensor_overrides)
    copies = SCHED_MAX_COPIES if pipeline_parallel(arch, len(offload.devices), _rpc_layers_n(arch, offload, flags),
                                                   flags.split_mode, flags.no_kv_offload, overrides) else 1
    on_cpu = cpu_ops(arch.tensors, offload, flags.tensor_overrides) if flags.tensor_overrides and arch.tensors else {}
    rows = shape.reserve_outputs or min(shape.n_ubatch, shape.n_outputs_max)
    terms = compute_terms(arch, memory, offload, copies=copies, cpu_moe_layers=flags.cpu_moe_layers,
                          no_kv_offload=flags.no_kv_offload, n_outputs=rows, cpu_ops=on_cpu)
    backend = backends.pop()
    # the mixed tokens+embeddings path's input and its ggml_dup copy on the host (memory/backends.py host_bytes)
    terms[CPU]["mixed"] = 2 * 4 * arch.n_embd * shape.n_ubatch if shape.mixed_input else 0
    if backend != "Metal" and shape.n_ubatch >= OP_OFFLOAD_MIN_BATCH and offload.devices[0] not in terms \
            and CPU in offload.layers:
        # no layer on the first GPU, some on the CPU: it still runs their big-batch matmuls (op offload), taking
        # their input and giving their output as a layer's activations would
        terms[offload.devices[0]] = {**dict.fromkeys(terms[CPU], 0), "embd": 4 * arch.n_embd * shape.n_ubatch,
                                     "act": 4 * shape.n_ubatch * activation_width(arch)}
    if backend != "Metal" and shape.n_ubatch >= OP_OFFLOAD_MIN_BATCH and offload.devices[0] in terms:
        experts = bool(arch.n_expert) and (flags.cpu_moe_layers != 0 or any("exps" in ops for ops in on_cpu.values())
                                           or any("exps" in p for p, _ in flags.tensor_overrides))
        terms[offload.devices[0]]["wcopy"] = cpu_matrix_bytes(arch, experts, CPU in offload.layers)
        if terms[CPU]["act"]:  # the CPU layers' matmuls run on that GPU: the CPU keeps residual-width work only
            terms[CPU]["act"] = 4 * shape.n_ubatch * arch.n_embd
    return backend, terms


def gpu_compute(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, offload: Offload,
                calibrations: tuple[ComputeCalibration, ...] = ()) -> dict[str, DeviceCompute] | None:
    """Each busy device's compute buffer and the host side's (under CPU) for GPU offload devices of one backend
    (kvbook.memory.backends); None where the CPU or RPC estimate applies."""
    found = gpu_terms(arch, flags, memory, offload)
    if found is None:
        return None
    backend, terms = found
    return backend_compute(terms, backend, flash_attn=memory.shape.flash_attn,
                           mask_f32_input=memory.shape.mask_f32_input, arch=arch.arch, calibrations=calibrations,
                           embd_input=memory.shape.embd_input)


def _one_gpu(arch: ModelArch, device: Device, main: str) -> Offload | None:
    """Every layer on the one GPU pool `main` (a discrete GPU, or Metal's unified pool); None for a host pool."""
    pool = next(p for p in device.pools if p.name == main)
    if pool.kind != "gpu":
        return None
    n_all = arch.n_layer + arch.n_layer_nextn
    return output_stays(arch, device, assign(n_all, n_all + 1, (main,), (1.0,)))


def op_offload_compute(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device
                       ) -> dict[str, DeviceCompute] | None:
    """-ngl 0 beside a discrete GPU whose backend offloads big-batch ops (CUDA, ROCm, Vulkan, SYCL; not Metal):
    the first GPU runs the CPU layers' weight matmuls (ggml-backend.cpp ggml_backend_sched_backend_id_from_cur
    asks offload_op for an op whose weight sits in a host buffer; ggml-vulkan.cpp ggml_backend_vk_device_offload_op:
    a batch of at least 32), so it has a compute buffer of its own; None when that does not apply."""
    gpus = [p.name for p in device.pools if p.kind == "gpu"]
    if (device.unified or not gpus or "--no-op-offload" in flags.argv
            or memory.shape.n_ubatch < OP_OFFLOAD_MIN_BATCH):
        return None
    n_all = arch.n_layer + arch.n_layer_nextn
    return gpu_compute(arch, flags, memory, Offload((CPU,) * n_all, CPU, (gpus[0],)), device.calibrations)


def compute_offload(arch: ModelArch, flags: ServerFlags, device: Device,
                    where: PlacementMap | None = None) -> Offload | None:
    """The layer placement behind the plan's compute buffers (None when nothing runs on a GPU pool): the
    placement map's (`where`, else this command line's)."""
    return (where or placement_map(arch, flags, device)).compute


def device_computes(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device,
                    where: PlacementMap | None = None) -> dict[str, DeviceCompute] | None:
    """The GPU-backend compute buffers this plan places (device by pool name, the host side under CPU), with their
    intervals; None when the CPU backend (or RPC) holds them."""
    offload = compute_offload(arch, flags, device, where)
    if offload is None:
        return op_offload_compute(arch, flags, memory, device)
    return gpu_compute(arch, flags, memory, offload, device.calibrations)


def compute_note(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device,
                 where: PlacementMap | None = None) -> str:
    """What the plan assumed for GPU-backend compute buffers: each device's estimate and interval ('' on the CPU)."""
    gpu = device_computes(arch, flags, memory, device, where)
    if not gpu:
        return ""
    parts = ", ".join(f"{'host side' if d == CPU else d} {c.estimate / 2**20:.0f} MiB ({c.low / 2**20:.0f}-"
                      f"{c.high / 2**20:.0f})" for d, c in gpu.items())
    return (f"compute buffers (estimate, interval): {parts}; planned at the high end of each interval "
            f"({next(iter(gpu.values())).note})")


def dense_ops_on_cpu(arch: ModelArch, flags: ServerFlags, device: Device, where: PlacementMap | None = None) -> bool:
    """Whether -ot sends matmuls other than the experts of offloaded layers to the CPU (its compute is bounded)."""
    if not (flags.tensor_overrides and arch.tensors):
        return False
    where = where or placement_map(arch, flags, device)
    if not where.spread or where.compute is None:
        return False
    return any("dense" in ops for ops in cpu_ops(arch.tensors, where.compute, flags.tensor_overrides).values())


def _rpc_layers_n(arch: ModelArch, offload: Offload, flags: ServerFlags) -> int:
    """-ngl as a count (all layers and the output when everything is offloaded)."""
    off = sum(d != CPU for d in offload.layers) + (offload.output != CPU)
    return arch.n_layer + arch.n_layer_nextn + 1 if off == len(offload.layers) + 1 else off


def _rpc_compute_note() -> str:
    """What the per-device compute figure is, with its measured error (data/compute_coefficients.json)."""
    c = coefficients()["per_device"]
    return (f"each device that runs layers and the CPU reserve a compute buffer of their own, a calibrated estimate "
            f"(median {c['fit_median_error_pct']}% / max {c['fit_max_error_pct']}% off llama-fit-params on full-size "
            f"models; median {c['held_out_median_error_pct']}% / max {c['held_out_max_error_pct_5mib']}% off real "
            f"llama-server RPC runs, held out, buffers >= 5 MiB)")


def _by_device(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device,
               where: PlacementMap, compute_at: str = "high") -> dict[str, dict[str, int]]:
    """Bytes per pool when layers spread over devices: the map's assignment and weights (placement.py)."""
    host, offload, placed = where.host, where.offload, where.weights
    devices = list(offload.devices)
    weights = placed.by_device
    caches = caches_by_device(arch, memory, offload, flags.no_kv_offload)
    out = {p.name: dict.fromkeys(_PARTS, 0) for p in device.pools}
    out[host]["repack"] = placed.repack
    for name in (CPU, *devices):
        pool = host if name == CPU else name
        out[pool]["weights"] += weights.get(name, 0)
        out[pool]["kv"] += caches[name][0]
        out[pool]["recurrent"] += caches[name][1]
    busy = {*offload.layers, offload.output} & set(devices)
    # a device that only holds -ot tensors runs their ops too and reserves a buffer kvbook does not size (a note says so)
    if busy or any(weights.get(d) for d in devices):  # every device that runs layers, and the CPU, reserve their own
        gpu = gpu_compute(arch, flags, memory, offload, device.calibrations)
        estimate = ({d: _at(c, compute_at) for d, c in gpu.items()} if gpu is not None
                    else rpc_compute(arch, flags, memory, offload))
        for name in busy:
            out[name]["compute"] += estimate.get(name, 0)
        out[host]["compute"] += estimate.get(CPU, 0)
        return out
    out[host]["compute"] += memory.compute.bytes  # nothing offloaded: the one CPU buffer
    return out


def _estimated(arch: ModelArch) -> dict[str, int]:
    """`estimated_groups` with its rounding left on the token embeddings, so the groups add up to the weights."""
    groups = estimated_groups(arch)
    groups["token_embd"] = groups.get("token_embd", 0) + arch.weights_bytes - sum(groups.values())
    return groups


def expert_pools(arch: ModelArch, flags: ServerFlags, device: Device, layers_on: tuple[str, ...]) -> tuple[str, ...]:
    """The pool of each layer's experts: the CPU where --cpu-moe, --n-cpu-moe or -ot keep them, an -ot device, else
    the layer's pool; () for a dense model."""
    if not arch.n_expert:
        return ()
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    if arch.tensors:
        devs = expert_devices(arch.tensors, layers_on, overrides=flags.tensor_overrides,
                              cpu_moe_layers=flags.cpu_moe_layers, bufts=override_devices(device))
        return tuple(host if d == CPU else d for d in devs)
    moe = overrides_as_cpu_moe(flags.tensor_overrides, arch.source) if flags.tensor_overrides else 0
    moe = -1 if moe < 0 or flags.cpu_moe_layers < 0 else max(moe, flags.cpu_moe_layers)
    return tuple(host if moe < 0 or il < moe else d for il, d in enumerate(layers_on))


def two_limits(device: Device) -> tuple[str, str] | None:
    """(GPU pool, RAM pool) of unified memory with two limits (Apple: Metal buffers against the working set,
    everything against physical RAM less what macOS keeps); None for one pool or discrete devices."""
    if not device.unified:
        return None
    gpu = next((p.name for p in device.pools if p.kind == "gpu"), None)
    ram = next((p.name for p in device.pools if p.kind == "host"), None)
    return (gpu, ram) if gpu and ram else None


def _unified_offload(arch: ModelArch, flags: ServerFlags, gpu: str) -> Offload:
    """The layers on unified memory's one GPU device: -ngl of them (all by default), none with -dev none."""
    n_all = arch.n_layer + arch.n_layer_nextn
    n_gpu = 0 if flags.devices == ("none",) else (
        n_all + 1 if flags.gpu_layers in ("auto", "all", "-1") else int(flags.gpu_layers))
    return assign(n_all, n_gpu, (gpu,), (1.0,)) if n_gpu else assign(n_all, 0, (), ())


def _unified_parts(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device,
                   where: PlacementMap, compute_at: str = "high") -> dict[str, dict[str, int]]:
    """Bytes per pool on unified memory with two limits: the Metal buffers (offloaded layers' weights, their KV and
    recurrent state, the compute buffer) on the GPU pool; the CPU's tensors (token embeddings, layers or experts
    left on the CPU: mapped from the file) and CPU_REPACK copies on the RAM pool, which also covers the GPU pool."""
    parts = {p.name: dict.fromkeys(_PARTS, 0) for p in device.pools}
    gpu, ram, offload, placed = where.main, where.host, where.offload, where.weights
    n_gpu = sum(d != CPU for d in (*offload.layers, offload.output))
    on_gpu = placed.by_device.get(gpu, 0)
    parts[gpu]["weights"] += on_gpu + memory.lora_bytes
    parts[ram]["weights"] += max(arch.weights_bytes - on_gpu, 0) + placed.repack  # the file's other tensors, mapped
    parts[ram]["repack"] += placed.repack
    for name, (kv, rec) in caches_by_device(arch, memory, offload, flags.no_kv_offload).items():
        pool = ram if name == CPU else gpu
        parts[pool]["kv"] += kv
        parts[pool]["recurrent"] += rec
    # Metal's own compute buffer counts against the working set; the CPU backend's beside it (graph inputs, the
    # residual stream from get_rows: llama.cpp logs it as "CPU compute buffer") is host memory, on RAM alone
    computes = gpu_compute(arch, flags, memory, offload, device.calibrations) if n_gpu else None
    if computes is None:
        parts[gpu if n_gpu else ram]["compute"] += memory.compute.bytes
    else:
        for dev, c in computes.items():
            parts[ram if dev == CPU else gpu]["compute"] += _at(c, compute_at)
    return parts


def _usage(name: str, budget: int, part: dict[str, int], inside: tuple[PoolUsage, ...] = ()) -> PoolUsage:
    """One pool's usage and verdict: does not fit when its start allocation (with the pools it covers) exceeds the
    budget, tight when run-time growth takes it within the margin."""
    start = part["weights"] + part["kv"] + part["recurrent"] + part["compute"] + part["output"] + sum(
        u.need_bytes - u.host_extras_bytes for u in inside)
    need = start + part["extras"] + sum(u.host_extras_bytes for u in inside)
    if start > budget:
        verdict = Verdict.DOES_NOT_FIT
    elif need > budget - margin_bytes(budget):
        verdict = Verdict.TIGHT
    else:
        verdict = Verdict.FITS
    return PoolUsage(pool=name, need_bytes=need, budget_bytes=budget, verdict=verdict, weights_bytes=part["weights"],
                     kv_bytes=part["kv"], recurrent_bytes=part["recurrent"], compute_bytes=part["compute"],
                     output_bytes=part["output"], host_extras_bytes=part["extras"], repack_bytes=part["repack"],
                     includes=tuple(u.pool for u in inside))


def _at(c: DeviceCompute, compute_at: str) -> int:
    """A GPU backend's compute buffer at its interval's high end (what plans place) or at the estimate (what --fit's
    dry run is compared with: ops/fit_log.py)."""
    return c.high if compute_at == "high" else c.estimate


def place(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device,
          compute_at: str = "high") -> tuple[PoolUsage, ...]:
    """Bytes each pool must hold, by kind (`place_mapped` without the map)."""
    return place_mapped(arch, flags, memory, device, compute_at=compute_at)[0]


def place_mapped(arch: ModelArch, flags: ServerFlags, memory: MemoryPlan, device: Device,
                 where: PlacementMap | None = None, compute_at: str = "high"
                 ) -> tuple[tuple[PoolUsage, ...], PlacementMap]:
    """Bytes each pool must hold, by kind, read from the placement map (returned with them; `where`: the map of
    these flags already computed, e.g. at another -c, which the map does not depend on). Unified memory: one
    pool holds everything, host extras included; with two limits (Apple) the GPU pool holds the Metal buffers
    and the RAM pool everything (`_unified_parts`)."""
    if memory.lora_bytes and _spread(arch, flags, device):
        raise BadInput("--lora with layers spread over devices: the adapters follow each base tensor's device, "
                       "which kvbook does not model yet")
    if memory.draft is not None and any(p.kind == "rpc" for p in device.pools):
        raise BadInput("-md with --rpc devices: how llama.cpp spreads the draft then is not modelled yet")
    if memory.draft is not None and len(offload_pools(device)) > 1:
        raise BadInput(f"-md with several GPUs ({', '.join(offload_pools(device))}): how llama.cpp splits the draft "
                       "over them is not modelled yet (keep one GPU with -dev or -sm none: the draft inherits them)")
    if uses_mtp(flags) and _spread(arch, flags, device):
        raise BadInput("--spec-type draft-mtp with layers spread over devices (several GPUs, RPC, a partial -ngl or "
                       "experts on the CPU): where llama.cpp puts the MTP context then is not modelled yet")
    if memory.projector is not None and any(p.kind == "rpc" for p in device.pools):
        raise BadInput("--mmproj with --rpc devices: where llama.cpp puts the projector then is not modelled yet")
    if (not arch.tensor_groups and any(p.kind == "rpc" for p in device.pools)
            and _spread(arch, flags, device) and not two_limits(device)):
        raise BadInput(f"{arch.source}: a multi-device plan needs the GGUF's tensors (a preset or config.json has "
                       "no per-layer sizes); pass the GGUF path or URL")
    where = where or placement_map(arch, flags, device)
    host, limits = where.host, where.mode == "two-limits"
    if where.mode == "two-limits":
        parts = _unified_parts(arch, flags, memory, device, where, compute_at)
    elif where.mode == "spread":
        parts = _by_device(arch, flags, memory, device, where, compute_at)
    else:  # one offload device or none: -ts changes nothing (split_note)
        parts = {p.name: dict.fromkeys(_PARTS, 0) for p in device.pools}
        main = where.main
        kv_pool = host if flags.no_kv_offload else main
        weights, repack = where.weights.by_device[main], where.weights.repack
        parts[main]["weights"] += weights + memory.lora_bytes
        parts[main]["repack"] += repack
        if main != host:  # every layer on the one GPU pool
            gpu = gpu_compute(arch, flags, memory, where.compute, device.calibrations) if where.compute else None
        else:
            gpu = op_offload_compute(arch, flags, memory, device)
        if gpu is None:
            parts[main]["compute"] += memory.compute.bytes
        else:  # the device's buffer and the host side's (the same pool on unified memory), at the interval's high end
            for dev, c in gpu.items():
                parts[host if dev == CPU else dev]["compute"] += _at(c, compute_at)
        parts[kv_pool]["kv"] += memory.kv_bytes
        parts[kv_pool]["recurrent"] += memory.recurrent_bytes
    parts[host]["output"] += memory.output_bytes
    parts[host]["extras"] += memory.host_extras.bytes
    if memory.draft is not None:
        if not memory.draft.shape.n_ctx:
            raise BadInput("the draft model has no context")
        pool = mtp_pool(arch, flags, device) if uses_mtp(flags) else draft_pool(arch, flags, device)
        d = memory.draft
        weights, repack = _draft_weights(arch, flags, device, pool, d.weights_bytes)
        parts[pool]["weights"] += weights
        parts[pool]["repack"] += repack
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
    by_pool = {p.name: _usage(p.name, p.budget_bytes, parts[p.name]) for p in device.pools
               if p.name != host or not limits}
    if limits:  # physical RAM holds the Metal buffers too
        by_pool[host] = _usage(host, next(p.budget_bytes for p in device.pools if p.name == host), parts[host],
                               tuple(by_pool.values()))
    return tuple(by_pool[p.name] for p in device.pools), where


def _draft_weights(arch: ModelArch, flags: ServerFlags, device: Device, pool: str, total: int) -> tuple[int, int]:
    """(weights, of which CPU_REPACK) of a draft on `pool`: on the CPU it is mapped and repacked like the target
    (the server copies the target's parameters, -nr included: common/speculative.cpp)."""
    on_cpu = not any(p.kind == "gpu" for p in device.pools) or (
        not device.unified and pool == next((p.name for p in device.pools if p.kind == "host"), ""))
    if not on_cpu or arch.draft is None or not arch.draft.tensors:
        return total, 0
    n_all = arch.draft.n_layer + arch.draft.n_layer_nextn
    wb = tensor_weights(arch.draft.tensors, assign(n_all, 0, (), ()), repack_on=repack_cpu(flags, device))
    return wb.mapped + wb.repack, wb.repack


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


def mtp_pool(arch: ModelArch, flags: ServerFlags, device: Device) -> str:
    """Where the MTP context's KV cache and compute buffer sit: with the model's layers (the NextN layers are the
    last ones; offload_kqv puts their cache on their device), the GPU pool on unified memory (memory/speculative.py)."""
    limits = two_limits(device)
    if limits:
        return limits[0] if _unified_offload(arch, flags, limits[0]).layers[-1] != CPU else limits[1]
    if device.unified:
        return device.pools[0].name
    host = next((p.name for p in device.pools if p.kind == "host"), device.pools[0].name)
    return device.main_pool.name if _offloaded(arch, flags, device) else host


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

    mapped: list[PlacementMap] = []  # the placement map, computed at the first -c tried (the map has no -c in it)

    def ok(n: int) -> bool:
        at = replace(flags, ctx=n * step)
        usages, where = place_mapped(arch, at, plan_memory(arch, at), device, mapped[0] if mapped else None)
        mapped[:] = [where]
        return accept(worst(usages))

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
    # the context is searched for the start allocation with its margin: host growth (prompt cache, checkpoints) is
    # not the context's to fix (a tiny context would only shrink the checkpoints); its own alternatives follow
    no_growth = replace(flags, cache_ram_mib=0, ctx_checkpoints=0)
    shorter = largest_context(arch, no_growth, device, lambda v: v is Verdict.FITS, below=asked)
    if not shorter and now is Verdict.DOES_NOT_FIT:
        shorter = largest_context(arch, no_growth, device, lambda v: v is not Verdict.DOES_NOT_FIT, below=asked)
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
    if now is Verdict.TIGHT and memory.host_extras.checkpoint_bytes:
        for n in (16, 8, 4, 2, 1, 0):  # fewer checkpoints per slot: the most that fits, or none
            if n >= flags.ctx_checkpoints:
                continue
            fewer = replace(flags, ctx_checkpoints=n)
            if verdict_of(arch, fewer, device) is Verdict.FITS:
                options.append((f"fewer context checkpoints: --ctx-checkpoints {n}", fewer))
                break
    out = []
    for change, alt in options:
        try:
            alt_memory = plan_memory(arch, alt)
        except BadInput:
            continue  # e.g. a quantized cache this model's row widths do not allow
        usages = place(arch, alt, alt_memory, device)
        verdict = worst(usages)
        if _better(verdict, now):  # total_bytes as the plan's: what the devices hold in all (summary._held)
            argv = alt.argv[1:] if alt.argv and not alt.argv[0].startswith("-") else alt.argv
            out.append(Alternative(change=change, flags=tuple(argv), n_ctx=alt_memory.shape.n_ctx,
                                   total_bytes=sum(u.need_bytes for u in usages), verdict=verdict))
    return tuple(out)


def mtp_offer(arch: ModelArch, flags: ServerFlags, device: Device,
              usages: tuple[PoolUsage, ...]) -> SpecOffer | Note | None:
    """The offer (plan/spec_offer.py) of the same line with --spec-type draft-mtp; a note saying why not where the model has an MTP head kvbook cannot plan on this line or that
    does not fit; None without an MTP head, with speculation already on, a draft model given or a line that does not
    fit itself. `usages` are the planned line's."""
    if flags.spec_types or flags.draft_model or flags.draft_hf_repo or not arch.n_layer_nextn:
        return None
    if worst(usages) is not Verdict.FITS:
        return None  # the line itself is short of memory: its own alternatives (and the solver's) come first
    mtp = replace(flags, spec_types=("draft-mtp",))
    base, arch = arch, arch.file_model or arch  # the MTP line loads the NextN layers the planned line skips
    try:
        check_mtp(arch)
        memory = plan_memory(arch, mtp)
        with_mtp = place(arch, mtp, memory, device)
        change = "MTP speculative decoding: --spec-type draft-mtp"
        if worst(with_mtp) is not Verdict.FITS:  # the MTP line at the largest context where it fits, else starts
            ctx = (largest_context(arch, mtp, device, lambda v: v is Verdict.FITS, below=memory.shape.n_ctx)
                   or (0 if worst(with_mtp) is Verdict.TIGHT else largest_context(
                       arch, mtp, device, lambda v: v is not Verdict.DOES_NOT_FIT, below=memory.shape.n_ctx)))
            if not ctx and worst(with_mtp) is Verdict.DOES_NOT_FIT:
                return Note("speculative.mtp-unplanned", "the model has an MTP head; --spec-type draft-mtp does not "
                            "start on this device even at the smallest context")
            if ctx:
                flags, mtp = replace(flags, ctx=ctx), replace(mtp, ctx=ctx)
                usages = place(base, flags, plan_memory(base, flags), device)
                memory = plan_memory(arch, mtp)
                with_mtp = place(arch, mtp, memory, device)
                change += f" -c {ctx}"
    except BadInput as e:  # an MTP head kvbook cannot plan on this line yet: say why, offer nothing
        return Note("speculative.mtp-unplanned", f"the model has an MTP head, but kvbook does not plan it on this line "
                    f"yet ({e}), so no MTP alternative is offered")
    verdict = worst(with_mtp)
    before = {u.pool: u.need_bytes for u in usages}
    extra = tuple((u.pool, u.need_bytes - before.get(u.pool, 0)) for u in with_mtp)
    argv = mtp.argv[1:] if mtp.argv and not mtp.argv[0].startswith("-") else mtp.argv
    n = mtp.spec_draft_n_max
    low, high = speedup_interval(base, n)
    alt = Alternative(change=f"{change} (decode x{low:.2f}-x{high:.2f}, estimate)",
                      flags=tuple(argv), n_ctx=memory.shape.n_ctx, total_bytes=sum(u.need_bytes for u in with_mtp),
                      verdict=verdict)
    return SpecOffer(alternative=alt, extra_bytes=extra, speedup=(low, high), n_draft=n)


def compute_backend(device: Device, where: PlacementMap) -> str:
    """The backend that holds the main compute buffer: the GPU pool's backend (CUDA0 -> CUDA, Metal) when
    the model runs there (every layer and the output offloaded), else CPU."""
    gpu = next((p for p in device.pools if p.kind == "gpu"), None)
    if gpu is None or not (device.unified or CPU not in (*where.offload.layers, where.offload.output)):
        return "CPU"
    return gpu.name.rstrip("0123456789") or "GPU"


def _maps_weights(flags: ServerFlags) -> bool:
    """Whether CPU weights are a file mapping: -lm / --load-mode is mmap (or auto, the default), not none, mlock
    or direct-io (src/llama-model-loader.cpp: use_mmap for MMAP, MMAP_MLOCK and AUTO; mlock pins them)."""
    argv = list(flags.argv)
    for i, a in enumerate(argv[:-1]):
        if a in ("-lm", "--load-mode"):
            return argv[i + 1] in ("mmap", "auto")
    return True


def _repack_notes(arch: ModelArch, flags: ServerFlags, device: Device, usages: tuple[PoolUsage, ...]) -> list[Note]:
    """What the plan assumed about llama.cpp's CPU_REPACK buffer (plan/weights.py)."""
    if not flags.repack:
        return []
    if host_buffer_first(device) and not flags.no_host:
        return [Note("repack.host-buffer-first", "CPU_REPACK: none; with a GPU host buffer type first and mmap, "
                     "llama.cpp leaves the CPU's weights mapped (not repacked; --no-host would repack them)")]
    repack = sum(u.repack_bytes for u in usages)
    cpu = host_cpu(device)
    if not arch.tensors:
        return [Note("repack.not-counted", f"CPU_REPACK not counted: {arch.source} has no GGUF tensors to size it (it "
                     "copies some quantized CPU weights; -nr turns it off)")]
    if not repack:
        return []
    return [Note("repack.host-copy", f"CPU_REPACK: {repack / 2**20:.2f} MiB of CPU weights repacked for {cpu.name}, "
                 "counted on top of the mapped weights (their pages stay mapped); -nr turns it off")]


def make_plan(arch: ModelArch, flags: ServerFlags, device: Device, *, memory: MemoryPlan | None = None,
              accounting: str = "kvbook", search: bool = True) -> Plan:
    """Plan one command line on one device. `memory` comes from elsewhere (llama.cpp's own accounting) for an
    architecture kvbook has no rule for; then, or with search False, no context is searched and no alternative
    is offered."""
    searched = memory is None and search
    detected = detection_note(device)
    calibrations = device.calibrations
    device = with_rpc(device, flags.rpc)  # binds the --rpc endpoints (a no-op without RPC devices)
    device = dataclasses.replace(effective_device(device, flags), calibrations=calibrations)
    fit = None
    memory = memory or plan_memory(arch, flags)
    usages, where = place_mapped(arch, flags, memory, device)
    if searched:  # what --fit does at start (plan/fit.py): the plan is of the flags the server then runs
        from kvbook.plan.fit import fit_notes, predict_fit  # fit.py plans its candidates with this module

        given = flags
        flags, fit = predict_fit(arch, flags, device, place, usages)
        if flags is not given:
            memory = plan_memory(arch, flags)
            usages, where = place_mapped(arch, flags, memory, device)
    layers_on, output_on = where.layers_on, where.output_on
    notes: list[Note] = []
    shapes_only = Note("spread.shape-estimates",
                       "per-layer and expert sizes estimated from the model's shapes (no GGUF tensors)")
    if where.spread and device_computes(arch, flags, memory, device, where) is not None:
        notes.append(Note("spread.gpu-compute", "layers spread over devices: each device that runs layers and the host "
                          "side reserve a compute buffer of their own (the GPU backend's model below)"))
        if not arch.tensor_groups:
            notes.append(shapes_only)
    elif where.spread:
        gpus = [p.name for p in device.pools if p.kind == "gpu"] if not device.unified else []
        notes.append(Note("spread.rpc-compute", "layers spread over devices: " + _rpc_compute_note() + (
            f" (calibrated on the CPU backend over RPC; the local GPUs' ({', '.join(gpus)}) buffers are not calibrated "
            "for their backend: a CUDA or Metal device's buffer differs)" if gpus else "")))
        if dense_ops_on_cpu(arch, flags, device, where):
            notes.append(Note("spread.dense-ops-bound", "-ot sends matmuls of offloaded layers other than their experts "
                              "to the CPU: each device's compute buffer is the upper bound fitted to loopback RPC runs "
                              "(never below the log there), not the calibrated estimate, which such splits were not "
                              "fitted on"))
        if not arch.tensor_groups:
            notes.append(shapes_only)
    notes += _repack_notes(arch, flags, device, usages)
    if text := compute_note(arch, flags, memory, device, where):
        notes.append(Note("compute.gpu-intervals", text))
    idle = [u.pool for u in usages if u.weights_bytes and u.pool not in {*layers_on, output_on}
            and any(p.name == u.pool and p.kind == "rpc" for p in device.pools)]
    if idle:
        notes.append(Note("ot.idle-device", f"{', '.join(idle)} hold(s) -ot tensors but run(s) no layer: the compute "
                          "buffer there is not modelled (the bound is for devices that run layers; measured far above "
                          "it)"))
    if not arch.n_expert and (flags.cpu_moe_layers or any("exps" in pat for pat, _ in flags.tensor_overrides)):
        notes.append(Note("moe.no-experts", f"--cpu-moe / --n-cpu-moe / -ot on experts: {arch.name} has no experts, "
                          "so nothing moves to the CPU (llama-server accepts the flag and its overrides match no "
                          "tensor)"))
    idle_ot = unmatched_patterns(arch.tensors, flags.tensor_overrides) if arch.tensors else []
    if idle_ot and arch.n_expert:
        notes.append(Note("ot.matches-nothing", f"-ot {', '.join(idle_ot)}: matches no tensor of {arch.name}, so it "
                          "moves nothing (llama-server accepts it)"))
    if text := split_note(flags, device):
        notes.append(Note("split.no-effect", text))
    verdict = worst(usages)
    if detected:
        notes.append(Note("device.detected", f"this machine: {detected}"))
    if text := ram_note(device):
        notes.append(Note("device.apple-ram", text))
    if not arch.weights_exact:
        notes.append(Note("weights.approximate", f"weights are {arch.weights_note}"))
    host_use = next((u for u in usages if u.pool == next((p.name for p in device.pools if p.kind == "host"), "")), None)
    if host_use and host_use.verdict is Verdict.DOES_NOT_FIT and host_use.weights_bytes and _maps_weights(flags):
        notes.append(Note("host.weights-resident", f"host RAM: kvbook counts the {host_use.weights_bytes / GiB:.1f} GiB "
                          "of CPU weights as resident. llama.cpp repacks those it can (CPU_REPACK, an allocated buffer: "
                          "it then fails to start, 'unable to allocate CPU_REPACK buffer', seen here for gpt-oss-120b on "
                          "24 GiB); with --no-repack they stay mapped from the file (-lm mmap, the default) and it starts "
                          "(seen here), paging weights in from disk as they are used"))
    if memory.shape.n_ctx_seq > arch.n_ctx_train:
        notes.append(Note("context.beyond-training",
                          f"n_ctx_seq {memory.shape.n_ctx_seq} exceeds the training context {arch.n_ctx_train}"))
    if fit is not None:
        notes += fit_notes(fit)
    elif flags.fit:
        notes.append(Note("fit.unpredicted-accounting", "--fit is on (default): llama-server may lower an unset -c or "
                          "-ngl at start if it does not fit (not predicted: the caches are llama.cpp's own accounting)"))
    if flags.from_env:
        notes.append(Note("flags.from-environment", "read from the environment, as llama-server reads them (the "
                          "command line wins): " + " ".join(flags.from_env)))
    if flags.cache_ram_mib < 0:
        notes.append(Note("host-growth.unbounded", "--cache-ram -1: the prompt cache has no limit; host growth is "
                          "unbounded"))
    offer = mtp_offer(arch, flags, device, usages) if searched else None
    if isinstance(offer, Note):
        notes.append(offer)
        offer = None
    elif offer is not None:
        notes.append(offer.note())
    return Plan(
        model=arch,
        flags=flags,
        device=device,
        memory=memory,
        pools=usages,
        verdict=verdict,
        max_ctx=max_context(arch, flags, device) if searched else 0,
        alternatives=(*(alternatives(arch, flags, device) if searched and verdict is not Verdict.FITS else ()),
                      *((offer.alternative,) if offer is not None else ())),
        litellm_max_input_tokens=min(memory.shape.n_ctx_seq, flags.slot_ctx_cap or memory.shape.n_ctx_seq),
        notes=tuple(notes),
        compute_backend=compute_backend(device, where),
        accounting=accounting,
        layers_on=layers_on,
        output_on=output_on,
        experts_on=where.experts_on,
        fit=fit,
    )
