"""Write weightless GGUF files that llama.cpp's loader accepts, for sizing without downloads.

The file holds the given metadata and every tensor llama.cpp creates for the architecture
(names and shapes from the pinned build's `src/models/<arch>.cpp`); the data region is a
hole, so even a 400 GB model costs only its header on disk.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from kvbook.errors import ModelError

Tensor = tuple[str, tuple[int, ...]]  # name, ggml shape (ne0 first)

_REQUIRED: Any = object()

# Keys llama.cpp reads as float32 even when a YAML preset writes a whole number.
_FLOAT_SUFFIXES = ("freq_base", "freq_base_swa", "epsilon", "scale", "softcapping", "factor",
                   "multiplier", "beta_fast", "beta_slow", "alpha")


# ---------------------------------------------------------------------------------------------
# Hyperparameters, read the way llama-model.cpp reads them
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Hp:
    """The layer-0 hyperparameters `LLAMA_LOAD_LOCALS` exposes, plus raw metadata access."""

    md: Mapping[str, Any]
    arch: str
    n_embd: int
    n_layer_all: int
    n_layer: int  # trunk layers; NextN/MTP layers follow them
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    n_rot: int
    n_expert: int
    n_expert_used: int

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        return _get(self.md, self.arch, key, default)

    def at(self, key: str, il: int, default: Any = _REQUIRED) -> int:
        """A per-layer key (int or list) at layer `il`."""
        v = self.get(key, default)
        return int(v[il]) if isinstance(v, (list, tuple)) else int(v)

    def n_ff(self, il: int = 0) -> int:
        return self.at("feed_forward_length", il, 0)

    def n_ff_exp(self, il: int = 0) -> int:
        v = self.at("expert_feed_forward_length", il, 0)
        return v if v else self.n_ff(il) // max(self.n_expert_used, 1)

    def is_swa(self, il: int, default_pattern: int) -> bool:
        if il >= self.n_layer or not self.get("attention.sliding_window", 0):
            return False
        pat = self.get("attention.sliding_window_pattern", default_pattern)
        if isinstance(pat, (list, tuple)):
            return bool(pat[il])
        return pat == 0 or il % pat < pat - 1

    def is_recurrent(self, il: int) -> bool:
        arr = self.md.get(f"{self.arch}.attention.recurrent_layers")
        if isinstance(arr, (list, tuple)):
            return bool(arr[il])
        interval = int(self.get("full_attention_interval", 4))
        return il < self.n_layer and (il + 1) % interval != 0


_SWA_DEFAULT = {"gemma3": 6, "gpt-oss": 2}  # load_swa_pattern(ml, n) in the arch's loader


def _get(md: Mapping[str, Any], arch: str, key: str, default: Any = _REQUIRED) -> Any:
    """`{arch}.key` from the metadata, else `default`; a missing required key is an error."""
    full = f"{arch}.{key}"
    if full in md:
        return md[full]
    if default is _REQUIRED:
        raise ModelError(f"{arch} metadata lacks {full!r}, which llama.cpp requires")
    return default


def _first(v: Any) -> int:
    """Layer 0 of a key that may be a per-layer list."""
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _hparams(md: Mapping[str, Any]) -> _Hp:
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError("metadata lacks 'general.architecture'")
    n_vocab = md.get(f"{arch}.vocab_size")
    if n_vocab is None and isinstance(md.get("tokenizer.ggml.tokens"), (list, tuple)):
        n_vocab = len(md["tokenizer.ggml.tokens"])
    if n_vocab is None:
        raise ModelError(f"metadata lacks {arch + '.vocab_size'!r}; add the tokenizer's size")
    n_layer_all = int(_get(md, arch, "block_count"))
    n_embd = int(_get(md, arch, "embedding_length"))
    n_head = _first(_get(md, arch, "attention.head_count", 0))
    head = n_embd // n_head if n_head else 0
    hk = int(_get(md, arch, "attention.key_length", head))
    hv = int(_get(md, arch, "attention.value_length", head))
    hp = _Hp(md, arch, n_embd, n_layer_all,
             n_layer=n_layer_all - int(_get(md, arch, "nextn_predict_layers", 0)),
             n_vocab=int(n_vocab), n_head=n_head,
             n_head_kv=_first(_get(md, arch, "attention.head_count_kv", n_head)),
             head_k=hk, head_v=hv, n_rot=int(_get(md, arch, "rope.dimension_count", hk)),
             n_expert=int(_get(md, arch, "expert_count", 0)),
             n_expert_used=_first(_get(md, arch, "expert_used_count", 0)))
    if hp.is_swa(0, _SWA_DEFAULT.get(arch, 0)):  # LLAMA_LOAD_LOCALS sizes are layer 0's: SWA ones
        hp = replace(hp, head_k=int(_get(md, arch, "attention.key_length_swa", hk)),
                     head_v=int(_get(md, arch, "attention.value_length_swa", hv)),
                     n_rot=int(_get(md, arch, "rope.dimension_count_swa", hp.n_rot)))
    return hp


# ---------------------------------------------------------------------------------------------
# Tensor lists per architecture (mirror load_arch_tensors; optional tensors a real file has)
# ---------------------------------------------------------------------------------------------

def _io(h: _Hp, tied: bool) -> Iterator[Tensor]:
    yield "token_embd.weight", (h.n_embd, h.n_vocab)
    yield "output_norm.weight", (h.n_embd,)
    if not tied:
        yield "output.weight", (h.n_embd, h.n_vocab)


def _attn(h: _Hp, i: int, q_mult: int = 1, qk_norm: bool = False) -> Iterator[Tensor]:
    b, q = f"blk.{i}", h.head_k * h.n_head
    yield f"{b}.attn_q.weight", (h.n_embd, q * q_mult)
    yield f"{b}.attn_k.weight", (h.n_embd, h.head_k * h.n_head_kv)
    yield f"{b}.attn_v.weight", (h.n_embd, h.head_v * h.n_head_kv)
    yield f"{b}.attn_output.weight", (q, h.n_embd)
    if qk_norm:
        yield f"{b}.attn_q_norm.weight", (h.head_k,)
        yield f"{b}.attn_k_norm.weight", (h.head_k,)


def _ffn(h: _Hp, i: int, n_ff: int) -> Iterator[Tensor]:
    b = f"blk.{i}"
    yield f"{b}.ffn_gate.weight", (h.n_embd, n_ff)
    yield f"{b}.ffn_up.weight", (h.n_embd, n_ff)
    yield f"{b}.ffn_down.weight", (n_ff, h.n_embd)


def _experts(h: _Hp, i: int, n_ff_exp: int) -> Iterator[Tensor]:
    b = f"blk.{i}"
    yield f"{b}.ffn_gate_inp.weight", (h.n_embd, h.n_expert)
    yield f"{b}.ffn_gate_exps.weight", (h.n_embd, n_ff_exp, h.n_expert)
    yield f"{b}.ffn_up_exps.weight", (h.n_embd, n_ff_exp, h.n_expert)
    yield f"{b}.ffn_down_exps.weight", (n_ff_exp, h.n_embd, h.n_expert)


def _shared_expert(h: _Hp, i: int, n_ff: int, gated: bool) -> Iterator[Tensor]:
    b = f"blk.{i}"
    if gated:
        yield f"{b}.ffn_gate_inp_shexp.weight", (h.n_embd,)
    yield f"{b}.ffn_gate_shexp.weight", (h.n_embd, n_ff)
    yield f"{b}.ffn_up_shexp.weight", (h.n_embd, n_ff)
    yield f"{b}.ffn_down_shexp.weight", (n_ff, h.n_embd)


def _nextn(h: _Hp, i: int) -> Iterator[Tensor]:
    b = f"blk.{i}.nextn"
    yield f"{b}.eh_proj.weight", (2 * h.n_embd, h.n_embd)
    yield f"{b}.enorm.weight", (h.n_embd,)
    yield f"{b}.hnorm.weight", (h.n_embd,)
    yield f"{b}.shared_head_norm.weight", (h.n_embd,)


def _norms(h: _Hp, i: int, *names: str) -> Iterator[Tensor]:
    for n in names:
        yield f"blk.{i}.{n}.weight", (h.n_embd,)


def _llama(h: _Hp) -> Iterator[Tensor]:
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        yield from _attn(h, i)
        yield from (_experts(h, i, h.n_ff(i)) if h.n_expert else _ffn(h, i, h.n_ff(i)))


def _eagle3(h: _Hp) -> Iterator[Tensor]:
    """src/models/eagle3.cpp load_arch_tensors: fc fuses 3 target layers' features; one decoder layer whose q/k/v
    read [token embedding, fused features] (2 x n_embd); its own output and token_embd (both optional there)."""
    n_inp = 3 * int(h.get("target_hidden_size"))
    yield "fc.weight", (n_inp, h.n_embd)
    yield from _io(h, tied=False)
    b, q = "blk.0", h.head_k * h.n_head
    yield from _norms(h, 0, "attn_norm", "attn_norm_2", "ffn_norm")
    yield f"{b}.attn_q.weight", (2 * h.n_embd, q)
    yield f"{b}.attn_k.weight", (2 * h.n_embd, h.head_k * h.n_head_kv)
    yield f"{b}.attn_v.weight", (2 * h.n_embd, h.head_v * h.n_head_kv)
    yield f"{b}.attn_output.weight", (q, h.n_embd)
    yield from _ffn(h, 0, h.n_ff(0))


def _dflash(h: _Hp) -> Iterator[Tensor]:
    """src/models/dflash.cpp load_arch_tensors (a plain DFlash draft, no DSpark/DFlash2 heads): fc fuses the
    target layers' features (n_embd each), then qwen3-style blocks; its own token_embd and output."""
    yield "fc.weight", (len(h.get("target_layers")) * h.n_embd, h.n_embd)
    yield "enc.output_norm.weight", (h.n_embd,)
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        yield from _attn(h, i, qk_norm=True)
        yield from _ffn(h, i, h.n_ff(i))


def _qwen3(h: _Hp) -> Iterator[Tensor]:
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        yield from _attn(h, i, qk_norm=True)
        yield from (_experts(h, i, h.n_ff_exp(i)) if h.n_expert else _ffn(h, i, h.n_ff(i)))


def _gemma3(h: _Hp) -> Iterator[Tensor]:
    yield from _io(h, tied=True)
    for i in range(h.n_layer):
        yield from _norms(h, i, "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
        yield from _attn(h, i, qk_norm=True)
        yield from _ffn(h, i, h.n_ff(i))


def _gpt_oss(h: _Hp) -> Iterator[Tensor]:
    yield from _io(h, tied=False)
    nx = h.n_expert
    for i in range(h.n_layer):
        b, f = f"blk.{i}", h.n_ff_exp(i)
        yield from _norms(h, i, "attn_norm", "post_attention_norm")
        q = h.n_head * h.n_rot
        yield f"{b}.attn_q.weight", (h.n_embd, q)
        yield f"{b}.attn_k.weight", (h.n_embd, h.n_head_kv * h.n_rot)
        yield f"{b}.attn_v.weight", (h.n_embd, h.n_head_kv * h.n_rot)
        yield f"{b}.attn_output.weight", (q, h.n_embd)
        yield f"{b}.attn_q.bias", (q,)
        yield f"{b}.attn_k.bias", (h.n_head_kv * h.n_rot,)
        yield f"{b}.attn_v.bias", (h.n_head_kv * h.n_rot,)
        yield f"{b}.attn_output.bias", (h.n_embd,)
        yield f"{b}.attn_sinks.weight", (h.n_head,)
        yield from _experts(h, i, f)
        yield f"{b}.ffn_gate_inp.bias", (nx,)
        yield f"{b}.ffn_gate_exps.bias", (f, nx)
        yield f"{b}.ffn_up_exps.bias", (f, nx)
        yield f"{b}.ffn_down_exps.bias", (h.n_embd, nx)


def _delta_net(h: _Hp, i: int, fused_ba: bool) -> Iterator[Tensor]:
    """Gated delta net block of Qwen3-Next / Qwen3.5 (their linear-attention layers)."""
    b = f"blk.{i}"
    d_state, n_group = int(h.get("ssm.state_size")), int(h.get("ssm.group_count"))
    n_v = int(h.get("ssm.time_step_rank"))  # value heads
    key_dim, value_dim = d_state * n_group, d_state * n_v
    yield f"{b}.attn_qkv.weight", (h.n_embd, key_dim * 2 + value_dim)
    yield f"{b}.attn_gate.weight", (h.n_embd, value_dim)
    yield f"{b}.ssm_conv1d.weight", (int(h.get("ssm.conv_kernel")), key_dim * 2 + value_dim)
    yield f"{b}.ssm_dt.bias", (n_v,)
    yield f"{b}.ssm_a", (n_v,)
    if fused_ba:
        yield f"{b}.ssm_ba.weight", (h.n_embd, 2 * n_v)
    else:
        yield f"{b}.ssm_beta.weight", (h.n_embd, n_v)
        yield f"{b}.ssm_alpha.weight", (h.n_embd, n_v)
    yield f"{b}.ssm_norm.weight", (d_state,)
    yield f"{b}.ssm_out.weight", (value_dim, h.n_embd)


def _qwen_hybrid(h: _Hp) -> Iterator[Tensor]:
    """qwen3next, qwen35 and qwen35moe: delta-net layers, every n-th layer gated attention."""
    yield from _io(h, tied=False)
    moe = h.n_expert > 0
    for i in range(h.n_layer_all):
        trunk = i < h.n_layer
        yield from _norms(h, i, "attn_norm", "post_attention_norm")
        if trunk and h.is_recurrent(i):
            yield from _delta_net(h, i, fused_ba=h.arch == "qwen3next")
        else:
            yield from _attn(h, i, q_mult=2, qk_norm=True)
        if moe:
            yield from _experts(h, i, h.n_ff_exp(i))
            n_sh = int(h.get("expert_shared_feed_forward_length", 0)) or h.n_ff(i)
            yield from _shared_expert(h, i, n_sh, gated=True)
        else:
            yield from _ffn(h, i, h.n_ff(i))
        if not trunk:
            yield from _nextn(h, i)


def _deepseek2(h: _Hp) -> Iterator[Tensor]:
    yield from _io(h, tied=False)
    q_lora, kv_lora = int(h.get("attention.q_lora_rank", 0)), int(h.get("attention.kv_lora_rank"))
    mla = f"{h.arch}.attention.key_length_mla" in h.md
    hk = int(h.get("attention.key_length_mla")) if mla else h.head_k
    hv = int(h.get("attention.value_length_mla")) if mla else h.head_v
    nope, n_dense = hk - h.n_rot, int(h.get("leading_dense_block_count", 0))
    n_shared = int(h.get("expert_shared_count"))
    sigmoid = int(h.get("expert_gating_func", 1)) == 2
    for i in range(h.n_layer_all):
        b = f"blk.{i}"
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        yield f"{b}.attn_kv_a_norm.weight", (kv_lora,)
        if q_lora:
            yield f"{b}.attn_q_a_norm.weight", (q_lora,)
            yield f"{b}.attn_q_a.weight", (h.n_embd, q_lora)
            yield f"{b}.attn_q_b.weight", (q_lora, h.n_head * hk)
        else:
            yield f"{b}.attn_q.weight", (h.n_embd, h.n_head * hk)
        yield f"{b}.attn_kv_a_mqa.weight", (h.n_embd, kv_lora + h.n_rot)
        if mla:
            yield f"{b}.attn_k_b.weight", (nope, kv_lora, h.n_head)
            yield f"{b}.attn_v_b.weight", (kv_lora, hv, h.n_head)
        else:
            yield f"{b}.attn_kv_b.weight", (kv_lora, h.n_head * (nope + hv))
        yield f"{b}.attn_output.weight", (h.n_head * hv, h.n_embd)
        if i < n_dense:
            yield from _ffn(h, i, h.n_ff(i))
        else:
            f = h.n_ff_exp(i)
            yield from _experts(h, i, f)
            if sigmoid:
                yield f"{b}.exp_probs_b.bias", (h.n_expert,)
            yield from _shared_expert(h, i, f * n_shared, gated=False)
        if i >= h.n_layer:
            yield from _nextn(h, i)


def _phi3(h: _Hp) -> Iterator[Tensor]:
    """phi3 (src/models/phi3.cpp): fused QKV and a fused gate+up FFN."""
    yield from _io(h, tied=False)
    gqa = h.head_k * h.n_head_kv
    for i in range(h.n_layer):
        b = f"blk.{i}"
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        yield f"{b}.attn_qkv.weight", (h.n_embd, h.n_embd + 2 * gqa)
        yield f"{b}.attn_output.weight", (h.n_embd, h.n_embd)
        yield f"{b}.ffn_down.weight", (h.n_ff(i), h.n_embd)
        yield f"{b}.ffn_up.weight", (h.n_embd, 2 * h.n_ff(i))


def _q_k_v_o(h: _Hp, i: int, q: int, o_in: int | None = None) -> Iterator[Tensor]:
    """Separate Q/K/V of width q and layer i's KV heads, and the output projection (create_tensor_qkv)."""
    b, kv = f"blk.{i}", h.at("attention.head_count_kv", i, h.n_head_kv)
    yield f"{b}.attn_q.weight", (h.n_embd, q)
    yield f"{b}.attn_k.weight", (h.n_embd, h.head_k * kv)
    yield f"{b}.attn_v.weight", (h.n_embd, h.head_v * kv)
    yield f"{b}.attn_output.weight", (q if o_in is None else o_in, h.n_embd)


def _llama4(h: _Hp) -> Iterator[Tensor]:
    """llama4.cpp: MoE every interleave_moe_layer_step-th layer (routed experts plus one shared expert)."""
    yield from _io(h, tied=False)
    step = int(h.get("interleave_moe_layer_step"))
    for i in range(h.n_layer):
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        yield from _q_k_v_o(h, i, h.head_k * h.n_head)
        if step > 0 and (i + 1) % step == 0:
            yield from _experts(h, i, h.n_ff_exp(i))
            yield from _shared_expert(h, i, h.n_ff_exp(i), gated=False)
        else:
            yield from _ffn(h, i, h.n_ff(i))


def _glm4(h: _Hp) -> Iterator[Tensor]:
    """glm4.cpp: post-attention and post-FFN norms, fused gate+up FFN."""
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        b = f"blk.{i}"
        yield from _norms(h, i, "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
        yield from _q_k_v_o(h, i, h.head_k * h.n_head)
        yield f"{b}.ffn_down.weight", (h.n_ff(i), h.n_embd)
        yield f"{b}.ffn_up.weight", (h.n_embd, 2 * h.n_ff(i))


def _command_r(h: _Hp) -> Iterator[Tensor]:
    """command-r.cpp: parallel attention+FFN block (one norm), output tied to the embeddings."""
    yield from _io(h, tied=True)
    for i in range(h.n_layer):
        b = f"blk.{i}"
        yield from _norms(h, i, "attn_norm")
        if h.n_layer >= 64:
            yield f"{b}.attn_q_norm.weight", (h.head_k, h.n_head)
            yield f"{b}.attn_k_norm.weight", (h.head_k, h.n_head_kv)
        yield from _q_k_v_o(h, i, h.n_embd)
        yield from _ffn(h, i, h.n_ff(i))


def _olmo2(h: _Hp) -> Iterator[Tensor]:
    """olmo2.cpp: norms after attention and FFN only, Q/K norms over the whole projection."""
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        b = f"blk.{i}"
        yield from _q_k_v_o(h, i, h.n_embd)
        yield f"{b}.attn_q_norm.weight", (h.n_embd,)
        yield f"{b}.attn_k_norm.weight", (h.n_head_kv * (h.n_embd // h.n_head),)
        yield from _norms(h, i, "post_attention_norm", "post_ffw_norm")
        yield from _ffn(h, i, h.n_ff(i))


def _seed_oss(h: _Hp) -> Iterator[Tensor]:
    """seed-oss.cpp: explicit head size, attn_norm and post-attention norm (the FFN's pre-norm)."""
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        yield from _q_k_v_o(h, i, h.head_k * h.n_head)
        yield from _norms(h, i, "attn_norm", "post_attention_norm")
        yield from _ffn(h, i, h.n_ff(i))


def _mamba2(h: _Hp, i: int, falcon: bool = False) -> Iterator[Tensor]:
    """A Mamba2 mixer (granite-hybrid.cpp, nemotron-h.cpp, falcon-h1.cpp)."""
    b = f"blk.{i}"
    d_conv, d_inner = int(h.get("ssm.conv_kernel")), int(h.get("ssm.inner_size"))
    d_state, n_group, n_head = int(h.get("ssm.state_size")), int(h.get("ssm.group_count")), int(h.get("ssm.time_step_rank"))
    conv = d_inner + 2 * n_group * d_state
    yield f"{b}.ssm_in.weight", (h.n_embd, d_inner + conv + n_head)
    yield f"{b}.ssm_conv1d.weight", (d_conv, conv)
    yield f"{b}.ssm_conv1d.bias", (conv,)
    yield f"{b}.ssm_dt.bias", (n_head,)
    yield f"{b}.ssm_a", (1, n_head)
    yield f"{b}.ssm_d", (1, n_head)
    yield f"{b}.ssm_norm.weight", (d_inner // n_group, n_group)
    yield f"{b}.ssm_out.weight", (d_inner, h.n_embd)


def _granite_hybrid(h: _Hp) -> Iterator[Tensor]:
    """granite-hybrid.cpp: Mamba2 where head_count_kv is 0, else attention; dense or MoE (+ shared) FFN."""
    if 2 * h.n_embd != int(h.get("ssm.inner_size")):
        raise ModelError("granitehybrid needs ssm.inner_size == 2 * embedding_length (llama.cpp asserts it)")
    yield from _io(h, tied=True)
    n_sh = int(h.get("expert_shared_feed_forward_length", 0))
    for i in range(h.n_layer):
        yield from _norms(h, i, "attn_norm", "ffn_norm")
        if h.at("attention.head_count_kv", i) == 0:
            yield from _mamba2(h, i)
        else:
            yield from _q_k_v_o(h, i, h.head_k * h.at("attention.head_count", i))
        if h.n_expert:
            yield from _experts(h, i, h.n_ff(i))
            if n_sh:
                yield from _shared_expert(h, i, n_sh, gated=False)
        else:
            yield from _ffn(h, i, h.n_ff(i))


def _nemotron_h(h: _Hp) -> Iterator[Tensor]:
    """nemotron-h.cpp: each layer is one of Mamba2 (no KV heads, no FFN), attention (no FFN) or a
    squared-ReLU MLP (up/down only)."""
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        b, n_ff = f"blk.{i}", h.n_ff(i)
        yield from _norms(h, i, "attn_norm")
        if h.at("attention.head_count_kv", i) == 0 and n_ff == 0:
            yield from _mamba2(h, i)
        elif n_ff == 0:
            yield from _q_k_v_o(h, i, h.head_k * h.at("attention.head_count", i))
        else:
            yield f"{b}.ffn_down.weight", (n_ff, h.n_embd)
            yield f"{b}.ffn_up.weight", (h.n_embd, n_ff)


def _lfm2(h: _Hp) -> Iterator[Tensor]:
    """lfm2.cpp: short-convolution layers where head_count_kv is 0, else attention with Q/K norms; the
    final norm is stored as token_embd_norm; output tied to the embeddings."""
    yield "token_embd.weight", (h.n_embd, h.n_vocab)
    yield "token_embd_norm.weight", (h.n_embd,)
    l_cache = int(h.get("shortconv.l_cache"))
    for i in range(h.n_layer):
        b = f"blk.{i}"
        yield from _norms(h, i, "ffn_norm", "attn_norm")
        yield from _ffn(h, i, h.n_ff(i))
        if h.at("attention.head_count_kv", i) == 0:
            yield f"{b}.shortconv.conv.weight", (l_cache, h.n_embd)
            yield f"{b}.shortconv.in_proj.weight", (h.n_embd, 3 * h.n_embd)
            yield f"{b}.shortconv.out_proj.weight", (h.n_embd, h.n_embd)
        else:
            yield f"{b}.attn_q_norm.weight", (h.head_k,)
            yield f"{b}.attn_k_norm.weight", (h.head_k,)
            yield from _q_k_v_o(h, i, h.n_embd)


def _falcon_h1(h: _Hp) -> Iterator[Tensor]:
    """falcon-h1.cpp: every layer has a Mamba2 mixer and attention side by side, then a SwiGLU FFN
    (its pre-norm is named blk.N.ffn_norm, without .weight)."""
    yield from _io(h, tied=False)
    for i in range(h.n_layer):
        yield from _mamba2(h, i)
        yield from _q_k_v_o(h, i, h.head_k * h.n_head)
        yield from _norms(h, i, "attn_norm")
        yield f"blk.{i}.ffn_norm", (h.n_embd,)
        yield from _ffn(h, i, h.n_ff(i))


_BUILDERS: dict[str, Callable[[_Hp], Iterator[Tensor]]] = {
    "llama": _llama,
    "eagle3": _eagle3,
    "dflash": _dflash,
    "qwen3": _qwen3,
    "qwen3moe": _qwen3,
    "qwen3next": _qwen_hybrid,
    "qwen35": _qwen_hybrid,
    "qwen35moe": _qwen_hybrid,
    "deepseek2": _deepseek2,
    "gpt-oss": _gpt_oss,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "internlm2": _llama,  # internlm2.cpp creates llama's tensors; no kvbook rule (the fallback test's model)
    "llama4": _llama4,
    "glm4": _glm4,
    "command-r": _command_r,
    "olmo2": _olmo2,
    "seed_oss": _seed_oss,
    "qwen3vl": _qwen3,
    "qwen3vlmoe": _qwen3,
    "granitehybrid": _granite_hybrid,
    "nemotron_h": _nemotron_h,
    "lfm2": _lfm2,
    "falcon-h1": _falcon_h1,
}

SUPPORTED_ARCHS: tuple[str, ...] = tuple(sorted(_BUILDERS))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def synthetic_tensors(metadata: Mapping[str, Any]) -> list[Tensor]:
    """The tensors (name, ggml shape) llama.cpp's loader creates for this metadata."""
    h = _hparams(metadata)
    build = _BUILDERS.get(h.arch)
    if build is None:
        raise ModelError(f"no synthetic GGUF for architecture {h.arch!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    return list(build(h))


def _tensor_type(name: str, ne: tuple[int, ...], weight_type: GGMLQuantizationType) -> GGMLQuantizationType:
    """F32 for norms, biases and small vectors; else the weight type when rows fit its blocks."""
    if len(ne) == 1 or name.endswith((".bias", "ssm_conv1d.weight", "ffn_gate_inp.weight", ".ssm_a", ".ssm_d",
                                      "ssm_norm.weight", "shortconv.conv.weight")):
        return GGMLQuantizationType.F32
    for t in (weight_type, GGMLQuantizationType.Q8_0):
        if ne[0] % GGML_QUANT_SIZES[t][0] == 0:
            return t
    return GGMLQuantizationType.F16


def _nbytes(ne: tuple[int, ...], t: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return int(np.prod(ne, dtype=np.int64)) // block * size


def _typed(key: str, value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """GGUF value type as llama.cpp's converters write it (ints u32, floats f32, arrays i32)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value), GGUFValueType.BOOL, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, numbers.Integral) and not key.endswith(_FLOAT_SUFFIXES):
        v = int(value)
        if v < 0:
            return v, GGUFValueType.INT32, None
        return v, GGUFValueType.UINT32 if v < 2**32 else GGUFValueType.UINT64, None
    if isinstance(value, numbers.Real):
        return float(value), GGUFValueType.FLOAT32, None
    if isinstance(value, (list, tuple)) and value:
        items = [_typed(key, x) for x in value]
        sub = items[0][1]
        if sub == GGUFValueType.UINT32:
            sub = GGUFValueType.INT32
        if any(t not in (sub, GGUFValueType.UINT32) for _, t, _ in items):
            raise ModelError(f"metadata {key!r} mixes value types: {value!r}")
        return [v for v, _, _ in items], GGUFValueType.ARRAY, sub
    raise ModelError(f"metadata {key!r} has a value GGUF cannot hold: {value!r}")


def _write_with_hole(writer: GGUFWriter, data_size: int) -> None:
    """Header, metadata and tensor infos, then `data_size` bytes of tensor data as a hole (never written)."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        fout.truncate(fout.tell() + data_size)
    finally:
        writer.close()


TINY_SHAPE: Mapping[str, Any] = {
    "context_length": 32768, "embedding_length": 256, "attention.layer_norm_rms_epsilon": 1e-6,
    "rope.freq_base": 1000000.0, "vocab_size": 1000, "attention.head_count": 4, "attention.head_count_kv": 2,
    "attention.key_length": 128, "attention.value_length": 128, "block_count": 4, "feed_forward_length": 512}
TINY_MOE: Mapping[str, Any] = {"expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 128}
TINY_HYBRID: Mapping[str, Any] = {  # qwen35: attention every 4th of 8 layers, Gated DeltaNet elsewhere
    "block_count": 8, "ssm.conv_kernel": 4, "ssm.state_size": 128, "ssm.group_count": 2, "ssm.time_step_rank": 4,
    "ssm.inner_size": 512, "full_attention_interval": 4, "rope.dimension_sections": [11, 11, 10, 0],
    "rope.dimension_count": 64}


def tiny_metadata(arch: str, **keys: Any) -> dict[str, Any]:
    """GGUF metadata of a tiny model of `arch` (TINY_SHAPE, then `keys`, each prefixed with the arch) for tests and
    benchmarks that need a file llama-server really loads; one definition so their models stay the same."""
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in {**TINY_SHAPE, **keys}.items()}}


def donor_tokenizer(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` keys of a real GGUF, for a synthetic model the server must tokenize and sample with."""
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}


def write_synthetic_gguf(metadata: Mapping[str, Any], path: Path,
                         weight_type: GGMLQuantizationType = GGMLQuantizationType.Q4_K,
                         type_overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
                         tokenizer: Mapping[str, Any] | None = None) -> Path:
    """Write `metadata` plus the architecture's tensors as a sparse GGUF at `path`.

    Tokenizer keys are replaced by `tokenizer` (a real model's, `donor_tokenizer`) or else by
    `tokenizer.ggml.model = "none"` (llama.cpp then makes `{arch}.vocab_size` dummy tokens, which it can neither
    tokenize text with nor sample). Big weights use `weight_type` where their rows fit, or the type of
    the first `type_overrides` regex found in the tensor's name (a quant mix like a real file's).
    """
    overrides = [(re.compile(pattern), t) for pattern, t in type_overrides]
    typed = []
    for name, ne in synthetic_tensors(metadata):
        wanted = next((t for rx, t in overrides if rx.search(name)), weight_type)
        typed.append((name, ne, _tensor_type(name, ne, wanted)))
    return _write_model(metadata, path, typed, tokenizer)


def write_listed_gguf(metadata: Mapping[str, Any], path: Path,
                      tensors: Sequence[tuple[str, tuple[int, ...], str]]) -> Path:
    """A sparse GGUF holding exactly these tensors (name, ne, ggml type name), in this order: a preset's tensor
    listing (params/models/<id>.tensors.tsv) as a file llama.cpp loads."""
    return _write_model(metadata, path, [(n, ne, GGMLQuantizationType[t]) for n, ne, t in tensors])


def _write_model(metadata: Mapping[str, Any], path: Path,
                 tensors: Sequence[tuple[str, tuple[int, ...], GGMLQuantizationType]],
                 tokenizer: Mapping[str, Any] | None = None) -> Path:
    h = _hparams(metadata)
    path = Path(path)
    writer = GGUFWriter(path, h.arch)
    for key, value in metadata.items():
        if key in ("general.architecture", f"{h.arch}.vocab_size") or key.startswith("tokenizer."):
            continue
        writer.add_key_value(key, *_typed(key, value))
    writer.add_uint32(f"{h.arch}.vocab_size", h.n_vocab)
    for key, value in (tokenizer or {"tokenizer.ggml.model": "none"}).items():
        writer.add_key_value(key, *_typed(key, value))
    data_size = 0
    for name, ne, t in tensors:
        nbytes = _nbytes(ne, t)
        writer.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=t)
        data_size += GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    _write_with_hole(writer, data_size)
    return path


# ---------------------------------------------------------------------------------------------
# Multimodal projectors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProjectorShape:
    """An idefics3 (SmolVLM) or gemma3 vision tower: `projection_dim` must be the text model's n_embd."""

    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    image_size: int = 64
    patch_size: int = 16
    scale_factor: int = 2
    projection_dim: int = 576
    projector_type: str = "idefics3"


def projector_tensors(s: ProjectorShape) -> list[Tensor]:
    """The tensors tools/mtmd/clip.cpp loads for an idefics3 or gemma3 tower (ggml shapes, ne0 first), all f32."""
    n_patch = (s.image_size // s.patch_size) ** 2
    out: list[Tensor] = [("v.patch_embd.weight", (s.patch_size, s.patch_size, 3, s.n_embd)),
                         ("v.patch_embd.bias", (s.n_embd,)), ("v.position_embd.weight", (s.n_embd, n_patch))]
    for i in range(s.n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            out += [(f"v.blk.{i}.{name}.weight", (s.n_embd, s.n_embd)), (f"v.blk.{i}.{name}.bias", (s.n_embd,))]
        for name in ("ln1", "ln2"):
            out += [(f"v.blk.{i}.{name}.weight", (s.n_embd,)), (f"v.blk.{i}.{name}.bias", (s.n_embd,))]
        out += [(f"v.blk.{i}.ffn_up.weight", (s.n_embd, s.n_ff)), (f"v.blk.{i}.ffn_up.bias", (s.n_ff,)),
                (f"v.blk.{i}.ffn_down.weight", (s.n_ff, s.n_embd)), (f"v.blk.{i}.ffn_down.bias", (s.n_embd,))]
    out += [("v.post_ln.weight", (s.n_embd,)), ("v.post_ln.bias", (s.n_embd,))]
    if s.projector_type == "gemma3":  # average pooling, then a projection (its transpose is multiplied) and a norm
        return out + [("mm.input_projection.weight", (s.projection_dim, s.n_embd)), ("mm.soft_emb_norm.weight", (s.n_embd,))]
    return out + [("mm.model.fc.weight", (s.n_embd * s.scale_factor ** 2, s.projection_dim))]


def write_synthetic_projector(shape: ProjectorShape, path: Path) -> Path:
    """A projector GGUF (clip.* keys as the pinned converter writes them) whose f32 tensors are a hole of
    zeros: llama-server loads it, runs its warm-up image and reserves its compute buffer."""
    path = Path(path)
    writer = GGUFWriter(path, "clip")
    writer.add_string("clip.projector_type", shape.projector_type)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    for key, value in (("embedding_length", shape.n_embd), ("feed_forward_length", shape.n_ff),
                       ("block_count", shape.n_layer), ("attention.head_count", shape.n_head),
                       ("projection_dim", shape.projection_dim), ("image_size", shape.image_size),
                       ("patch_size", shape.patch_size), ("projector.scale_factor", shape.scale_factor)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    data_size = 0
    for name, ne in projector_tensors(shape):
        nbytes = 4 * int(np.prod(ne))
        writer.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=GGMLQuantizationType.F32)
        data_size += GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    _write_with_hole(writer, data_size)
    return path


# ---------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------

def write_synthetic_lora(base: Path, path: Path, targets: tuple[str, ...] = ("attn_q", "attn_v"), rank: int = 8,
                         weight_type: GGMLQuantizationType = GGMLQuantizationType.F16, norms: bool = True) -> Path:
    """A LoRA adapter for the GGUF `base`: lora_a (ne: the base's ne0 x rank) and lora_b (rank x the base's ne1)
    for each `blk.N.<target>.weight`, plus (`norms`) a norm vector llama.cpp skips; the data is a hole of zeros."""
    from kvbook.model.sources import load_model

    model = load_model(str(base))  # kvbook's guarded header read (memoised), not a full parse of the vocabulary
    arch = model.arch
    shapes = {t.name: tuple(t.shape) for t in model.tensors}  # ne0 first
    path = Path(path)
    writer = GGUFWriter(path, arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = []
    for name, ne in shapes.items():
        if name.startswith("blk.") and name.rsplit(".", 2)[-2] in targets and name.endswith(".weight"):
            stem = name
            tensors += [(f"{stem}.lora_a", (ne[0], rank), weight_type), (f"{stem}.lora_b", (rank, ne[1]), weight_type)]
    if norms:
        tensors.append(("blk.0.attn_norm.weight", (shapes["blk.0.attn_norm.weight"][0],), GGMLQuantizationType.F32))
    data_size = 0
    for name, ne, t in tensors:
        nbytes = _nbytes(ne, t)
        writer.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=t)
        data_size += GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    _write_with_hole(writer, data_size)
    return path
