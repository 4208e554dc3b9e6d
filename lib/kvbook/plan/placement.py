"""Which device holds what: llama.cpp's layer assignment (`-ngl`, `-ts`, several devices) and the bytes of
weights, KV and recurrent state it puts on each device.

The rules are the pinned build's `llama_model::load_tensors` (src/llama-model.cpp): the input layer
(token embeddings) always stays on the CPU; the last `-ngl` of the n_layer + 1 layers (the output layer
counts as the last) are offloaded; offloaded layer i goes to the first device whose cumulative split
exceeds (i - first offloaded) / offloaded count, the split being `-ts` or else each device's free memory.
A tied output (no output.weight) holds a copy of the token embeddings on its device. Each cache puts a
layer's K/V (or recurrent state) on that layer's device, all on the CPU with --no-kv-offload.
Weights by group (below) serve models known only by their shapes; with the GGUF's tensor list, plan/weights.py
places them tensor by tensor (-ot, CPU_REPACK).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvbook.errors import BadInput
from kvbook.interface import CacheKind, MemoryPlan, ModelArch
from kvbook.memory.compute import activation_width
from kvbook.memory.rules import attention_layers, cell_bytes

CPU = "CPU"
MAPPED = "CPU_Mapped"  # the buffer of the CPU's tensors left in the file mapping


@dataclass(frozen=True)
class Offload:
    """Where every layer of the model sits: a device name per layer (main and NextN), and the output's."""

    layers: tuple[str, ...]
    output: str
    devices: tuple[str, ...]  # the offload devices, in llama.cpp's order
    output_kept: bool = False  # the output weight is too large for `output`'s device: it and the logits stay on the CPU


@dataclass(frozen=True)
class PlacedTensor:
    """One use of a GGUF tensor where llama.cpp puts it: its device, its buffer type, and the bytes it takes there
    (what the per-device weights, CPU_Mapped and CPU_REPACK are summed from)."""

    name: str  # the GGUF tensor's name, or a tensor group's (token_embd, output, L<i>, L<i>.exps) for a model
    # known by its shapes
    device: str  # CPU or an offload device (llama.cpp's name)
    buffer: str  # the offload device's own buffer (its name), CPU_Mapped, CPU_REPACK, or CPU (allocated: -lm none)
    nbytes: int  # the tensor's bytes where mapped, padded to ALIGNMENT where allocated (0: the tied output's
    # CPU copy without mmap, which is token_embd's own data)
    file: int = 0  # where a mapped tensor's bytes lie (the CPU maps one range per file)
    offset: int = 0
    output: bool = False  # the tied output's use of token_embd (TENSOR_DUPLICATED)


def assign(n_layer_all: int, n_gpu_layers: int, devices: Sequence[str], split: Sequence[float]) -> Offload:
    """llama.cpp's assignment of n_layer_all repeating layers and the output layer to CPU and devices."""
    if not devices:
        return Offload((CPU,) * n_layer_all, CPU, ())
    if len(split) != len(devices) or any(x < 0 for x in split) or not sum(split) > 0:
        raise BadInput(f"the split needs one non-negative share per device ({len(devices)}), not all zero")
    points, total = [], 0.0
    for share in split:
        total += share
        points.append(total)
    points = [p / total for p in points]
    first = max(n_layer_all + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer_all + 1)

    def device_of(il: int) -> str:
        if il < first or il - first >= active:
            return CPU
        return devices[min(bisect.bisect_right(points, (il - first) / active), len(devices) - 1)]

    return Offload(tuple(device_of(il) for il in range(n_layer_all)), device_of(n_layer_all), tuple(devices))


def _device_of(key: str, offload: Offload, cpu_moe_layers: int = 0) -> str:
    """The device of a tensor group; --cpu-moe (-1) / --n-cpu-moe N keep experts of layers < N on the CPU
    (common/arg.cpp: a CPU buffer override for blk.<i>.ffn_(up|down|gate|gate_up)_exps)."""
    if key.startswith("L"):
        layer = int(key[1:].split(".")[0])
        if key.endswith(".exps") and (cpu_moe_layers < 0 or layer < cpu_moe_layers):
            return CPU
        return offload.layers[layer] if layer < len(offload.layers) else CPU
    return offload.output if key == "output" else CPU


def group_buffers(groups: Mapping[str, int], offload: Offload, cpu_moe_layers: int = 0) -> tuple[PlacedTensor, ...]:
    """Each tensor group's device and buffer for a model known by its shapes: token embeddings and ungrouped
    tensors on the CPU (mapped), a layer's groups with their layer (experts on the CPU under --cpu-moe /
    --n-cpu-moe), and a tied output layer on another device holding a copy of the token embeddings there."""
    out = []
    for key, size in groups.items():
        dev = _device_of(key, offload, cpu_moe_layers)
        out.append(PlacedTensor(key, dev, MAPPED if dev == CPU else dev, size))
    if offload.output != CPU and _tied(groups):
        out.append(PlacedTensor("token_embd", offload.output, offload.output, groups.get("token_embd", 0), output=True))
    return tuple(out)


def weights_by_device(groups: Mapping[str, int], offload: Offload,
                      ranges: Sequence[Sequence[tuple[str, int, int]]] = (), cpu_moe_layers: int = 0) -> dict[str, int]:
    """Tensor bytes per device, summed from `group_buffers`. With the file ranges, the CPU's figure is what
    llama.cpp maps (CPU_Mapped): per file, from the first CPU tensor to the end of the last."""
    out = {CPU: 0, **{d: 0 for d in offload.devices}}
    for p in group_buffers(groups, offload, cpu_moe_layers):
        out[p.device] += p.nbytes
    if ranges:
        mapped = 0
        for file_ranges in ranges:
            cpu = [(a, b) for key, a, b in file_ranges if _device_of(key, offload, cpu_moe_layers) == CPU]
            mapped += max(b for _, b in cpu) - min(a for a, _ in cpu) if cpu else 0
        out[CPU] = mapped
    return out


def estimated_groups(arch: ModelArch) -> dict[str, int]:
    """Tensor bytes by group for a model known only by its shapes (a preset, a config.json): the weights
    spread over embeddings, output and layers by parameter count, experts apart. An estimate, like its weights."""
    embd = arch.n_vocab * arch.n_embd
    attn = sum(arch.n_embd * arch.head_k * (2 * h + 2 * kv) for h, kv in zip(arch.n_head, arch.n_head_kv))
    exps = 3 * arch.n_embd * arch.n_ff_exp * arch.n_expert if arch.n_expert and arch.n_ff_exp else 0
    dense = 3 * arch.n_embd * arch.n_ff if not exps else 0
    params = 2 * embd + attn + arch.n_layer * (dense + exps)
    per_param = arch.weights_bytes / params if params else 0.0
    out = {"token_embd": int(embd * per_param), "output": int(embd * per_param)}
    for il in range(arch.n_layer):
        out[f"L{il}"] = int((attn / arch.n_layer + dense) * per_param)
        if exps:
            out[f"L{il}.exps"] = int(exps * per_param)
    return out


def _tied(groups: Mapping[str, int]) -> bool:
    """No output.weight of its own (output_norm alone is tiny): llama.cpp reuses the token embeddings."""
    return groups.get("output", 0) < groups.get("token_embd", 0) // 100


def layer_cache_bytes(arch: ModelArch, memory: MemoryPlan) -> tuple[tuple[int, int], ...]:
    """(attention KV bytes, recurrent bytes) of each layer (main and NextN) for this memory plan: a cache
    puts each layer's K/V, or its recurrent state, with that layer."""
    shape = memory.shape
    out = [[0, 0] for _ in range(arch.n_layer + arch.n_layer_nextn)]
    full, swa = attention_layers(arch)
    cells = {c.kind: c.cells for c in memory.caches}
    for kind, layers in ((CacheKind.KV, full), (CacheKind.SWA, swa)):
        for il in layers:
            k, v = cell_bytes(arch, [il], shape.type_k, shape.type_v, shape.flash_attn)
            out[il][0] += (k + v) * cells.get(kind, 0) * shape.n_stream
    n_rec = sum(arch.is_recurrent)
    rec_total = sum(c.bytes for c in memory.caches if c.kind is CacheKind.RECURRENT)  # rollback rows included
    if n_rec:
        for il in range(arch.n_layer):
            if arch.is_recurrent[il]:
                out[il][1] += rec_total // n_rec
    return tuple((kv, rec) for kv, rec in out)


def caches_by_device(arch: ModelArch, memory: MemoryPlan, offload: Offload,
                     no_kv_offload: bool = False) -> dict[str, tuple[int, int]]:
    """(attention KV bytes, recurrent bytes) per device, each layer's share on its layer's device."""
    out = {CPU: (0, 0), **{d: (0, 0) for d in offload.devices}}
    for il, (kv_l, rec_l) in enumerate(layer_cache_bytes(arch, memory)):
        dev = CPU if no_kv_offload else offload.layers[il]
        kv, rec = out[dev]
        out[dev] = (kv + kv_l, rec + rec_l)
    return out


# A compute buffer per device, measured over loopback RPC (Gemma 3 270M, SmolLM2 135M, a synthetic Qwen3-MoE;
# -c 4096/16384, -ub 256/512, -np 1/2, -fa on/off, -ngl 4/all: 21 llama-server runs): every busy device and the
# CPU reserve about n_ubatch x (8 bytes per KV cell + 19-21 bytes per unit of activation width), plus f32
# attention scores without flash attention. The bound takes 24 bytes and two score copies: at most 17% high
# on the first device, more on the others. An upper bound, kept as the solver's reserve when it sizes a -ts split
# (plan/solver.py split_for); plans use the calibrated compute_terms below.
_MASK_BYTES_PER_CELL = 8
_ACTIVATION_BYTES = 24


def device_compute_bound(arch: ModelArch, memory: MemoryPlan) -> int:
    """An upper bound of the compute buffer each RPC device that runs layers, and the CPU beside them, reserves
    (see the measurements above); the single-device CPU estimate (memory.compute) is far below them."""
    shape = memory.shape
    n_kv = max((c.cells for c in memory.caches if c.kind is not CacheKind.RECURRENT), default=0)
    per_token = _MASK_BYTES_PER_CELL * n_kv + _ACTIVATION_BYTES * activation_width(arch)
    if not shape.flash_attn:
        per_token += 2 * 4 * max(arch.n_head, default=0) * n_kv
    return shape.n_ubatch * per_token


SCHED_MAX_COPIES = 4  # GGML_SCHED_MAX_COPIES (ggml/src/ggml-backend.cpp): input copies with pipeline parallelism


def pipeline_parallel(arch: ModelArch, n_devices: int, n_gpu_layers: int, split_mode: str, no_kv_offload: bool,
                      overrides: bool) -> bool:
    """llama_context's condition for pipeline parallelism (src/llama-context.cpp, llama_context constructor): more
    than one device, every layer offloaded, -sm layer, KV offloaded and no tensor overrides (-ot, --n-cpu-moe);
    RPC devices report async compute and events, so it holds there."""
    return (n_devices > 1 and n_gpu_layers > arch.n_layer + arch.n_layer_nextn and split_mode == "layer"
            and not no_kv_offload and not overrides)


def compute_terms(arch: ModelArch, memory: MemoryPlan, offload: Offload, *, copies: int, cpu_moe_layers: int = 0,
                  no_kv_offload: bool = False, n_outputs: int | None = None,
                  cpu_ops: Mapping[int, set[str]] | None = None) -> dict[str, dict[str, int]]:
    """The parts of each backend's compute buffer (ggml_backend_sched gives every backend its own, sized by
    graph_reserve's worst-case ubatch), in bytes, per device that runs something (CPU always):
    - mask: the KQ masks of the caches whose attention runs there (f16 with flash attention, else f32; the CPU
      holds every input), `copies` times (pipeline parallelism keeps a copy of each split input per copy);
    - embd: one ubatch of the residual stream (f32 n_embd) per copy: copied in on a device, built by get_rows
      on the CPU;
    - act: one ubatch of activations (memory.compute.activation_width floats per token) where a layer runs, less
      the routed experts' width where those stay on the CPU;
    - moe: one ubatch of the routed experts' FFN on the CPU when it runs them for offloaded layers (--n-cpu-moe,
      or -ot sending experts to the CPU: `cpu_ops`); -ot sending another matmul to the CPU gives it a layer's act;
    - scores: f32 KQ scores of the largest cache where attention runs, without flash attention;
    - logits: f32 logits for `n_outputs` rows (llama-server reserves one per slot; llama-fit-params n_ubatch)
      on the output layer's device (the CPU when the output weight is kept there: Offload.output_kept)."""
    shape = memory.shape
    ub = shape.n_ubatch
    n_outputs = shape.n_seq if n_outputs is None else n_outputs
    mask_size = 2 if shape.flash_attn else 4
    full, swa = attention_layers(arch)
    cells = {c.kind: c.cells for c in memory.caches}  # per stream; a stream's mask rows are its share of the ubatch
    out: dict[str, dict[str, int]] = {}

    def at(dev: str) -> dict[str, int]:
        return out.setdefault(dev, dict.fromkeys(("mask", "embd", "act", "scores", "logits", "moe"), 0))

    cpu = at(CPU)
    masks = {kind: mask_size * cells.get(kind, 0) * ub for kind, layers in ((CacheKind.KV, full), (CacheKind.SWA, swa))
             if layers}
    cpu["mask"] += copies * sum(masks.values())
    cpu["embd"] += copies * 4 * arch.n_embd * ub
    n_kv = max((cells.get(k, 0) for k in masks), default=0)
    def ordered(devs: set[str]) -> list[str]:  # device order, so the terms (and every note) are the same each run
        return sorted(devs, key=lambda d: (d not in offload.devices, offload.devices.index(d) if d in offload.devices
                                           else 0, d))

    output = CPU if offload.output_kept else offload.output
    for dev in ordered({*offload.layers, output} - {CPU}):
        at(dev)["embd"] += copies * 4 * arch.n_embd * ub
    for kind, layers in ((CacheKind.KV, full), (CacheKind.SWA, swa)):
        for dev in ordered({CPU if no_kv_offload else offload.layers[il] for il in layers} - {CPU}):
            at(dev)["mask"] += copies * masks[kind]
    width = activation_width(arch)
    routed = arch.n_expert_used * arch.n_ff_exp if arch.n_expert and arch.n_ff_exp else 0
    for il, dev in enumerate(offload.layers):  # a layer whose experts stay on the CPU runs its attention only
        cpu_experts = routed and il < arch.n_layer and (cpu_moe_layers < 0 or il < cpu_moe_layers)
        at(dev)["act"] = max(at(dev)["act"], 4 * ub * (width - routed if cpu_experts and dev != CPU else width))
        if cpu_experts and dev != CPU:
            cpu["moe"] = 4 * ub * routed
        pinned = (cpu_ops or {}).get(il, set())
        if "exps" in pinned and routed:
            cpu["moe"] = 4 * ub * routed
        if "dense" in pinned:
            cpu["act"] = max(cpu["act"], 4 * ub * width)
    if not shape.flash_attn:
        for dev in ordered({CPU if no_kv_offload else offload.layers[il] for il in (*full, *swa)}):
            at(dev)["scores"] = 4 * max(arch.n_head, default=0) * n_kv * ub
    at(output)["logits"] = 4 * arch.n_vocab * n_outputs
    return out


def device_compute(terms: Mapping[str, Mapping[str, int]], coef: Mapping[str, float]) -> dict[str, int]:
    """Each device's compute buffer from its terms (compute_terms) and the calibrated coefficients: the inputs
    (masks, residual stream) stay allocated; the layer work (activations, scores) and, on the output's device,
    the logits reuse one another's memory (ggml-alloc frees a tensor after its last use), so the larger counts."""
    out = {}
    for dev, t in terms.items():
        base = coef["mask"] * t["mask"] + coef["embd_cpu" if dev == CPU else "embd"] * t["embd"]
        work = coef["act"] * t["act"] + coef["scores"] * t["scores"] + coef["moe"] * t["moe"]
        if t["logits"]:
            work = max(work, t["logits"] + coef["output_act"] * t["act"])
        out[dev] = int(base + work)
    return out
