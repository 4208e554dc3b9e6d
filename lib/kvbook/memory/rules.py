"""The memory model of the pinned llama-server build: pure functions of ModelArch and ServerFlags.

Exact for context shape, KV, SWA, recurrent and output buffers (the rules are in
shared/reference/llama-cpp-memory.md and llama.cpp's llama-context.cpp / llama-kv-cache*.cpp);
the compute buffer is a calibrated approximation (see kvbook.memory.compute).
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
    ProjectorMemory,
    ServerFlags,
)
from kvbook.memory.compute import estimate_compute
from kvbook.memory.projector import projector_memory
from kvbook.memory.speculative import (
    check_extract_draft,
    check_mtp,
    extract_draft,
    extract_output_bytes,
    extract_sampler_bytes,
    extract_target_compute_bytes,
    n_rs_seq,
    ngram_bytes,
    outputs_max,
    spec_checkpoint_slots,
    uses_mtp,
)
from kvbook.memory.xp import PY, Num

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
# src/llama-model.cpp llama_model_has_encoder (those kvbook has rules for): such a context's n_outputs_max is
# n_batch (src/llama-context.cpp llama_context::llama_context), so its graph reserves logits for a whole ubatch
ENCODER_ARCHS = ("eagle3", "dflash")
CTX_PAD = 256


def pad(n: Num, to: int = CTX_PAD) -> Num:
    return (n + to - 1) // to * to


def row_bytes(cache_type: str, n: int, *, strict: bool = True) -> int:
    """ggml_row_size: bytes of n elements of a cache type (n must fill whole blocks unless not strict)."""
    block, size = CACHE_TYPE_LAYOUT[cache_type]
    if n % block and strict:
        raise BadInput(f"cache type {cache_type} needs row widths divisible by {block}; this model has {n}")
    return n // block * size


def is_quantized(cache_type: str) -> bool:
    return CACHE_TYPE_LAYOUT[cache_type][0] > 1


# ---------------------------------------------------------------- the formulas (scalars or arrays)

def slots(xp: Any, parallel: Num, kv_unified: Num) -> tuple[Num, Num]:
    """(n_seq, unified): -np -1 means SERVER_AUTO_SLOTS slots sharing one unified stream."""
    auto = parallel < 0
    return xp.where(auto, SERVER_AUTO_SLOTS, parallel), xp.logical_or(auto, kv_unified)


def context_sizes(xp: Any, n_ctx_train: int, ctx: Num, n_seq: Num, unified: Num, fit: Num, batch: Num,
                  ubatch: Num) -> tuple[Num, Num, Num, Num, Num]:
    """(n_ctx, n_ctx_seq, n_stream, n_batch, n_ubatch) as llama-server and llama_context settle them.

    -c 0 is the training context per stream when --fit is on (common/fit.cpp), else in total."""
    per_stream = xp.logical_and(fit, xp.logical_not(unified))
    n_ctx = pad(xp.where(ctx > 0, ctx, n_ctx_train * xp.where(per_stream, n_seq, 1)))
    n_ctx_seq = xp.where(unified, n_ctx, pad(n_ctx // n_seq))
    n_ctx = xp.where(unified, n_ctx, n_ctx_seq * n_seq)
    n_batch = xp.minimum(n_ctx, batch)
    return n_ctx, n_ctx_seq, xp.where(unified, 1, n_seq), n_batch, xp.minimum(n_batch, ubatch)


def swa_cell_count(xp: Any, n_swa: int, n_ctx_seq: Num, n_seq: Num, unified: Num, n_ubatch: Num, swa_full: Num) -> Num:
    """Cells of the sliding-window cache (llama_kv_cache_iswa)."""
    window = n_swa * xp.where(unified, n_seq, 1) + n_ubatch
    return xp.where(swa_full, n_ctx_seq, pad(xp.minimum(n_ctx_seq, window)))


def attention_layers(arch: ModelArch) -> tuple[list[int], list[int]]:
    """(full-attention layers, sliding-window layers) that own a KV cache."""
    full, swa = arch.kv_layer_split
    return list(full), list(swa)


def cell_bytes(arch: ModelArch, layers: list[int], type_k: str, type_v: str, flash: bool, *,
               strict: bool = True) -> tuple[int, int]:
    """K and V bytes of one cell of one stream over `layers` (V rows padded to the widest layer without FA)."""
    v_max = arch.v_row_max
    k = sum(row_bytes(type_k, arch.head_k_at(il) * arch.n_head_kv[il], strict=strict) for il in layers)
    if arch.is_mla:
        return k, 0
    v = sum(row_bytes(type_v, arch.head_v_at(il) * arch.n_head_kv[il] if flash else v_max, strict=strict)
            for il in layers)
    return k, v


def recurrent_seq_bytes(arch: ModelArch) -> tuple[int, int]:
    """(R, S) bytes of one sequence's recurrent state over every recurrent layer (f32)."""
    n_rec = sum(arch.is_recurrent)
    if not n_rec or arch.recurrent is None:
        return 0, 0
    return 4 * arch.recurrent.n_embd_r * n_rec, 4 * arch.recurrent.n_embd_s * n_rec


def logits_bytes(n_vocab: int, n_outputs: Num) -> Num:
    """Logits buffer: n_vocab floats for each output row."""
    return n_vocab * 4 * n_outputs


def makes_checkpoints(arch: ModelArch, swa_full: bool) -> bool:
    """Whether the server checkpoints a slot's state: for state it cannot roll back, i.e. recurrent
    layers, or a sliding window unless --swa-full keeps the whole context (server-context.cpp,
    `do_checkpoint`: seq_rm type RS/FULL or n_swa > 0, and n_swa is 0 with swa_full)."""
    return arch.is_hybrid or (arch.has_swa and not swa_full)


# llama_kv_cache::state_write_meta: per cell its pos (int32), n_seq_id (uint32) and the one seq_id (int32)
STATE_CELL_META = 12
# state_write_data's headers: v_trans, n_layer, n_rot_k, n_rot_v (4 x uint32), then per layer and K/V a type
# (int32) and a row size (uint64); llama_kv_cache::state_write adds n_stream and each stream's cell count
STATE_KV_HEAD = 4 * 4
STATE_LAYER_HEAD = 4 + 8
# llama_context::state_seq_get_size: io_magic and seq_id before the memory's own state
STATE_SEQ_HEAD = 4 + 4
# server-context.cpp: a prompt checkpoints 4 + n_ubatch and 4 tokens before its end (PR #20288), so a cached
# prompt longer than that carries two checkpoints into the prompt cache (server_prompt_cache_state::size)
PROMPT_END_CHECKPOINTS = 2


def window_cells(xp: Any, n_swa: int, n_tokens: Num) -> Num:
    """Cells of one sequence a checkpoint of its sliding-window cache holds: those not masked for the last
    position (llama_kv_cache::state_write with is_masked_swa), at most n_swa."""
    return xp.minimum(n_swa, n_tokens)


def kv_state_head(layers: int, n_stream: Num = 1) -> Num:
    """The headers of llama_kv_cache::state_write for one sequence that holds cells: n_stream, each stream's cell
    count, state_write_data's four words, and a type and row size per layer for K and for V."""
    return 4 + 4 * n_stream + STATE_KV_HEAD + 2 * STATE_LAYER_HEAD * layers


def kv_state_bytes(xp: Any, per_cell: Num, layers: int, cells: Num, n_stream: Num = 1) -> Num:
    """Bytes llama_kv_cache::state_write gives one sequence's `cells` over `layers` layers (K and V rows, cell
    metadata and headers); only n_stream and the streams' cell counts when the cache holds no cell of it."""
    return xp.where(cells > 0, kv_state_head(layers, n_stream) + cells * (per_cell + STATE_CELL_META), 4 + 4 * n_stream)


def checkpoint_seq_bytes(xp: Any, per_cell_swa: Num, swa_layers: int, n_swa: int, n_ctx_seq: Num, rec_per_seq: Num,
                         n_stream: Num = 1) -> Num:
    """One context checkpoint (common_prompt_checkpoint::update_tgt, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY): one
    sequence's sliding window (at most n_swa cells of the SWA layers; the full-attention cache is skipped) and its
    recurrent state, whatever the slot count; measured 7.506 MiB on Gemma 3 270M at -np 1 and 4 slots."""
    swa = kv_state_bytes(xp, per_cell_swa, swa_layers, window_cells(xp, n_swa, n_ctx_seq), n_stream) if swa_layers else 0
    return STATE_SEQ_HEAD + swa + rec_per_seq


def checkpoints_bytes(arch: ModelArch, each_bytes: Num, ctx_checkpoints: int, n_seq: Num, swa_full: bool) -> Num:
    """The checkpoints the slots can hold at once: --ctx-checkpoints per slot (create_checkpoint erases the
    oldest beyond it), one sequence's state each; 0 when the model makes none (`makes_checkpoints`)."""
    if ctx_checkpoints == 0 or not makes_checkpoints(arch, swa_full):
        return 0 * each_bytes
    return each_bytes * ctx_checkpoints * n_seq


# ---------------------------------------------------------------- the scalar planner's records

def context_shape(arch: ModelArch, flags: ServerFlags) -> ContextShape:
    """n_ctx, n_ctx_seq, slots and streams exactly as llama-server and llama_context settle them."""
    if flags.parallel == 0:
        raise BadInput("-np 0 gives no slots; use -np 1 or more (or -1 for auto)")
    n_seq, unified = slots(PY, flags.parallel, bool(flags.kv_unified))
    n_ctx, n_ctx_seq, n_stream, n_batch, n_ubatch = context_sizes(
        PY, arch.n_ctx_train, flags.ctx, n_seq, unified, flags.fit, flags.batch, flags.ubatch)
    if n_ctx_seq == 0:
        raise BadInput(f"-c {flags.ctx} split over -np {n_seq} slots leaves no context per slot")
    flash = flags.flash_attn is not FlashAttn.OFF
    if not flash and is_quantized(flags.type_v):
        raise BadInput(f"a quantized V cache (-ctv {flags.type_v}) needs flash attention; llama-server refuses -fa off")
    if arch.is_mla and flags.type_k != flags.type_v:
        raise BadInput(f"{arch.name} uses MLA: llama-server needs -ctk and -ctv to match ({flags.type_k} vs {flags.type_v})")
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
        n_outputs_max=n_batch if arch.arch in ENCODER_ARCHS else n_seq,
    )


def _attention_cache(arch: ModelArch, shape: ContextShape, layers: list[int], cells: int, kind: CacheKind) -> CacheSpec:
    """One llama_kv_cache over the given layers."""
    k, v = cell_bytes(arch, layers, shape.type_k, shape.type_v, shape.flash_attn)
    return CacheSpec(kind=kind, cells=cells, layers=len(layers), k_type=shape.type_k,
                     v_type=None if arch.is_mla else shape.type_v,
                     k_bytes=k * cells * shape.n_stream, v_bytes=v * cells * shape.n_stream)


def swa_cells(arch: ModelArch, shape: ContextShape) -> int:
    """Cells of the sliding-window cache (llama_kv_cache_iswa)."""
    return int(swa_cell_count(PY, arch.n_swa, shape.n_ctx_seq, shape.n_seq, shape.kv_unified, shape.n_ubatch,
                              shape.swa_full))


def caches(arch: ModelArch, shape: ContextShape, n_rs_seq: int = 0) -> tuple[CacheSpec, ...]:
    """Every cache the main context creates, in the order llama.cpp logs them."""
    out: list[CacheSpec] = []
    full, swa = attention_layers(arch)
    if full:
        out.append(_attention_cache(arch, shape, full, shape.n_ctx_seq, CacheKind.KV))
    if swa:
        out.append(_attention_cache(arch, shape, swa, swa_cells(arch, shape), CacheKind.SWA))
    r_bytes, s_bytes = recurrent_seq_bytes(arch)
    if r_bytes or s_bytes:
        rows = max(1, shape.n_seq) * (1 + n_rs_seq)
        out.append(CacheSpec(kind=CacheKind.RECURRENT, cells=max(1, shape.n_seq), layers=sum(arch.is_recurrent),
                             k_type="f32", v_type="f32", k_bytes=r_bytes * rows, v_bytes=s_bytes * rows))
    return tuple(out)


def output_bytes(arch: ModelArch, shape: ContextShape) -> int:
    """Logits buffer at start: n_vocab floats per slot (llama_context::llama_context: output_reserve(n_seq_max);
    a larger n_outputs_max, as speculative decoding sets, grows it only at decode time)."""
    return int(logits_bytes(arch.n_vocab, shape.n_seq))


def host_extras(arch: ModelArch, shape: ContextShape, flags: ServerFlags) -> HostExtras:
    """Run-time host growth and how fast it fills: the --cache-ram cap (which cached prompts' checkpoints count
    against, server_prompt_cache_state::size) and the checkpoints the slots keep, each one sequence's window and
    recurrent state (`checkpoint_seq_bytes`); a cached prompt costs `cache_token_bytes` per token (its
    full-attention K and V rows and cell metadata) plus a fixed part (window, recurrent state, headers) plus the
    checkpoints it carries (`prompt_state_bytes`)."""
    full, swa = attention_layers(arch)
    per_full = sum(cell_bytes(arch, full, shape.type_k, shape.type_v, shape.flash_attn, strict=False)) if full else 0
    per_swa = sum(cell_bytes(arch, swa, shape.type_k, shape.type_v, shape.flash_attn, strict=False)) if swa else 0
    rec = sum(recurrent_seq_bytes(arch))
    each = checkpoint_seq_bytes(PY, per_swa, len(swa), arch.n_swa, shape.n_ctx_seq, rec, shape.n_stream)
    makes = flags.ctx_checkpoints > 0 and makes_checkpoints(arch, flags.swa_full)
    window = min(arch.n_swa, shape.n_ctx_seq)
    fixed = STATE_SEQ_HEAD + rec + (kv_state_bytes(PY, per_swa, len(swa), window, shape.n_stream) if swa else 0) + (
        kv_state_head(len(full), shape.n_stream) if full else 0)
    return HostExtras(
        cache_ram_bytes=0 if flags.cache_ram_mib <= 0 else flags.cache_ram_mib * MiB,
        checkpoint_bytes=checkpoints_bytes(arch, each, flags.ctx_checkpoints, shape.n_seq, flags.swa_full),
        checkpoint_each_bytes=each if makes else 0,
        checkpoints_max=flags.ctx_checkpoints * shape.n_seq if makes else 0,
        cache_token_bytes=(per_full + STATE_CELL_META) if full else 0,
        cache_prompt_bytes=fixed,
        cache_prompt_checkpoints=PROMPT_END_CHECKPOINTS if makes else 0,
        ngram_bytes=ngram_bytes(flags, shape.n_seq),
        spec_checkpoint_bytes=spec_checkpoint_slots(arch, flags, shape.n_seq) * each,
    )


def prompt_state_bytes(extras: HostExtras, n_tokens: int) -> int:
    """What one distinct prompt of `n_tokens` takes in the prompt cache once its slot moves on (for prompts
    longer than the window; shorter ones take less): its state plus the checkpoints it carries."""
    return n_tokens * extras.cache_token_bytes + extras.cache_prompt_bytes + \
        extras.cache_prompt_checkpoints * extras.checkpoint_each_bytes


def prompts_to_fill(extras: HostExtras, n_tokens: int) -> int:
    """How many distinct `n_tokens`-token prompts fill the --cache-ram cap (0: no cache or no limit); the slots'
    own prompts are not in the cache, so the server holds that many more."""
    each = prompt_state_bytes(extras, n_tokens)
    return extras.cache_ram_bytes // each if extras.cache_ram_bytes and each else 0


def plan_memory(arch: ModelArch, flags: ServerFlags) -> MemoryPlan:
    """Everything llama-server allocates for this model and command line."""
    shape = context_shape(arch, flags)
    if flags.spec_types:  # memory/speculative.py: the drafted tokens' outputs, the rollback state rows
        shape = dataclasses.replace(shape, n_outputs_max=outputs_max(shape, flags))
    cache_list = caches(arch, shape, n_rs_seq(arch, flags))
    draft = mtp_memory(arch, shape, flags) if uses_mtp(flags) else draft_memory(arch, shape, flags)
    extras = host_extras(arch, shape, flags)
    compute = estimate_compute(arch, shape, [c.cells for c in cache_list if c.kind is not CacheKind.RECURRENT])
    spec = extract_draft(flags)
    if spec:  # draft-eagle3 / draft-dflash (memory/speculative.py)
        check_extract_draft(arch, spec)
        assert draft is not None and arch.draft is not None
        extras = dataclasses.replace(extras, spec_output_bytes=extract_output_bytes(arch, shape, draft.shape))
        sampler = extract_sampler_bytes(arch.draft, draft.shape, flags)
        draft = dataclasses.replace(draft, compute=dataclasses.replace(
            draft.compute, bytes=draft.compute.bytes + sampler))
        compute = dataclasses.replace(compute, bytes=compute.bytes + extract_target_compute_bytes(arch, shape))
    return MemoryPlan(
        shape=shape,
        caches=cache_list,
        weights_bytes=arch.weights_bytes,
        weights_exact=arch.weights_exact,
        output_bytes=output_bytes(arch, shape),
        compute=compute,
        host_extras=extras,
        projector=with_projector(arch, shape, flags),
        draft=draft,
        lora_bytes=sum(a.buffer_bytes for a in arch.loras),
    )


def draft_flags(flags: ServerFlags, shape: ContextShape) -> ServerFlags:
    """The draft context's settings (common/speculative.cpp): the server's own, with the target context's
    n_ctx, the draft's cache types (-ctkd/-ctvd, f16 by default), and no prompt cache of its own (the one
    --cache-ram limit covers both)."""
    return dataclasses.replace(flags, model=flags.draft_model, model_url="", hf_repo="", hf_file="", ctx=shape.n_ctx, type_k=flags.draft_type_k,
                               type_v=flags.draft_type_v, gpu_layers=flags.draft_gpu_layers, cache_ram_mib=0,
                               draft_model="", spec_types=(), draft_hf_repo="", draft_hf_file="", mmproj="",
                               lora=())


def draft_memory(arch: ModelArch, shape: ContextShape, flags: ServerFlags) -> MemoryPlan | None:
    """The draft model's context, sized as llama.cpp sizes it for speculative decoding (None without -md)."""
    if arch.draft is None:
        return None
    return plan_memory(arch.draft, draft_flags(flags, shape))


def with_projector(arch: ModelArch, shape: ContextShape, flags: ServerFlags) -> ProjectorMemory | None:
    """The projector's memory when the model has one (`on_gpu` is what the flags ask; the planner places it)."""
    return projector_memory(arch.projector, shape.flash_attn, flags.mmproj_offload) if arch.projector else None


def mtp_cache(arch: ModelArch, shape: ContextShape) -> CacheSpec:
    """The MTP context's llama_kv_cache: n_ctx_seq cells over the NextN layers, each as wide as the model's
    attention layers (qwen35*.cpp load_block_mtp: a full-attention block), in the draft cache types."""
    il = next(i for i in range(arch.n_layer) if arch.has_kv(i))
    width_k = arch.head_k * arch.n_head_kv[il]
    width_v = arch.head_v * arch.n_head_kv[il]
    k = row_bytes(shape.type_k, width_k) * arch.n_layer_nextn
    v = row_bytes(shape.type_v, width_v) * arch.n_layer_nextn  # V rows are this width with or without FA
    cells = shape.n_ctx_seq
    return CacheSpec(kind=CacheKind.KV, cells=cells, layers=arch.n_layer_nextn, k_type=shape.type_k,
                     v_type=shape.type_v, k_bytes=k * cells * shape.n_stream, v_bytes=v * cells * shape.n_stream)


def mtp_memory(arch: ModelArch, shape: ContextShape, flags: ServerFlags) -> MemoryPlan:
    """The MTP context (common_speculative_init_result with ctx_type MTP): the target's shape with the draft cache
    types and one output per slot; no weights of its own (it runs on the target's)."""
    check_mtp(arch)
    if arch.draft is not None:
        raise BadInput("-md with --spec-type draft-mtp: llama-server then runs the -md file as the MTP context "
                       "(common_speculative_init_result), which kvbook does not model yet; drop -md to use the "
                       "model's own MTP layers")
    if not shape.flash_attn and is_quantized(flags.draft_type_v):
        raise BadInput(f"a quantized draft V cache (-ctvd {flags.draft_type_v}) needs flash attention")
    mshape = dataclasses.replace(shape, type_k=flags.draft_type_k, type_v=flags.draft_type_v,
                                 n_outputs_max=shape.n_seq, reserve_outputs=0)
    cache = mtp_cache(arch, mshape)
    return MemoryPlan(
        shape=mshape,
        caches=(cache,),
        weights_bytes=0,
        weights_exact=True,
        output_bytes=int(logits_bytes(arch.n_vocab, shape.n_seq)),
        compute=estimate_compute(arch, mshape, [cache.cells]),
        host_extras=HostExtras(cache_ram_bytes=0, checkpoint_bytes=0),
    )
