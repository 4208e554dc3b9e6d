"""Vectorised memory model for the notebooks: numpy arrays of contexts x cache types x slot counts
for one model, the same numbers as kvbook.memory.rules.plan_memory (a test checks they agree)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbook.interface import MiB, ModelArch
from kvbook.memory.compute import activation_width, coefficients
from kvbook.memory.rules import CACHE_TYPE_LAYOUT, CTX_PAD, SERVER_AUTO_SLOTS


@dataclass(frozen=True)
class SweepResult:
    """Arrays broadcast over (context, cache type, slots); bytes unless named otherwise."""

    ctx: np.ndarray
    cache_types: tuple[str, ...]
    slots: np.ndarray
    n_ctx: np.ndarray
    n_ctx_seq: np.ndarray
    kv_bytes: np.ndarray
    recurrent_bytes: np.ndarray
    compute_bytes: np.ndarray
    output_bytes: np.ndarray
    weights_bytes: int
    host_extras_bytes: np.ndarray

    @property
    def start_bytes(self) -> np.ndarray:
        return self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.compute_bytes + self.output_bytes

    @property
    def total_bytes(self) -> np.ndarray:
        return self.start_bytes + self.host_extras_bytes


def _pad(a: np.ndarray) -> np.ndarray:
    return (a + CTX_PAD - 1) // CTX_PAD * CTX_PAD


def _per_cell_bytes(arch: ModelArch, cache_type: str, layers: list[int], k: bool, flash: bool) -> int:
    """Bytes per cell per stream of one cache for one side (K or V)."""
    block, size = CACHE_TYPE_LAYOUT[cache_type]
    if not k and arch.is_mla:
        return 0
    v_max = max((arch.head_v_at(il) * arch.n_head_kv[il] for il in range(arch.n_layer) if arch.has_kv(il)), default=0)
    total = 0
    for il in layers:
        if k:
            width = arch.head_k_at(il) * arch.n_head_kv[il]
        else:
            width = arch.head_v_at(il) * arch.n_head_kv[il] if flash else v_max
        total += width // block * size
    return total


def sweep(
    arch: ModelArch,
    ctx: np.ndarray | list[int],
    cache_types: tuple[str, ...] | list[str] = ("f16",),
    slots: np.ndarray | list[int] = (1,),
    *,
    unified: bool = False,
    ubatch: int = 512,
    batch: int = 2048,
    flash_attn: bool = True,
    swa_full: bool = False,
    cache_ram_mib: int = 8192,
    ctx_checkpoints: int = 32,
    fit: bool = True,
) -> SweepResult:
    """Memory for every combination; K and V use the same cache type, as in the notebooks' sweeps."""
    c = np.asarray(ctx, dtype=np.int64).reshape(-1, 1, 1)
    s = np.asarray(slots, dtype=np.int64).reshape(1, 1, -1)
    types = tuple(cache_types)
    auto = s < 0
    n_seq = np.where(auto, SERVER_AUTO_SLOTS, s)
    uni = auto | unified
    streams = np.where(uni, 1, n_seq)
    base = np.where(c > 0, c, arch.n_ctx_train * np.where(fit & ~uni, n_seq, 1))
    n_ctx = _pad(base)
    n_ctx_seq = np.where(uni, n_ctx, _pad(n_ctx // n_seq))
    n_ctx = np.where(uni, n_ctx, n_ctx_seq * n_seq)
    n_batch = np.minimum(n_ctx, batch)
    n_ub = np.minimum(n_batch, ubatch)

    full = [il for il in range(arch.n_layer) if arch.has_kv(il) and not arch.is_swa[il]]
    swa = [il for il in range(arch.n_layer) if arch.has_kv(il) and arch.is_swa[il]]
    per_cell_full = np.array([_per_cell_bytes(arch, t, full, True, flash_attn) + _per_cell_bytes(arch, t, full, False, flash_attn)
                              for t in types], dtype=np.int64).reshape(1, -1, 1)
    per_cell_swa = np.array([_per_cell_bytes(arch, t, swa, True, flash_attn) + _per_cell_bytes(arch, t, swa, False, flash_attn)
                             for t in types], dtype=np.int64).reshape(1, -1, 1)
    if swa:
        window = arch.n_swa * np.where(uni, n_seq, 1) + n_ub
        swa_cells = np.where(swa_full, n_ctx_seq, _pad(np.minimum(n_ctx_seq, window)))
    else:
        swa_cells = np.zeros_like(n_ctx_seq)
    kv = (per_cell_full * n_ctx_seq + per_cell_swa * swa_cells) * streams

    n_rec = sum(arch.is_recurrent)
    rec_per_seq = 4 * (arch.recurrent.n_embd_r + arch.recurrent.n_embd_s) * n_rec if arch.recurrent and n_rec else 0
    recurrent = rec_per_seq * np.maximum(1, n_seq) + 0 * kv

    coef = coefficients()["fa_on" if flash_attn else "fa_off"]["coef"]
    cells_sum = (n_ctx_seq if full else 0) + (swa_cells if swa else 0)
    cells_max = np.maximum(n_ctx_seq if full else 0, swa_cells if swa else 0)
    if flash_attn:
        attention = 2 * n_ub * cells_sum
    else:
        attention = n_ub * (4 * max(arch.n_head, default=0) * cells_max + 4 * cells_sum)
    compute = (attention + 4 * arch.n_vocab + (4 * n_ub * activation_width(arch) * coef).astype(np.int64)) + 0 * kv
    output = arch.n_vocab * 4 * n_seq + 0 * kv

    checkpoints = 0
    if ctx_checkpoints and (swa or n_rec):
        per_seq = per_cell_swa * swa_cells + rec_per_seq
        checkpoints = per_seq * ctx_checkpoints * n_seq
    extras = (max(cache_ram_mib, 0) * MiB + checkpoints) + 0 * kv
    return SweepResult(
        ctx=c.reshape(-1), cache_types=types, slots=s.reshape(-1), n_ctx=n_ctx + 0 * kv, n_ctx_seq=n_ctx_seq + 0 * kv,
        kv_bytes=kv, recurrent_bytes=recurrent, compute_bytes=compute, output_bytes=output,
        weights_bytes=arch.weights_bytes, host_extras_bytes=extras,
    )


def largest_fitting_ctx(result: SweepResult, budget_bytes: int, *, include_host_extras: bool = False) -> np.ndarray:
    """Per (cache type, slots): the largest swept context whose allocation fits the budget (0 if none)."""
    need = result.total_bytes if include_host_extras else result.start_bytes
    fits = need <= budget_bytes
    ctx = result.ctx.reshape(-1, 1, 1) * np.ones_like(need)
    return np.where(fits, ctx, 0).max(axis=0)
