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


@dataclass(frozen=True)
class WeightSplit:
    """A model's weight bytes as decode reads them: the part every token reads, the experts (all of them; a token
    reads n_used of n_expert per layer), and the output matrix (its share, counted in `shared`)."""

    shared: int
    experts: int
    output: int


def weight_split(arch: ModelArch) -> WeightSplit:
    """Shares estimated from the model's shapes (bytes per parameter taken as the file's average)."""
    embd_params = arch.n_vocab * arch.n_embd
    attn_params = sum(arch.n_embd * arch.head_k * (2 * h + 2 * kv) for h, kv in zip(arch.n_head, arch.n_head_kv))
    other_params = attn_params + 2 * embd_params
    expert_params = (3 * arch.n_embd * arch.n_ff_exp * arch.n_expert * arch.n_layer
                     if arch.n_expert and arch.n_expert_used and arch.n_ff_exp else 0)
    total = expert_params + other_params
    output = int(arch.weights_bytes * embd_params / total) if total else 0
    if not expert_params:
        return WeightSplit(shared=arch.weights_bytes, experts=0, output=min(output, arch.weights_bytes))
    experts = int(arch.weights_bytes * expert_params / total)
    return WeightSplit(shared=arch.weights_bytes - experts, experts=experts, output=output)


def active_weight_bytes(arch: ModelArch) -> int:
    """Weights read per token: all of a dense model; for MoE the shared part plus n_used/n_expert of the experts."""
    split = weight_split(arch)
    return int(split.shared + split.experts * expert_read_fraction(arch))


def batch_weight_bytes(arch: ModelArch, batch: int) -> int:
    """Weights a batch of `batch` tokens reads in one pass: the shared part once, and for MoE every expert any of
    its tokens routes to (with independent uniform routing, 1 - (1 - used/n)^batch of them per layer)."""
    split = weight_split(arch)
    if not split.experts:
        return split.shared
    return int(split.shared + split.experts * (1.0 - (1.0 - expert_read_fraction(arch)) ** batch))


def batch_extra_bound(arch: ModelArch, batch: int) -> float:
    """The bandwidth-bound cost of each token after the first in a batch, in units of one decode token: 0 for a
    dense model (one pass over the weights), more for MoE (each token brings experts of its own)."""
    return (batch_weight_bytes(arch, batch) / active_weight_bytes(arch) - 1.0) / (batch - 1) if batch > 1 else 0.0


def mtp_draft_cost(arch: ModelArch) -> float:
    """One MTP-drafted token's bytes over a target decode token's: one layer of the trunk's average active size
    plus the output matrix, which the MTP head reads again to pick its token (a bandwidth-bound estimate)."""
    split, active = weight_split(arch), active_weight_bytes(arch)
    layer = max(0, active - 2 * split.output) / max(1, arch.n_layer)
    return (layer + split.output) / active


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
