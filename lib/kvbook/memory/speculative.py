"""Speculative decoding's memory in the pinned llama-server build: pure rules, each cited to the source.

What `--spec-type draft-mtp` adds (kvbook models it for the hybrid Qwen families, whose MTP context is a plain
attention cache over the NextN layers):
- the target context drafts-and-verifies `1 + n_max` tokens per slot, so it reserves that many outputs
  (tools/server/server-context.cpp server_output_limits, common/speculative.cpp
  common_speculative_get_output_limits: n_outputs_max = min(n_batch, n_parallel * (1 + n_max)), per sequence
  min(n_batch, 1 + n_max)); the logits buffer at start stays one row per slot (src/llama-context.cpp
  llama_context::llama_context: output_reserve(n_seq_max));
- a recurrent model that can roll back part of a sequence keeps n_rs_seq = n_max extra state rows per slot
  (common/common.h common_params_speculative::need_n_rs_seq, common/common.cpp common_context_params_to_llama;
  src/llama-arch.cpp llm_arch_supports_rs_rollback clamps it to 0 for other architectures);
- the NextN/MTP layers' weights are loaded (common/common.cpp common_model_params_to_llama sets load_mtp;
  without it src/models/qwen35*.cpp load_arch_tensors skip them with TENSOR_SKIP);
- a second llama_context on the same weights (common/speculative.cpp common_speculative_init_result: ctx_type
  MTP, n_ctx = the target's n_ctx, n_rs_seq 0, the target's n_seq_max, n_batch and n_ubatch inherited from
  common_base_params_to_speculative, the draft cache types -ctkd/-ctvd, n_outputs_max = n_parallel, one per
  sequence); its memory (src/llama-model.cpp llama_model::create_memory, `mtp_on_hybrid_qwen`) is one
  llama_kv_cache of n_ctx_seq cells over the layers il >= n_layer (the NextN layers), with no recurrent state;
  its logits buffer is one row per slot, and it reserves a compute buffer of its own (memory/rules.py
  mtp_memory builds that context's MemoryPlan from these rules).

What the n-gram modes add (`ngram_bytes`, `spec_n_max`): no llama_context, no device buffer; the target context
reserves `min(n_batch, slots x (1 + n_max))` outputs as for a draft (common_speculative_n_max: ngram-simple,
-map-k and -map-k4v draft their size_m, ngram-mod its n_max, ngram-cache 8), no recurrent rollback rows
(common_params_speculative::need_n_rs_seq counts the draft types only), and host tables made once at start
(tools/server/server-context.cpp load_model: common_speculative_init(params, n_parallel)):
- ngram-mod: one hash table shared by every slot, 4 Mi int32 entries (common/speculative.cpp
  common_speculative_impl_ngram_mod: mod(n_match, 4*1024*1024); common/ngram-mod.cpp common_ngram_mod: entries
  filled with EMPTY, so resident from start): 16 MiB; the server logs its size at -lv 4 ("mod size=");
- ngram-map-k / ngram-map-k4v: one common_ngram_map per slot (common_speculative_impl_ngram_map_k), each with a
  key_map of COMMON_NGRAM_HASH_MAP_SIZE = 262144 uint32 (common/ngram-map.h): 1 MiB per slot; its `keys` vector
  grows at run time, at most one 88-byte key per token of the slot's history (not in the plan: a note says so);
- ngram-simple: nothing (common_ngram_simple_draft searches the slot's tokens);
- ngram-cache: three unordered maps per slot (common_speculative_impl_ngram_cache::seq_info), empty at start,
  growing with every token (not in the plan); -lcs/-lcd files are loaded and copied into every slot (refused).

What `--spec-type draft-eagle3` adds (`-md` with a GGUF of general.architecture eagle3): the draft context of a
plain draft model (common/speculative.cpp common_speculative_init_result: the same llama_init_from_model call as
draft-simple, n_ctx = the target's, n_rs_seq 0, -ctkd/-ctvd), over eagle3 weights (src/models/eagle3.cpp
load_arch_tensors: fc [3 x target_hidden_size, n_embd], one decoder layer whose q/k/v read 2 x n_embd, optional
token_embd/output/d2t) and one full-attention KV cache layer; and, unlike draft-simple:
- the draft context has an encoder (src/llama-model.cpp llama_model_has_encoder: eagle3), so its n_outputs_max
  is n_batch (src/llama-context.cpp llama_context::llama_context) and its graph reserves logits for a whole
  ubatch (memory/compute.py reads n_outputs_max); its output buffer at start stays one row per slot;
- run-time host growth (`extract_output_bytes`, not in a start figure: llama_context::output_reserve runs at
  decode time and the release build does not log it): the target context turns on extraction of 3 layers'
  inputs (common_speculative_impl_draft_eagle3: llama_set_embeddings_layer_inp, or llama_set_embeddings_nextn
  unmasked for the layer n_layer), each n_embd x n_batch floats in the target's output buffer
  (src/llama-context.cpp output_reserve: embd_layer_inp_float_count / embd_nextn.size); the draft's encoder
  outputs every token of a chunk of up to n_ubatch (llama_context::encode: output_reserve(n_tokens)), so its
  output buffer grows to that many rows of logits (its vocabulary) and pre-norm states (n_embd, embd_nextn);
- with --spec-draft-backend-sampling (on by default) the eagle3 implementation attaches a top-k sampler per slot
  to the draft context (common_speculative_impl_draft_eagle3: llama_set_sampler), whose graph is reserved again
  at start with the sampler over every reserved logits row: on SmolLM2's 49152-token vocabulary the draft's
  compute buffer went from 98.25 to 194.44 MiB (one more n_vocab x min(n_ubatch, n_outputs_max) floats,
  `extract_sampler_bytes`, added to the estimate);
- the target's graph is reserved again at its first decode (llama_context::set_embeddings_layer_inp sets
  sched_need_reserve) with the 3 layers' inputs as graph outputs (src/llama-graph.cpp: ggml_set_output on
  t_layer_inp), which the allocator can no longer reuse: `extract_target_compute_bytes`, at most 3 x n_embd x
  n_ubatch floats on the estimate (SmolLM2: 22.64 -> 24.89 MiB logged, +2.25 MiB; the term gives +3.38);
- no recurrent rollback rows (need_n_rs_seq is for draft-mtp only on the archs that roll back).
What `--spec-type draft-dflash` adds (`-md` with a plain DFlash GGUF, general.architecture dflash; its sliding-window,
DFlash2 and DSpark forms are refused): the same as draft-eagle3 with these differences (common/speculative.cpp
common_speculative_impl_draft_dflash, src/models/dflash.cpp): weights fc [len(target_layers) x n_embd, n_embd],
enc.output_norm, then n_layer qwen3-style blocks, in a standard KV cache (llama_model::create_memory's default)
over every layer; the target extracts len(target_layers) layers (not 3), and the draft's width must be the
target's (n_embd_inp_enc = len(target_layers) x the draft's n_embd); the draft decodes one block of
dflash.block_size tokens (16 by default) per slot with every output, so its output buffer grows to
slots x block_size rows (the extracted features go in as embeddings without outputs).
The backend sampler buffers a draft context may add per slot (llama_set_sampler, common to every draft type)
are not in the plan.

Speculative checkpoints (`spec_checkpoint_slots`): a target whose cache cannot drop the rejected draft tokens keeps,
per slot, a copy of the sequence's partial state before each verification (tools/server/server-context.cpp:
slot.spec_ckpt.update_tgt with LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY, the flags of a context checkpoint, so the same
size: memory/rules.py checkpoint_seq_bytes). That is a model with recurrent state (common_context_can_seq_rm:
partial removal fails, "speculative decoding will use checkpoints") unless its n_rs_seq rollback rows cover the
draft (MTP on qwen35*: they do).
"""

from __future__ import annotations

from kvbook.errors import BadInput
from kvbook.interface import ContextShape, ModelArch, ServerFlags

# common/speculative.cpp common_speculative_type_from_name_map: every name --spec-type takes
SPEC_TYPES = ("none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark", "ngram-simple",
              "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
# the types kvbook does not model yet, and why (one line each)
UNMODELLED_TYPES = {
    "draft-dspark": "needs -md with a DSpark draft GGUF (a dflash GGUF with markov_w1/markov_w2 heads), whose context "
                    "decodes n_max + 1 outputs per slot; kvbook has no rule for it and no such GGUF here to check one "
                    "against the real server",
}
DRAFT_TYPES = ("draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark")
NGRAM_CACHE_DRAFT = 8  # common/speculative.cpp create_state_ngram_cache: n_draft = 8
NGRAM_MOD_BYTES = 4 * 1024 * 1024 * 4  # common_speculative_impl_ngram_mod: 4 Mi int32 entries, shared by the slots
NGRAM_MAP_SLOT_BYTES = 262144 * 4  # common/ngram-map.h COMMON_NGRAM_HASH_MAP_SIZE uint32 entries, per slot
# src/llama-model.cpp create_memory: `mtp_on_hybrid_qwen` (a plain KV cache over the NextN layers)
MTP_ARCHS = ("qwen35", "qwen35moe", "qwen3next")
# src/llama-arch.cpp llm_arch_supports_rs_rollback (those kvbook has rules for)
RS_ROLLBACK_ARCHS = ("qwen35", "qwen35moe", "nemotron_h", "nemotron_h_moe", "lfm2", "lfm2moe")


def spec_type_names(flag: str, value: str) -> tuple[str, ...]:
    """--spec-type A,B as common_speculative_types_from_names reads it: an unknown name is an error, `none`
    anywhere means none at all."""
    names = tuple(value.split(","))
    for name in names:
        if name not in SPEC_TYPES:
            raise BadInput(f"{flag}: unknown speculative type '{name}'; choose from {', '.join(SPEC_TYPES)}")
    return () if "none" in names else names


def uses_mtp(flags: ServerFlags) -> bool:
    return "draft-mtp" in flags.spec_types


def spec_n_max(flags: ServerFlags) -> int:
    """Tokens drafted per step, the most over the types (common/speculative.cpp common_speculative_n_max)."""
    per_type = {"ngram-simple": flags.ngram_simple_size_m, "ngram-map-k": flags.ngram_map_k_size_m,
                "ngram-map-k4v": flags.ngram_map_k4v_size_m, "ngram-mod": flags.ngram_mod_n_max,
                "ngram-cache": NGRAM_CACHE_DRAFT, **dict.fromkeys(DRAFT_TYPES, flags.spec_draft_n_max)}
    return max((max(0, per_type[t]) for t in flags.spec_types), default=0)


def ngram_bytes(flags: ServerFlags, n_seq: int) -> int:
    """Host bytes the n-gram modes' tables take from start (module docstring); -lcs/-lcd with ngram-cache refused."""
    types = set(flags.spec_types)
    if "ngram-cache" in types and flags.lookup_caches:
        raise BadInput("-lcs/-lcd with --spec-type ngram-cache changes memory (every slot gets its own copy of the "
                       "file's n-gram table, host RAM several times the file size) and kvbook does not model it yet")
    maps = len(types & {"ngram-map-k", "ngram-map-k4v"})
    return (NGRAM_MOD_BYTES if "ngram-mod" in types else 0) + maps * max(1, n_seq) * NGRAM_MAP_SLOT_BYTES


def n_rs_seq(arch: ModelArch, flags: ServerFlags) -> int:
    """Extra recurrent state rows per slot of the target context (common_params_speculative::need_n_rs_seq,
    clamped by llm_arch_supports_rs_rollback)."""
    return flags.spec_draft_n_max if uses_mtp(flags) and arch.arch in RS_ROLLBACK_ARCHS else 0


def spec_checkpoint_slots(arch: ModelArch, flags: ServerFlags, n_seq: int) -> int:
    """How many speculative checkpoints the slots keep (module docstring): one per slot, or none."""
    return max(1, n_seq) if flags.spec_types and arch.is_hybrid and spec_n_max(flags) > n_rs_seq(arch, flags) else 0


def outputs_max(shape: ContextShape, flags: ServerFlags) -> int:
    """The target context's n_outputs_max (server_output_limits): one per slot, plus the drafted tokens."""
    n_max = spec_n_max(flags)
    return min(shape.n_batch, shape.n_seq * (1 + n_max)) if n_max else shape.n_seq


# the draft types fed by the target's extracted layers, and the draft architecture each needs
EXTRACT_DRAFTS = {"draft-eagle3": "eagle3", "draft-dflash": "dflash"}


def extract_draft(flags: ServerFlags) -> str | None:
    """The --spec-type whose -md draft reads the target's layers (draft-eagle3, draft-dflash), or None."""
    return next((t for t in flags.spec_types if t in EXTRACT_DRAFTS), None)


def check_extract_draft(arch: ModelArch, spec: str) -> None:
    """One clear line where llama-server cannot run this draft type with this target and draft (module docstring)."""
    want = EXTRACT_DRAFTS[spec]
    name = {"eagle3": "an EAGLE3", "dflash": "a DFlash"}[want]
    if arch.draft is None:
        raise BadInput(f"--spec-type {spec} needs -md with {name} draft GGUF (general.architecture {want}); "
                       "without one llama-server fails to create the draft context")
    if arch.draft.arch != want:
        raise BadInput(f"--spec-type {spec}: the -md draft is a {arch.draft.arch} model, not {name} one "
                       f"(llama-server: 'draft model is not {want}')")
    if want == "eagle3" and arch.draft.n_layer != 1:
        raise BadInput(f"--spec-type {spec}: the EAGLE3 draft has {arch.draft.n_layer} layers; "
                       "llama-server's eagle3 graph runs exactly one (src/models/eagle3.cpp)")
    if want == "dflash" and any(t.name.startswith(("selector_", "markov_")) for t in arch.draft.tensors):
        raise BadInput(f"--spec-type {spec}: a DFlash2/DSpark draft (selector or Markov heads: unmasked outputs, no "
                       "backend sampler) is not modelled yet")
    if want == "dflash" and arch.draft.n_embd != arch.n_embd:
        raise BadInput(f"--spec-type {spec}: the DFlash draft's width ({arch.draft.n_embd}) is not the target's "
                       f"({arch.n_embd}); its encoder reads the target's layers at its own width")
    bad = [il for il in arch.draft.target_layers if il > arch.n_layer]
    if bad:
        raise BadInput(f"--spec-type {spec}: the draft reads target layer {bad[0]}, the target has {arch.n_layer}")


def extract_output_bytes(arch: ModelArch, shape: ContextShape, draft_shape: ContextShape) -> int:
    """Run-time growth of the output buffers (module docstring): the target's extracted layers (n_embd x n_batch
    floats each) and the draft's output rows (logits and pre-norm state): an EAGLE3 encoder's ubatch, or a DFlash
    draft's block per slot."""
    draft = arch.draft
    assert draft is not None
    features = len(draft.target_layers) * arch.n_embd * shape.n_batch * 4
    block = draft_shape.n_seq * draft.block_size if draft.arch == "dflash" else draft_shape.n_ubatch
    rows = max(block, draft_shape.n_seq)
    start = draft.n_vocab * draft_shape.n_seq * 4  # the draft's logits at start, already in its plan
    return features + (draft.n_vocab + draft.n_embd) * rows * 4 - start


def extract_sampler_bytes(draft: ModelArch, draft_shape: ContextShape, flags: ServerFlags) -> int:
    """What the backend sampler adds to the draft's compute buffer (module docstring): a copy of the reserved
    logits rows, or nothing with --no-spec-draft-backend-sampling."""
    rows = min(draft_shape.n_ubatch, draft_shape.n_outputs_max)
    return 4 * draft.n_vocab * rows if flags.spec_draft_backend_sampling else 0


def extract_target_compute_bytes(arch: ModelArch, shape: ContextShape) -> int:
    """What the extracted layers' inputs, kept as graph outputs, add to the target's compute buffer at its first
    decode (module docstring): at most one ubatch of n_embd floats per layer."""
    assert arch.draft is not None
    return len(arch.draft.target_layers) * arch.n_embd * shape.n_ubatch * 4


def check_mtp(arch: ModelArch) -> None:
    """One clear line where llama-server cannot build an MTP context, or kvbook has no rule for it."""
    if not arch.n_layer_nextn:
        raise BadInput(f"--spec-type draft-mtp: {arch.name} has no NextN/MTP layers ({arch.arch}.nextn_predict_layers"
                       " is 0), so llama-server has no MTP head to run; use a GGUF converted with its MTP layers")
    if arch.arch not in MTP_ARCHS:
        raise BadInput(f"--spec-type draft-mtp on {arch.arch}: its MTP context is not modelled yet (kvbook models "
                       f"{', '.join(MTP_ARCHS)})")
    kv_heads = {arch.n_head_kv[il] for il in range(arch.n_layer) if arch.has_kv(il)}
    if len(kv_heads) != 1:
        raise BadInput(f"--spec-type draft-mtp on {arch.name}: attention layers of different KV widths; the NextN "
                       "layer's width is not known")
