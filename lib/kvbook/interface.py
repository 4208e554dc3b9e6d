"""Every public kvbook record: frozen, typed, and JSON-serialisable through `to_dict`.

Data flows one way: ModelArch + ServerFlags -> ContextShape -> MemoryPlan -> Plan.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB


def to_dict(record: Any) -> Any:
    """A record (or tuple/list/dict of records) as plain JSON-ready values."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        out = {f.name: to_dict(getattr(record, f.name)) for f in dataclasses.fields(record)}
        extra = getattr(record, "json_extras", None)
        if callable(extra):
            out.update(extra())
        return out
    if isinstance(record, enum.Enum):
        return record.value
    if isinstance(record, (list, tuple)):
        return [to_dict(x) for x in record]
    if isinstance(record, dict):
        return {str(k): to_dict(v) for k, v in record.items()}
    return record


# ---------------------------------------------------------------- model architecture


@dataclass(frozen=True)
class RecurrentShape:
    """Gated-delta-net / Mamba2 state sizes (elements per layer per sequence)."""

    d_conv: int
    d_inner: int
    d_state: int
    n_group: int

    @property
    def n_embd_r(self) -> int:
        """Conv state width: (d_conv-1) * (d_inner + 2*n_group*d_state)."""
        return (self.d_conv - 1) * (self.d_inner + 2 * self.n_group * self.d_state)

    @property
    def n_embd_s(self) -> int:
        """Delta-rule / SSM state width: d_state * d_inner."""
        return self.d_state * self.d_inner


@dataclass(frozen=True)
class ProjectorArch:
    """A multimodal projector (`--mmproj`, or the one `-hf` fetches): what its GGUF's clip.* keys say, and the
    bytes of its tensors (llama.cpp's clip loader reads every tensor it uses into its own buffer)."""

    source: str
    projector_type: str
    vision: bool
    audio: bool
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    image_size: int
    patch_size: int
    weights_bytes: int


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter (`--lora`, `--lora-scaled`): the bytes of its one buffer (src/llama-adapter.cpp allocates
    every lora_a/lora_b tensor, each padded to the buffer's 32-byte alignment on the CPU; norm vectors skipped)."""

    source: str
    arch: str
    n_tensors: int
    buffer_bytes: int


@dataclass(frozen=True)
class TensorInfo:
    """One GGUF tensor as llama.cpp's loader sees it: what placement needs to put it in a buffer."""

    name: str
    ggml_type: str  # ggml's type name: Q4_K, F32, ...
    shape: tuple[int, ...]  # ne, ne0 first
    nbytes: int
    file: int  # which file of a split model (0 for one file)
    offset: int  # first byte within that file's tensor data


@dataclass(frozen=True)
class ModelArch:
    """What llama.cpp's loader derives from a model's metadata, per layer where it varies.

    Per-layer tuples cover the main layers only (n_layer); NextN/MTP layers never own a cache
    in the main context and are counted in n_layer_nextn.
    """

    name: str
    arch: str
    source: str
    n_layer: int
    n_layer_nextn: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_k: int
    head_v: int
    head_k_swa: int
    head_v_swa: int
    is_swa: tuple[bool, ...]
    n_swa: int
    is_recurrent: tuple[bool, ...]
    recurrent: RecurrentShape | None
    is_mla: bool
    n_layer_kv_from_start: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    weights_bytes: int
    weights_exact: bool
    weights_note: str
    metadata_keys: int = 0
    sha256: str | None = None
    tensor_groups: tuple[tuple[str, int], ...] = ()  # GGUF tensor bytes by placement group (see ggufio)
    # per file of the model: ((group, first byte, end byte), ...) within that file's tensor data
    tensor_ranges: tuple[tuple[tuple[str, int, int], ...], ...] = ()
    tensors: tuple[TensorInfo, ...] = field(default=(), repr=False)  # every GGUF tensor, file order (() = none known)
    # which main layers own an attention KV cache, where that is not simply "not recurrent": Nemotron-H's
    # MLP-only layers own nothing, Falcon-H1's layers own KV and recurrent state both; () = not recurrent
    kv_layers: tuple[bool, ...] = ()
    # an EAGLE3/DFlash draft ({arch}.target_layers, {arch}.block_size): the target layers it reads, its block
    target_layers: tuple[int, ...] = ()
    block_size: int = 0
    projector: ProjectorArch | None = None  # the multimodal projector llama-server loads with this model
    draft: ModelArch | None = None  # the draft model for speculative decoding (-md), with its own context
    loras: tuple[LoraAdapter, ...] = ()  # --lora / --lora-scaled adapters, loaded next to the weights
    # the model as its file holds it, where this one leaves out layers the line does not load (NextN/MTP layers
    # without --spec-type draft-mtp, model/resolve.py loaded_weights): what an alternative that loads them plans from
    file_model: ModelArch | None = field(default=None, repr=False, compare=False)

    def has_kv(self, il: int) -> bool:
        """True when layer il owns an attention KV cache in the main context."""
        if il >= self.n_layer_kv_from_start:
            return False
        return self.kv_layers[il] if self.kv_layers else not self.is_recurrent[il]

    def head_k_at(self, il: int) -> int:
        return self.head_k_swa if self.is_swa[il] else self.head_k

    def head_v_at(self, il: int) -> int:
        return self.head_v_swa if self.is_swa[il] else self.head_v

    @functools.cached_property
    def v_row_max(self) -> int:
        """The widest V row (head_v x n_head_kv) over the layers that own a KV cache: without flash attention
        every layer's V rows are padded to it. Cached: asked per cache type per plan."""
        return max((self.head_v_at(il) * self.n_head_kv[il] for il in range(self.n_layer) if self.has_kv(il)),
                   default=0)

    @functools.cached_property
    def kv_layer_split(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(full-attention layers, sliding-window layers) that own a KV cache. Cached: asked per plan."""
        return (tuple(il for il in range(self.n_layer) if self.has_kv(il) and not self.is_swa[il]),
                tuple(il for il in range(self.n_layer) if self.has_kv(il) and self.is_swa[il]))

    @property
    def is_hybrid(self) -> bool:
        return any(self.is_recurrent)

    @property
    def has_swa(self) -> bool:
        return any(self.is_swa)


# ---------------------------------------------------------------- server flags


class FlashAttn(str, enum.Enum):
    ON = "on"
    OFF = "off"
    AUTO = "auto"


@dataclass(frozen=True)
class ServerFlags:
    """The memory-relevant part of a llama-server command line, with the server's defaults."""

    model: str
    ctx: int = 0
    parallel: int = -1
    kv_unified: bool | None = None
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: FlashAttn = FlashAttn.AUTO
    batch: int = 2048
    ubatch: int = 512
    swa_full: bool = False
    cache_ram_mib: int = 8192
    ctx_checkpoints: int = 32
    gpu_layers: str = "auto"
    fit: bool = True
    fit_target_mib: tuple[int, ...] = (1024,)  # --fit-target: MiB --fit keeps free per device (one value: every device)
    fit_ctx: int = 4096  # --fit-ctx: the smallest context per stream --fit lowers an unset -c to
    no_kv_offload: bool = False
    rpc: tuple[str, ...] = ()  # --rpc host:port,... (each one a device, in order)
    tensor_split: tuple[float, ...] = ()  # -ts
    cpu_moe_layers: int = 0  # --n-cpu-moe N: experts of layers 0..N-1 stay on the CPU; -1 = --cpu-moe (all)
    tensor_overrides: tuple[tuple[str, str], ...] = ()  # -ot PATTERN=BUFT,...: (pattern, buffer type), in order
    repack: bool = True  # --repack (default) / -nr: CPU weights of some types copied into a CPU_REPACK buffer
    no_host: bool = False  # --no-host: no GPU host (pinned) buffer type ahead of CPU_REPACK for CPU weights
    slot_ctx_cap: int = 0  # --kv-unified-per-slot N: each slot's context is capped at N tokens (0: no cap)
    devices: tuple[str, ...] = ()  # -dev: the offload devices by llama.cpp name, in order; ("none",) = none
    split_mode: str = "layer"  # -sm none|layer|row|tensor
    main_gpu: int = 0  # -mg: with -sm none, the one device used (an index into the device list)
    host: str = "127.0.0.1"
    port: int = 8080
    lora: tuple[str, ...] = ()  # --lora FILE[,FILE] / --lora-scaled FILE:SCALE[,...]: the adapter files
    draft_hf_repo: str = ""  # -hfd user/repo[:quant]: the draft llama-server fetches from the hub
    draft_hf_file: str = ""  # the draft's file in that repo (only a preset sets it)
    draft_model: str = ""  # -md FILE: a draft model (its own weights, KV cache and compute buffer)
    draft_type_k: str = "f16"  # -ctkd
    draft_type_v: str = "f16"  # -ctvd
    draft_gpu_layers: str = "auto"  # -ngld
    # --spec-type A,B (repeats add up): speculative decoding types, as llama-server names them; () = none
    spec_types: tuple[str, ...] = ()
    spec_draft_n_max: int = 3  # --spec-draft-n-max: tokens drafted per step (common.h common_params_speculative_draft)
    spec_draft_backend_sampling: bool = True  # --(no-)spec-draft-backend-sampling: a sampler in the draft's graph
    # tokens an n-gram mode drafts per step (common.h common_params_speculative_ngram_mod / _ngram_map defaults)
    ngram_mod_n_max: int = 64  # --spec-ngram-mod-n-max
    ngram_simple_size_m: int = 48  # --spec-ngram-simple-size-m
    ngram_map_k_size_m: int = 48  # --spec-ngram-map-k-size-m
    ngram_map_k4v_size_m: int = 48  # --spec-ngram-map-k4v-size-m
    # -lcs / -lcd FILE, in order, as (flag, file): n-gram cache files ngram-cache loads into every slot
    lookup_caches: tuple[tuple[str, str], ...] = ()
    mmproj: str = ""  # --mmproj FILE / --mmproj-url URL: the projector to load
    mmproj_offload: bool = True  # --no-mmproj-offload: the projector stays on the CPU
    model_url: str = ""  # -mu URL: the model is the file llama-server downloads from there (wins over -m)
    hf_token: str = field(default="", repr=False)  # -hft / HF_TOKEN: sent to the hub for -hf listings, never shown
    offline: bool = False  # --offline: -hf picks from the local cache instead of the hub
    hf_repo: str = ""  # -hf user/repo[:quant]: the model is the file llama-server fetches (wins over -m)
    hf_file: str = ""  # -hff FILE: that file of the -hf repo instead of the quant's
    no_mmproj: bool = False  # --no-mmproj: no projector fetched with -hf
    # router mode (no model): the models it may load, and how many at once (0: no limit): ops/router.py
    models_preset: str = ""  # --models-preset FILE (INI)
    models_dir: str = ""  # --models-dir DIR
    models_max: int = 4  # --models-max N
    argv: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    from_env: tuple[str, ...] = ()  # the LLAMA_ARG_* variables that were read, as NAME=value
    read: tuple[tuple[str, str, str], ...] = ()  # (flag as given, "command line" or "environment", what it changes)


@dataclass(frozen=True)
class ContextShape:
    """How llama-server sizes the context for given flags: what llama_context logs."""

    n_ctx: int
    n_ctx_seq: int
    n_seq: int
    n_stream: int
    kv_unified: bool
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: bool
    swa_full: bool
    n_outputs_max: int
    # graph rules of the build (kvbook.memory.backends): 0 reserves min(n_ubatch, n_outputs_max) logits rows as the
    # pinned build does (ggml-org/llama.cpp#23861); builds before it reserve n_ubatch rows (set here from a log)
    reserve_outputs: int = 0
    mask_f32_input: bool = False  # builds before ggml-org/llama.cpp#23764 feed an f32 KQ mask and cast it for FA
    # builds since ggml-org/llama.cpp#18898 (b7800 here) keep the f32 n_embd x n_ubatch embeddings input (inp_embd)
    # in every graph beside the token path's get_rows: a second residual-width tensor on the host
    embd_input: bool = True
    # the mixed tokens+embeddings path (llama-graph.cpp build_inp_embd, has_mixed; the pinned build has it, b9849
    # does not) adds inp_mixed_embd and its ggml_dup copy: two more residual-width tensors on the host
    mixed_input: bool = True


# ---------------------------------------------------------------- memory


class CacheKind(str, enum.Enum):
    KV = "kv"
    SWA = "swa"
    RECURRENT = "recurrent"


@dataclass(frozen=True)
class CacheSpec:
    """One cache llama.cpp creates: matches one `llama_kv_cache: size = ...` log line."""

    kind: CacheKind
    cells: int
    layers: int
    k_type: str
    v_type: str | None
    k_bytes: int
    v_bytes: int

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    def json_extras(self) -> dict[str, Any]:
        return {"bytes": self.bytes}


@dataclass(frozen=True)
class ComputeEstimate:
    """Compute buffer: a calibrated approximation, never exact; `error_pct` is the measured bound."""

    bytes: int
    error_pct: float
    method: str


@dataclass(frozen=True)
class HostExtras:
    """Host RAM outside the buffers llama.cpp logs: what grows while the server runs (prompt cache, context
    checkpoints: the caps, and the rates they fill at, from the server's state-saving code) and the n-gram
    speculation tables (fixed, from start)."""

    cache_ram_bytes: int
    checkpoint_bytes: int
    checkpoint_each_bytes: int = 0  # one context checkpoint: one sequence's window / recurrent state
    checkpoints_max: int = 0  # --ctx-checkpoints per slot x slots: the most the slots keep at once
    cache_token_bytes: int = 0  # prompt cache: bytes per cached token (the full-attention KV rows of one token)
    cache_prompt_bytes: int = 0  # prompt cache: fixed bytes per cached prompt (window, recurrent state, headers)
    cache_prompt_checkpoints: int = 0  # checkpoints a cached prompt carries with it (near its end)
    ngram_bytes: int = 0  # n-gram speculation's host tables, allocated at start (memory/speculative.py ngram_bytes)
    spec_checkpoint_bytes: int = 0  # speculative checkpoints: one sequence's state per slot (speculative.py)
    spec_output_bytes: int = 0  # draft-eagle3/-dflash: output buffers grown at decode (speculative.py extract_output_bytes)

    @property
    def bytes(self) -> int:
        return (self.cache_ram_bytes + self.checkpoint_bytes + self.ngram_bytes + self.spec_checkpoint_bytes
                + self.spec_output_bytes)


@dataclass(frozen=True)
class ProjectorMemory:
    """What the projector allocates: its weights (exact: the tensor sizes) and its compute buffer for the
    warm-up image (an estimate), on the GPU when offloaded, else in host RAM."""

    weights_bytes: int
    compute_bytes: int
    compute_note: str
    on_gpu: bool


@dataclass(frozen=True)
class MemoryPlan:
    """Everything llama-server allocates at start, plus run-time host growth, in bytes."""

    shape: ContextShape
    caches: tuple[CacheSpec, ...]
    weights_bytes: int
    weights_exact: bool
    output_bytes: int
    compute: ComputeEstimate
    host_extras: HostExtras
    projector: ProjectorMemory | None = None
    draft: MemoryPlan | None = None  # the draft model's own context (-md): weights, caches, logits, compute
    lora_bytes: int = 0  # the LoRA adapters' buffers, next to the weights they adapt

    @property
    def projector_bytes(self) -> int:
        return self.projector.weights_bytes + self.projector.compute_bytes if self.projector else 0

    @property
    def draft_bytes(self) -> int:
        return self.draft.start_bytes if self.draft else 0

    @property
    def kv_bytes(self) -> int:
        return sum(c.bytes for c in self.caches if c.kind is not CacheKind.RECURRENT)

    @property
    def recurrent_bytes(self) -> int:
        return sum(c.bytes for c in self.caches if c.kind is CacheKind.RECURRENT)

    @property
    def start_bytes(self) -> int:
        """Allocated when the server starts."""
        return (self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.output_bytes + self.compute.bytes
                + self.projector_bytes + self.draft_bytes + self.lora_bytes)

    @property
    def total_bytes(self) -> int:
        """Start allocation plus the host RAM that can grow at run time."""
        return self.start_bytes + self.host_extras.bytes + (self.draft.host_extras.bytes if self.draft else 0)

    def json_extras(self) -> dict[str, Any]:
        return {
            "kv_bytes": self.kv_bytes,
            "recurrent_bytes": self.recurrent_bytes,
            "start_bytes": self.start_bytes,
            "total_bytes": self.total_bytes,
        }


# ---------------------------------------------------------------- devices and plans


@dataclass(frozen=True)
class Pool:
    """One memory pool with its own budget: host RAM or one GPU."""

    name: str
    kind: str
    budget_bytes: int
    total_bytes: int
    bandwidth_gbps: float | None = None
    # the largest tensor the device's backend accepts; a larger one stays on the CPU (ggml-vulkan.cpp
    # ggml_backend_vk_device_supports_op: maxStorageBufferRange on devices without 64-bit indexing). None: no limit
    max_tensor_bytes: int | None = None


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features ggml's repack rule reads (plan/weights.py): the CPU beside a device, as a preset states it
    or as ops/host.py found it on this machine."""

    name: str
    avx2: bool = False
    avx512: bool = False
    neon: bool = False
    dotprod: bool = False
    i8mm: bool = False


@dataclass(frozen=True)
class DetectedGpu:
    """One row of `nvidia-smi --query-gpu=index,name,memory.total,memory.free` (MiB)."""

    index: int
    name: str
    total_mib: int
    free_mib: int


@dataclass(frozen=True)
class Host:
    """The machine kvbook runs on, as ops/host.py detected it (RAM, CPU, NVIDIA GPUs): the planner never looks
    at the host itself, it gets these facts inside the Device built from them (plan/devices.py host_device)."""

    platform: str  # sys.platform: linux, darwin, ...
    ram_bytes: int  # physical RAM (hw.memsize on macOS, MemTotal on Linux)
    cpu: CpuFeatures
    gpus: tuple[DetectedGpu, ...] = ()  # as CUDA numbers them (CUDA_VISIBLE_DEVICES applied)
    gpu_note: str = ""  # why there are none (nvidia-smi failed) or how they were picked


@dataclass(frozen=True)
class ComputeCalibration:
    """A user's own log kept as a compute calibration (`kvbook check-log --save-calibration`): logged / estimated
    compute on one backend for one model family, applied to later plans there and labelled as such."""

    backend: str  # CUDA, Metal, Vulkan, ROCm, ...
    arch: str  # llama.cpp architecture (the model family): llama, qwen3moe, gpt-oss ...
    device_ratio: float  # logged / kvbook's estimate, the GPU devices' buffers
    host_ratio: float  # the same for the host-side buffer
    source: str  # the log it came from
    build: int | None = None


@dataclass(frozen=True)
class Device:
    """A machine to plan for: its pools; on unified memory everything counts against one pool."""

    id: str
    name: str
    unified: bool
    pools: tuple[Pool, ...]
    notes: str = ""
    sources: tuple[tuple[str, str], ...] = ()
    cpu: CpuFeatures | None = None  # the CPU that repacks CPU weights; None: the family default (plan/weights.py)
    calibrations: tuple[ComputeCalibration, ...] = ()  # the user's saved compute calibrations (ops/calibration.py)

    @property
    def main_pool(self) -> Pool:
        """Where weights, KV and compute go when everything is offloaded (the first GPU, else host)."""
        gpus = [p for p in self.pools if p.kind == "gpu"]
        return gpus[0] if gpus else self.pools[0]


class Verdict(str, enum.Enum):
    FITS = "fits"
    TIGHT = "tight"
    DOES_NOT_FIT = "does not fit"


@dataclass(frozen=True)
class PoolUsage:
    """What one pool must hold under a plan, against its budget."""

    pool: str
    need_bytes: int
    budget_bytes: int
    verdict: Verdict
    weights_bytes: int = 0
    kv_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    host_extras_bytes: int = 0
    repack_bytes: int = 0  # the part of weights_bytes llama.cpp copies into its CPU_REPACK buffer
    includes: tuple[str, ...] = ()  # pools whose bytes need_bytes also counts (Apple's RAM covers Metal's buffers)

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.need_bytes

    def json_extras(self) -> dict[str, Any]:
        return {"headroom_bytes": self.headroom_bytes}


# Every note code a plan can carry, with what it says: consumers (check-log, the text and JSON summaries, tests)
# select notes by these codes, never by their text, which may be reworded (tests/test_plan_notes.py checks that
# every code a plan emits is here).
NOTE_CODES: dict[str, str] = {
    # how the model was found (kvbook.model.resolve) and whose rules size it (kvbook.plan.api)
    "model.url": "-mu: the model is the file llama-server downloads, planned from its header",
    "model.hf": "-hf: the file llama-server picks from the hub repo, planned from its header",
    "model.hf-wins-over-m": "-m with -hf: the fetched file loads, not -m",
    "projector.not-loaded": "--no-mmproj: the repo's projector is left out",
    "projector.from-hf": "-hf also fetches the repo's projector",
    "projector.loaded": "the projector that loads: weights exact, compute estimated",
    "draft.from-hfd": "-hfd: the draft file llama-server picks from the hub repo",
    "draft.loaded": "the draft model and its own context",
    "lora.loaded": "the LoRA adapters and their buffer bytes",
    "accounting.llama-fit-params": "no kvbook rule for the architecture: caches and compute are llama.cpp's accounting",
    # the devices
    "device.detected": "what host detection found on this machine (GPUs, Metal's estimate, a failed nvidia-smi)",
    "device.apple-ram": "how the RAM limit of two-limit unified memory (Apple) was set",
    "split.no-effect": "-ts given with one offload device or none: it changes nothing",
    # placement over devices (kvbook.plan.planner)
    "spread.gpu-compute": "layers spread over devices: a GPU-backend compute buffer per device and on the host side",
    "spread.rpc-compute": "layers spread over devices: the calibrated per-device compute estimate (RPC, CPU backend)",
    "spread.dense-ops-bound": "-ot moves dense matmuls to the CPU: each device's compute is the fitted upper bound",
    "spread.shape-estimates": "per-layer and expert sizes estimated from the model's shapes (no GGUF tensors)",
    "ot.idle-device": "a device holds -ot tensors but runs no layer: its compute buffer is not modelled",
    "ot.matches-nothing": "an -ot pattern matches no tensor, so it moves nothing",
    "moe.no-experts": "--cpu-moe / --n-cpu-moe / -ot on experts for a model without experts: nothing moves",
    "compute.gpu-intervals": "each GPU-backend compute buffer's estimate and interval; planned at the high end",
    "repack.host-copy": "CPU_REPACK bytes, counted on top of the mapped CPU weights",
    "repack.host-buffer-first": "no CPU_REPACK: a GPU host buffer type comes first, the CPU's weights stay mapped",
    "repack.not-counted": "CPU_REPACK not counted: no GGUF tensors to size it",
    "weights.approximate": "the weights are estimated, not summed from the GGUF's tensors",
    "host.weights-resident": "the host does not fit: the CPU weights are counted resident; how llama.cpp behaves",
    "context.beyond-training": "the per-slot context exceeds the training context",
    "speculative.mtp-offer": "the model's MTP head, unused by the line: its exact extra memory and an estimated speed-up",
    "speculative.mtp-unplanned": "the model's MTP head, unused by the line: why no MTP alternative is offered",
    # llama-server's --fit (kvbook.plan.fit), the flags, host growth, the solver
    "fit.no-change": "--fit changes nothing: every device keeps its --fit-target free",
    "fit.adjusted": "--fit changes the command line at start; the plan is of the adjusted line",
    "fit.failed": "--fit gives up at start (the server goes on with the given line)",
    "fit.not-predicted": "--fit's outcome could not be predicted, and why",
    "fit.adjusted-args": "the command line after --fit",
    "fit.unpredicted-accounting": "--fit is on but not predicted: the caches are llama.cpp's own accounting",
    "flags.from-environment": "settings read from LLAMA_ARG_* environment variables",
    "host-growth.unbounded": "--cache-ram -1: host growth has no limit",
    "solve.no-placement": "no placement of -ngl / --n-cpu-moe / -ts starts either",
    # why the solver rejects an option (kvbook.plan.solver.Rejected.reason)
    "rejected.refused": "the planner refuses the option by name (what it does not model)",
    "rejected.does-not-start": "the option does not start even at the smallest context: devices over budget",
    "rejected.under-fit-minimum": "the option's largest context is under --fit's minimum",
    "rejected.planner-check": "the planner's full check does not fit the option at its context",
}


@dataclass(frozen=True)
class Note:
    """One explanation on a plan: a stable code from NOTE_CODES (what consumers select by) and the text a person
    reads (the same in the text plan, the JSON and the notebook)."""

    code: str
    text: str


@dataclass(frozen=True)
class Alternative:
    """A changed command line that fits, with the reason it was suggested."""

    change: str
    flags: tuple[str, ...]
    n_ctx: int
    total_bytes: int
    verdict: Verdict


@dataclass(frozen=True)
class FitOutcome:
    """What llama-server's --fit (common/fit.cpp) is predicted to do to the command line at start (plan/fit.py)."""

    status: str  # "off", "no change", "adjusted", "failed" (fit gives up; the server goes on), "not predicted"
    changes: tuple[str, ...] = ()  # what fit changed (or kept), in its order
    reason: str = ""  # why fit fails, or why kvbook could not predict it
    given_args: tuple[str, ...] = ()  # the user's command line
    adjusted_args: tuple[str, ...] = ()  # the command line the server runs after fit (the plan's)
    targets: tuple[tuple[str, int], ...] = ()  # (device, bytes fit may use: free - --fit-target)
    used: tuple[tuple[str, int], ...] = ()  # (device, model + context + compute bytes kvbook plans there)
    layers: tuple[tuple[str, int, int, str], ...] = ()  # (device, layers, of them partial, what the first partial keeps)
    evaluations: int = 0  # placements kvbook planned to follow fit's search


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one model, one command line and one device."""

    model: ModelArch
    flags: ServerFlags
    device: Device
    memory: MemoryPlan
    pools: tuple[PoolUsage, ...]
    verdict: Verdict
    max_ctx: int
    alternatives: tuple[Alternative, ...] = ()
    litellm_max_input_tokens: int = 0
    notes: tuple[Note, ...] = field(default=())
    compute_backend: str = "CPU"  # the backend whose compute buffer the estimate stands for
    accounting: str = "kvbook"  # whose rules sized the caches: "kvbook", or "llama-fit-params" (no kvbook rule)
    layers_on: tuple[str, ...] = ()  # the device (pool name) of each repeating layer, NextN ones included
    output_on: str = ""  # the device of the output layer
    experts_on: tuple[str, ...] = ()  # the device of each layer's experts (() for a dense model)
    fit: FitOutcome | None = None  # llama-server's --fit at start, predicted (None: not looked at)

    def note_text(self, code: str) -> str:
        """The text of the plan's first note with this code ('' when it has none)."""
        return next((n.text for n in self.notes if n.code == code), "")

    @property
    def compute_calibrated(self) -> bool:
        """kvbook's compute coefficient was fitted on CPU runs only; other backends' buffers differ."""
        return self.compute_backend == "CPU"
