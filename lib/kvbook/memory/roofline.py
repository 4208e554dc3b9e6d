"""Decode-speed upper bound: every generated token reads the active weights and the filled KV cache
once, so tokens/s <= memory bandwidth / bytes read per token. A bound, not a prediction."""

from __future__ import annotations

from dataclasses import dataclass

from kvbook.interface import ModelArch, ServerFlags
from kvbook.memory.rules import plan_memory


@dataclass(frozen=True)
class DecodeBound:
    context: int
    active_weight_bytes: int
    kv_read_bytes: int
    bandwidth_gbps: float

    @property
    def bytes_per_token(self) -> int:
        return self.active_weight_bytes + self.kv_read_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / self.bytes_per_token


def active_weight_bytes(arch: ModelArch) -> int:
    """Weights read per token: all of a dense model; for MoE the shared part plus n_used/n_expert of the experts."""
    if not arch.n_expert or not arch.n_expert_used or not arch.n_ff_exp:
        return arch.weights_bytes
    expert_params = 3 * arch.n_embd * arch.n_ff_exp * arch.n_expert * arch.n_layer
    attn_params = sum(arch.n_embd * arch.head_k * (2 * h + 2 * kv) for h, kv in zip(arch.n_head, arch.n_head_kv))
    other_params = attn_params + 2 * arch.n_vocab * arch.n_embd
    expert_share = expert_params / (expert_params + other_params)
    expert_bytes = arch.weights_bytes * expert_share
    return int(arch.weights_bytes - expert_bytes + expert_bytes * arch.n_expert_used / arch.n_expert)


def expert_read_fraction(arch: ModelArch) -> float:
    """The share of a layer's expert weights one token reads: n_expert_used of n_expert (1 for dense)."""
    return arch.n_expert_used / arch.n_expert if arch.n_expert and arch.n_expert_used else 1.0


def decode_bound(arch: ModelArch, context: int, bandwidth_gbps: float, cache_type: str = "f16") -> DecodeBound:
    """The bound at a filled context of `context` tokens on one slot."""
    mem = plan_memory(arch, ServerFlags(model="x", ctx=max(context, 1), parallel=1, type_k=cache_type, type_v=cache_type))
    read = 0
    for cache in mem.caches:
        if cache.kind.value == "recurrent":
            read += cache.bytes
        else:
            read += cache.bytes * min(context, cache.cells) // cache.cells
    return DecodeBound(context=context, active_weight_bytes=active_weight_bytes(arch), kv_read_bytes=read,
                       bandwidth_gbps=bandwidth_gbps)
