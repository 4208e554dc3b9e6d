"""The memory model of the pinned llama-server build: pure functions of ModelArch and ServerFlags.

Exact for context shape, KV, SWA, recurrent and output buffers (the rules are in
shared/reference/llama-cpp-memory.md and llama.cpp's llama-context.cpp / llama-kv-cache*.cpp);
the compute buffer is a calibrated approximation (see kvbook.memory.compute).
"""

from __future__ import annotations

from kvbook.errors import BadInput
from kvbook.interface import (
    CacheKind,
    CacheSpec,
    ContextShape,
    FlashAttn,
    HostExtras,
    MemoryPlan,
    MiB,
    ModelArch,
    ServerFlags,
)
from kvbook.memory.compute import estimate_compute

# ggml block size and bytes per block for the cache types llama-server accepts
CACHE_TYPE_LAYOUT: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}
SERVER_AUTO_SLOTS = 4
CTX_PAD = 256


def pad(n: int, to: int = CTX_PAD) -> int:
    return (n + to - 1) // to * to


def row_bytes(cache_type: str, n: int) -> int:
    """ggml_row_size: bytes of n elements of a cache type (n must fill whole blocks)."""
    block, size = CACHE_TYPE_LAYOUT[cache_type]
    if n % block:
        raise BadInput(f"cache type {cache_type} needs row widths divisible by {block}; this model has {n}")
    return n // block * size


def is_quantized(cache_type: str) -> bool:
    return CACHE_TYPE_LAYOUT[cache_type][0] > 1


def context_shape(arch: ModelArch, flags: ServerFlags) -> ContextShape:
    """n_ctx, n_ctx_seq, slots and streams exactly as llama-server and llama_context settle them."""
    if flags.parallel == 0:
        raise BadInput("-np 0 gives no slots; use -np 1 or more (or -1 for auto)")
    if flags.parallel < 0:
        n_seq, unified = SERVER_AUTO_SLOTS, True
    else:
        n_seq, unified = flags.parallel, bool(flags.kv_unified)
    if flags.ctx > 0:
        n_ctx = pad(flags.ctx)
    else:
        # -c 0: the training context per stream when --fit is on (common/fit.cpp), else in total
        n_ctx = pad(arch.n_ctx_train * (n_seq if flags.fit and not unified else 1))
    if unified:
        n_ctx_seq, n_stream = n_ctx, 1
    else:
        n_ctx_seq = pad(n_ctx // n_seq)
        if n_ctx_seq == 0:
            raise BadInput(f"-c {flags.ctx} split over -np {n_seq} slots leaves no context per slot")
        n_ctx, n_stream = n_ctx_seq * n_seq, n_seq
    flash = flags.flash_attn is not FlashAttn.OFF
    if not flash and is_quantized(flags.type_v):
        raise BadInput(f"a quantized V cache (-ctv {flags.type_v}) needs flash attention; llama-server refuses -fa off")
    if arch.is_mla and flags.type_k != flags.type_v:
        raise BadInput(f"{arch.name} uses MLA: llama-server needs -ctk and -ctv to match ({flags.type_k} vs {flags.type_v})")
    n_batch = min(n_ctx, flags.batch)
    n_ubatch = min(n_batch, flags.ubatch)
    return ContextShape(
        n_ctx=n_ctx,
        n_ctx_seq=n_ctx_seq,
        n_seq=n_seq,
        n_stream=n_stream,
        kv_unified=unified,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        type_k=flags.type_k,
        type_v=flags.type_v,
        flash_attn=flash,
        swa_full=flags.swa_full,
        n_outputs_max=n_seq,
    )


def _attention_cache(arch: ModelArch, shape: ContextShape, layers: list[int], cells: int, kind: CacheKind) -> CacheSpec:
    """One llama_kv_cache over the given layers (V rows padded to the widest layer when FA is off)."""
    v_max = max((arch.head_v_at(il) * arch.n_head_kv[il] for il in range(arch.n_layer) if arch.has_kv(il)), default=0)
    k_bytes = v_bytes = 0
    for il in layers:
        k_bytes += row_bytes(shape.type_k, arch.head_k_at(il) * arch.n_head_kv[il]) * cells * shape.n_stream
        if not arch.is_mla:
            v_width = arch.head_v_at(il) * arch.n_head_kv[il] if shape.flash_attn else v_max
            v_bytes += row_bytes(shape.type_v, v_width) * cells * shape.n_stream
    return CacheSpec(
        kind=kind,
        cells=cells,
        layers=len(layers),
        k_type=shape.type_k,
        v_type=None if arch.is_mla else shape.type_v,
        k_bytes=k_bytes,
        v_bytes=v_bytes,
    )


def swa_cells(arch: ModelArch, shape: ContextShape) -> int:
    """Cells of the sliding-window cache (llama_kv_cache_iswa)."""
    if shape.swa_full:
        return shape.n_ctx_seq
    window = arch.n_swa * (shape.n_seq if shape.kv_unified else 1) + shape.n_ubatch
    return pad(min(shape.n_ctx_seq, window))


def caches(arch: ModelArch, shape: ContextShape, n_rs_seq: int = 0) -> tuple[CacheSpec, ...]:
    """Every cache the main context creates, in the order llama.cpp logs them."""
    out: list[CacheSpec] = []
    full = [il for il in range(arch.n_layer) if arch.has_kv(il) and not arch.is_swa[il]]
    swa = [il for il in range(arch.n_layer) if arch.has_kv(il) and arch.is_swa[il]]
    if full or not swa:
        if full:
            out.append(_attention_cache(arch, shape, full, shape.n_ctx_seq, CacheKind.KV))
    if swa:
        out.append(_attention_cache(arch, shape, swa, swa_cells(arch, shape), CacheKind.SWA))
    rec = [il for il in range(arch.n_layer) if arch.is_recurrent[il]]
    if rec and arch.recurrent is not None:
        rows = max(1, shape.n_seq) * (1 + n_rs_seq)
        out.append(
            CacheSpec(
                kind=CacheKind.RECURRENT,
                cells=max(1, shape.n_seq),
                layers=len(rec),
                k_type="f32",
                v_type="f32",
                k_bytes=4 * arch.recurrent.n_embd_r * rows * len(rec),
                v_bytes=4 * arch.recurrent.n_embd_s * rows * len(rec),
            )
        )
    return tuple(out)


def output_bytes(arch: ModelArch, shape: ContextShape) -> int:
    """Logits buffer: n_vocab floats for each of n_outputs_max rows."""
    return arch.n_vocab * 4 * max(shape.n_outputs_max, shape.n_seq)


def checkpoint_bytes(arch: ModelArch, shape: ContextShape, flags: ServerFlags) -> int:
    """Worst case for context checkpoints: each holds one sequence's SWA and recurrent state."""
    if flags.ctx_checkpoints == 0 or not (arch.has_swa or arch.is_hybrid):
        return 0
    per_seq = 0
    for cache in caches(arch, shape):
        if cache.kind is CacheKind.SWA:
            per_seq += cache.bytes // shape.n_stream
        elif cache.kind is CacheKind.RECURRENT:
            per_seq += cache.bytes // max(1, shape.n_seq)
    return per_seq * flags.ctx_checkpoints * shape.n_seq


def plan_memory(arch: ModelArch, flags: ServerFlags) -> MemoryPlan:
    """Everything llama-server allocates for this model and command line."""
    shape = context_shape(arch, flags)
    cache_list = caches(arch, shape)
    cache_ram = 0 if flags.cache_ram_mib <= 0 else flags.cache_ram_mib * MiB
    return MemoryPlan(
        shape=shape,
        caches=cache_list,
        weights_bytes=arch.weights_bytes,
        weights_exact=arch.weights_exact,
        output_bytes=output_bytes(arch, shape),
        compute=estimate_compute(arch, shape, [c.cells for c in cache_list if c.kind is not CacheKind.RECURRENT]),
        host_extras=HostExtras(cache_ram_bytes=cache_ram, checkpoint_bytes=checkpoint_bytes(arch, shape, flags)),
    )
