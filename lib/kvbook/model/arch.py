"""GGUF-style metadata -> ModelArch, following the pinned llama.cpp build's loader rules.

Every source (local GGUF, remote GGUF header, HF config.json, YAML preset) is first turned
into a metadata dict with GGUF key names; this module is the one place that interprets it.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvbook.errors import ModelError
from kvbook.interface import ModelArch, RecurrentShape, TensorInfo


@dataclass(frozen=True)
class ArchRule:
    """Per-architecture choices made in llama.cpp's `load_arch_hparams` (build 11434)."""

    swa_pattern: int | None = None  # default sliding_window_pattern; None = no SWA
    swa_dense_first: bool = False
    swa_needs_window: bool = False  # SWA only when attention.sliding_window > 0
    swa_chunked: int | None = None  # chunked attention with this fixed window, off when sliding_window = 0 (Llama 4)
    swa_on_attention: bool = False  # with a window, every attention (non-recurrent) layer slides (LFM2)
    # which layers are recurrent: "interval" (every full_attention_interval-th layer is attention), "kv_zero"
    # (head_count_kv == 0), "kv_ff_zero" (head_count_kv == 0 and feed_forward_length == 0; attention only
    # where feed_forward_length == 0 too), "all" (every layer holds attention and recurrent state)
    recurrent: str | None = None
    shortconv: bool = False  # recurrent state is LFM2's short convolution, not an SSM
    required: tuple[str, ...] = ()
    kv_from_start: int | None = None  # layers from this index reuse earlier layers' KV (Gemma 3n)
    kv_shared_key: str | None = None  # ...or n_layer_all minus this key's value (Gemma 4)


# Architectures whose memory layout kvbook models and has checked against llama.cpp's source.
# Rules added for issue #15 cite the pinned source's src/models/<arch>.cpp :: load_arch_hparams and, for the
# hybrids, src/llama-model.cpp :: llama_model::create_memory (layer filters) and src/llama-hparams.cpp ::
# n_embd_r / n_embd_s (state widths).
RULES: dict[str, ArchRule] = {
    "llama": ArchRule(),
    "qwen2": ArchRule(),
    "qwen2moe": ArchRule(),
    "qwen3": ArchRule(),
    "qwen3moe": ArchRule(),
    "mistral3": ArchRule(),
    "smollm3": ArchRule(),
    "granite": ArchRule(),
    "glm4moe": ArchRule(),
    "ernie4_5-moe": ArchRule(),
    "minimax-m2": ArchRule(),
    "deepseek2": ArchRule(),
    "gemma2": ArchRule(swa_pattern=2, required=("attention.sliding_window",)),
    "gemma3": ArchRule(swa_pattern=6, swa_needs_window=True),
    "gemma3n": ArchRule(swa_pattern=5, required=("attention.sliding_window",), kv_from_start=20),
    "gemma4": ArchRule(swa_pattern=0, required=("attention.sliding_window", "attention.sliding_window_pattern"),
                       kv_shared_key="attention.shared_kv_layers"),
    "cohere2": ArchRule(swa_pattern=4, required=("attention.sliding_window",)),
    "gpt-oss": ArchRule(swa_pattern=2, required=("attention.sliding_window",)),
    "qwen3next": ArchRule(recurrent="interval"),
    "qwen35": ArchRule(recurrent="interval"),
    "qwen35moe": ArchRule(recurrent="interval"),
    # llama4.cpp: chunked attention, n_swa forced to 8192 and pattern 4 (3 chunked : 1 full) unless the GGUF
    # says sliding_window = 0; attention.chunk_size is not read by this build
    "llama4": ArchRule(swa_pattern=4, swa_chunked=8192),
    # phi3.cpp: a sliding_window key is read but SWA is switched off (n_swa = 0, no SWA layers)
    "phi3": ArchRule(),
    "glm4": ArchRule(),  # glm4.cpp: dense full attention; NextN layers own no cache
    "command-r": ArchRule(),  # command-r.cpp: dense full attention
    "olmo2": ArchRule(swa_pattern=4, swa_needs_window=True),  # olmo2.cpp: standard SWA only with a window
    "seed_oss": ArchRule(),  # seed-oss.cpp: dense full attention, explicit head size
    "qwen3vl": ArchRule(),  # qwen3vl.cpp: dense full attention (deepstack widens only the input embedding)
    "qwen3vlmoe": ArchRule(),  # qwen3vlmoe.cpp: as qwen3vl, MoE FFN
    # granite-hybrid.cpp: Mamba2 where head_count_kv(il) == 0
    "granitehybrid": ArchRule(recurrent="kv_zero"),
    # nemotron-h.cpp + create_memory: Mamba2 where head_count_kv and feed_forward_length are 0; attention
    # where only feed_forward_length is 0; MLP layers own no cache
    "nemotron_h": ArchRule(recurrent="kv_ff_zero"),
    # lfm2.cpp: short convolution where head_count_kv(il) == 0; n_embd_r = n_embd * (l_cache - 1), n_embd_s = 0
    "lfm2": ArchRule(recurrent="kv_zero", shortconv=True, swa_on_attention=True, swa_needs_window=True),
    # falcon-h1.cpp + create_memory: every layer runs attention and Mamba2 in parallel (both filters true)
    "falcon-h1": ArchRule(recurrent="all"),
    # eagle3.cpp: an EAGLE3 draft (-md with --spec-type draft-eagle3): one full-attention decoder layer
    "eagle3": ArchRule(),
    # dflash.cpp: a plain DFlash draft: full-attention layers in a standard KV cache (create_memory's default);
    # its sliding-window and DSpark (hyper-connection) forms are refused (check_extract_draft)
    "dflash": ArchRule(),
}

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS


class _Meta:
    """Typed access to `{arch}.*` keys with clear errors naming the key."""

    def __init__(self, meta: Mapping[str, Any], arch: str, source: str):
        self.meta, self.arch, self.source = meta, arch, source

    def raw(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None) -> int:
        value = self.raw(key, default)
        if value is None:
            raise ModelError(f"{self.source}: missing metadata key {self.arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
            raise ModelError(f"{self.source}: {self.arch}.{key} must be a non-negative integer, got {value!r}")
        return int(value)

    def per_layer(self, key: str, n: builtins.int, default: builtins.int | list[builtins.int] | None
                  ) -> tuple[builtins.int, ...]:  # builtins: the method `int` above shadows the type here
        """An int-or-array key expanded to n layers (llama.cpp's get_key_or_arr)."""
        value = self.raw(key, default)
        if value is None:
            raise ModelError(f"{self.source}: missing metadata key {self.arch}.{key}")
        if isinstance(value, (list, tuple)):
            if len(value) < n:
                raise ModelError(f"{self.source}: {self.arch}.{key} has {len(value)} entries for {n} layers")
            values = [v for v in value[:n]]
        else:
            values = [value] * n
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ModelError(f"{self.source}: {self.arch}.{key} must hold non-negative integers, got {v!r}")
        return tuple(int(v) for v in values)

    def bools(self, key: str, n: builtins.int) -> tuple[bool, ...] | None:
        value = self.raw(key)
        if value is None or not isinstance(value, (list, tuple)):
            return None
        if len(value) < n:
            raise ModelError(f"{self.source}: {self.arch}.{key} has {len(value)} entries for {n} layers")
        return tuple(bool(v) for v in value[:n])


def supported_archs() -> list[str]:
    return sorted(RULES)


class UnknownArchitecture(ModelError):
    """A GGUF whose architecture has no kvbook rule; `generic` is what the common keys say about it."""

    def __init__(self, message: str, generic: ModelArch | None):
        super().__init__(message)
        self.generic = generic


def generic_arch(meta: Mapping[str, Any], *, name: str, source: str, weights_bytes: int, weights_note: str,
                 n_vocab: int | None) -> ModelArch | None:
    """The keys every llama.cpp architecture shares (layers, width, heads, context, vocabulary, the window
    size), with no knowledge of which layers slide, recur or use MLA: enough for the context shape, the
    logits and the window's cells, never for the caches themselves. None when even those keys are missing."""
    arch = str(meta.get("general.architecture"))
    m = _Meta(meta, arch, source)
    try:
        n_layer = m.int("block_count")
        n_embd = m.int("embedding_length")
        n_head = m.per_layer("attention.head_count", n_layer, 0)
        n_head_kv = m.per_layer("attention.head_count_kv", n_layer, list(n_head))
        n_ctx_train = m.int("context_length")
    except ModelError:
        return None
    head = m.int("attention.key_length", n_embd // n_head[0] if n_head and n_head[0] else 0)
    vocab = n_vocab if n_vocab is not None else m.int("vocab_size", 0)
    if not 0 < n_layer <= MAX_LAYERS or vocab <= 0:
        return None
    return ModelArch(
        name=name, arch=arch, source=source, n_layer=n_layer, n_layer_nextn=0, n_embd=n_embd, n_vocab=vocab,
        n_ctx_train=n_ctx_train, n_head=n_head, n_head_kv=n_head_kv, head_k=head,
        head_v=m.int("attention.value_length", head), head_k_swa=head, head_v_swa=head,
        is_swa=(False,) * n_layer, n_swa=m.int("attention.sliding_window", 0), is_recurrent=(False,) * n_layer,
        recurrent=None, is_mla=False,
        n_layer_kv_from_start=n_layer, n_ff=max(m.per_layer("feed_forward_length", n_layer, 0)),
        n_expert=m.int("expert_count", 0), n_expert_used=m.int("expert_used_count", 0), n_ff_exp=0,
        weights_bytes=weights_bytes, weights_exact=True, weights_note=weights_note, metadata_keys=len(meta),
    )


def _layer_counts(m: _Meta, source: str, arch: str) -> tuple[int, int, int]:
    """(all layers, main layers, NextN/MTP layers) from block_count and nextn_predict_layers."""
    n_layer_all = m.int("block_count")
    if not 0 < n_layer_all <= MAX_LAYERS:
        raise ModelError(f"{source}: {arch}.block_count={n_layer_all} is outside 1..{MAX_LAYERS}")
    n_nextn = m.int("nextn_predict_layers", 0)
    if n_nextn >= n_layer_all:
        raise ModelError(f"{source}: {arch}.nextn_predict_layers={n_nextn} leaves no main layers")
    return n_layer_all, n_layer_all - n_nextn, n_nextn


def _swa_layers(m: _Meta, rule: ArchRule, n_layer_all: int, n_layer: int,
                is_rec: tuple[bool, ...]) -> tuple[tuple[bool, ...], int]:
    """(which layers use the sliding window, the window) as llama_model_base::load_swa_pattern sets them."""
    n_swa = m.int("attention.sliding_window", 0)
    if rule.swa_chunked is not None:  # llama4.cpp: only an explicit window of 0 turns chunking off
        if m.raw("attention.sliding_window") is not None and n_swa == 0:
            return (False,) * n_layer_all, 0
        n_swa = rule.swa_chunked
    if rule.swa_on_attention:
        if n_swa <= 0:
            return (False,) * n_layer_all, 0
        return tuple(il < n_layer and not is_rec[il] for il in range(n_layer_all)), n_swa
    if rule.swa_pattern is None or (n_swa <= 0 and rule.swa_needs_window):
        return (False,) * n_layer_all, 0
    explicit = m.bools("attention.sliding_window_pattern", n_layer_all)
    if explicit is not None:
        return explicit, n_swa
    pattern = m.int("attention.sliding_window_pattern", rule.swa_pattern)
    return tuple(
        il < n_layer and (pattern == 0 or (il % pattern != 0 if rule.swa_dense_first else il % pattern < pattern - 1))
        for il in range(n_layer_all)
    ), n_swa


def _recurrent_layers(m: _Meta, rule: ArchRule, n_layer_all: int, n_layer: int, source: str, arch: str,
                      n_head_kv: tuple[int, ...], n_embd: int
                      ) -> tuple[tuple[bool, ...], RecurrentShape | None, tuple[bool, ...]]:
    """(which layers are recurrent, their state shape, which layers own KV when that is not "not recurrent")
    for hybrid models; none elsewhere."""
    none = (False,) * n_layer_all
    if rule.recurrent is None:
        return none, None, ()
    kv_layers: tuple[bool, ...] = ()
    if rule.recurrent == "interval":
        explicit = m.bools("attention.recurrent_layers", n_layer_all)
        if explicit is not None:
            is_rec = explicit
        else:
            interval = m.int("full_attention_interval", 4)
            if interval == 0:
                raise ModelError(f"{source}: {arch}.full_attention_interval must be > 0")
            is_rec = tuple(il < n_layer and (il + 1) % interval != 0 for il in range(n_layer_all))
    elif rule.recurrent == "kv_zero":
        is_rec = tuple(il < n_layer and n_head_kv[il] == 0 for il in range(n_layer_all))
    elif rule.recurrent == "kv_ff_zero":
        n_ff = m.per_layer("feed_forward_length", n_layer_all, 0)
        is_rec = tuple(il < n_layer and n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(n_layer_all))
        kv_layers = tuple(not is_rec[il] and n_ff[il] == 0 for il in range(n_layer_all))
    elif rule.recurrent == "all":
        is_rec = (True,) * n_layer_all
        kv_layers = (True,) * n_layer_all
    else:
        raise AssertionError(rule.recurrent)
    if rule.shortconv:  # llama_hparams::n_embd_r: n_embd * (l_cache - 1); no SSM state
        shape = RecurrentShape(d_conv=m.int("shortconv.l_cache"), d_inner=n_embd, d_state=0, n_group=0)
    else:
        shape = RecurrentShape(d_conv=m.int("ssm.conv_kernel"), d_inner=m.int("ssm.inner_size"),
                               d_state=m.int("ssm.state_size"), n_group=m.int("ssm.group_count"))
    return is_rec, shape, kv_layers


def _kv_from_start(m: _Meta, rule: ArchRule, n_layer_all: int, n_layer: int) -> int:
    """Layers that own a KV cache (Gemma 3n / Gemma 4 share it past n_layer_kv_from_start)."""
    if rule.kv_from_start is not None:
        return min(n_layer, rule.kv_from_start)
    if rule.kv_shared_key is not None:
        return min(n_layer, n_layer_all - m.int(rule.kv_shared_key, 0))
    return n_layer


def arch_from_metadata(
    meta: Mapping[str, Any],
    *,
    name: str,
    source: str,
    weights_bytes: int,
    weights_exact: bool,
    weights_note: str,
    n_vocab: int | None = None,
    sha256: str | None = None,
    tensor_groups: Mapping[str, int] | None = None,
    tensor_ranges: tuple[tuple[tuple[str, int, int], ...], ...] = (),
    tensors: tuple[TensorInfo, ...] = (),
) -> ModelArch:
    """Interpret GGUF metadata the way llama.cpp's loader does, for the memory model."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{source}: no general.architecture in the metadata; is this a model GGUF?")
    rule = RULES.get(arch)
    if rule is None:
        raise UnknownArchitecture(
            f"{source}: architecture '{arch}' is not modelled by kvbook; supported: {', '.join(supported_archs())}",
            generic_arch(meta, name=name, source=source, weights_bytes=weights_bytes, weights_note=weights_note,
                         n_vocab=n_vocab) if weights_exact else None)
    m = _Meta(meta, arch, source)
    for key in rule.required:
        if m.raw(key) is None:
            raise ModelError(f"{source}: missing metadata key {arch}.{key}")

    if arch == "dflash" and (m.raw("attention.sliding_window", 0) or m.raw("hyper_connection.count", 0)):
        raise ModelError(f"{source}: a DFlash draft with a sliding window or DSpark stages (its own SWA cache, "
                         "src/models/dflash.cpp) is not modelled yet")
    n_layer_all, n_layer, n_nextn = _layer_counts(m, source, arch)
    n_embd = m.int("embedding_length")
    n_head_all = m.per_layer("attention.head_count", n_layer_all, 0)
    n_head_kv_all = m.per_layer("attention.head_count_kv", n_layer_all, list(n_head_all))
    n_head0 = n_head_all[0]
    head_k = m.int("attention.key_length", n_embd // n_head0 if n_head0 else 0)
    head_v = m.int("attention.value_length", n_embd // n_head0 if n_head0 else 0)
    is_mla = m.raw("attention.key_length_mla") is not None and m.raw("attention.value_length_mla") is not None
    is_rec, recurrent, kv_layers = _recurrent_layers(m, rule, n_layer_all, n_layer, source, arch, n_head_kv_all, n_embd)
    is_swa, n_swa = _swa_layers(m, rule, n_layer_all, n_layer, is_rec)
    vocab = n_vocab if n_vocab is not None else m.int("vocab_size", 0)
    if vocab <= 0:
        raise ModelError(f"{source}: vocabulary size unknown (no {arch}.vocab_size and no tokenizer.ggml.tokens)")

    return ModelArch(
        name=name,
        arch=arch,
        source=source,
        n_layer=n_layer,
        n_layer_nextn=n_nextn,
        n_embd=n_embd,
        n_vocab=vocab,
        n_ctx_train=m.int("context_length"),
        n_head=n_head_all[:n_layer],
        n_head_kv=n_head_kv_all[:n_layer],
        head_k=head_k,
        head_v=head_v,
        head_k_swa=m.int("attention.key_length_swa", head_k),
        head_v_swa=m.int("attention.value_length_swa", head_v),
        is_swa=is_swa[:n_layer],
        n_swa=n_swa,
        is_recurrent=is_rec[:n_layer],
        recurrent=recurrent,
        is_mla=is_mla,
        n_layer_kv_from_start=_kv_from_start(m, rule, n_layer_all, n_layer),
        n_ff=max(m.per_layer("feed_forward_length", n_layer_all, 0)),
        n_expert=m.int("expert_count", 0),
        n_expert_used=m.int("expert_used_count", 0),
        n_ff_exp=max(m.per_layer("expert_feed_forward_length", n_layer_all, 0)),
        weights_bytes=weights_bytes,
        weights_exact=weights_exact,
        weights_note=weights_note,
        metadata_keys=len(meta),
        sha256=sha256,
        tensor_groups=tuple(sorted((tensor_groups or {}).items())),
        tensor_ranges=tensor_ranges,
        tensors=tensors,
        kv_layers=kv_layers[:n_layer],
        target_layers=tuple(int(x) for x in m.raw("target_layers", ())),
        block_size=m.int("block_size", 16) if arch == "dflash" else 0,  # common/speculative.cpp: 16 by default
    )
