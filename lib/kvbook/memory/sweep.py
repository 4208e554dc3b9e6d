"""Vectorised memory model for the notebooks: numpy arrays of contexts x cache types x slot counts for
one model, from the same formulas as kvbook.memory.rules.plan_memory (and a test checks they agree)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvbook.interface import MiB, ModelArch
from kvbook.memory import rules
from kvbook.memory.backends import GPU_BACKENDS, one_gpu_bytes
from kvbook.memory.compute import compute_bytes
from kvbook.memory.xp import NUMPY


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
        start: np.ndarray = self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.compute_bytes + self.output_bytes
        return start

    @property
    def total_bytes(self) -> np.ndarray:
        total: np.ndarray = self.start_bytes + self.host_extras_bytes
        return total


def sweep(
    arch: ModelArch,
    ctx: np.ndarray | Sequence[int],
    cache_types: tuple[str, ...] | list[str] = ("f16",),
    slots: np.ndarray | Sequence[int] = (1,),
    *,
    unified: bool = False,
    ubatch: int = 512,
    batch: int = 2048,
    flash_attn: bool = True,
    swa_full: bool = False,
    cache_ram_mib: int = 8192,
    ctx_checkpoints: int = 32,
    fit: bool = True,
    backend: str = "CPU",
    unified_memory: bool = False,
) -> SweepResult:
    """Memory for every combination; K and V use the same cache type, as in the notebooks' sweeps.

    The formulas are kvbook.memory.rules' own, evaluated over arrays. On a GPU `backend` (every layer on the one
    device) the compute is that backend's high end (kvbook.memory.backends): the device's buffer, plus the host
    side's on unified memory (`unified_memory`)."""
    xp = NUMPY
    c = np.asarray(ctx, dtype=np.int64).reshape(-1, 1, 1)
    s = np.asarray(slots, dtype=np.int64).reshape(1, 1, -1)
    types = tuple(cache_types)
    n_seq, uni = rules.slots(xp, s, unified)
    n_ctx, n_ctx_seq, streams, _, n_ub = rules.context_sizes(xp, arch.n_ctx_train, c, n_seq, uni, fit, batch, ubatch)

    full, swa = rules.attention_layers(arch)
    per_type = [[sum(rules.cell_bytes(arch, layers, t, t, flash_attn, strict=False)) for t in types]
                for layers in (full, swa)]
    per_cell_full, per_cell_swa = (np.array(row, dtype=np.int64).reshape(1, -1, 1) for row in per_type)
    zero = np.zeros_like(n_ctx_seq)
    swa_cells = rules.swa_cell_count(xp, arch.n_swa, n_ctx_seq, n_seq, uni, n_ub, swa_full) if swa else zero
    kv = (per_cell_full * n_ctx_seq + per_cell_swa * swa_cells) * streams
    like = 0 * kv  # broadcasts every result to (context, cache type, slots)

    rec_per_seq = sum(rules.recurrent_seq_bytes(arch))
    recurrent = rec_per_seq * np.maximum(1, n_seq) + like
    full_cells = n_ctx_seq if full else zero
    if backend in GPU_BACKENDS:
        device, host = one_gpu_bytes(xp, arch, backend, flash_attn=flash_attn, n_ubatch=n_ub,
                                     cells_sum=full_cells + swa_cells, cells_max=np.maximum(full_cells, swa_cells),
                                     n_seq=n_seq)
        compute = device + (host if unified_memory else 0) + like
    else:
        compute = compute_bytes(xp, arch, flash_attn, n_ub, full_cells + swa_cells,
                                np.maximum(full_cells, swa_cells)) + like
    # on a discrete GPU the logits (like the host-side compute) sit in host RAM: the curve is what the GPU holds
    on_gpu_only = backend in GPU_BACKENDS and not unified_memory
    output = rules.logits_bytes(arch.n_vocab, n_seq) * (0 if on_gpu_only else 1) + like
    each = rules.checkpoint_seq_bytes(xp, per_cell_swa, len(swa), arch.n_swa, n_ctx_seq, rec_per_seq, streams)
    checkpoints = rules.checkpoints_bytes(arch, each, ctx_checkpoints, n_seq, swa_full)
    extras = max(cache_ram_mib, 0) * MiB + checkpoints + like
    return SweepResult(
        ctx=c.reshape(-1), cache_types=types, slots=s.reshape(-1), n_ctx=n_ctx + like, n_ctx_seq=n_ctx_seq + like,
        kv_bytes=kv, recurrent_bytes=recurrent, compute_bytes=compute, output_bytes=output,
        weights_bytes=arch.weights_bytes, host_extras_bytes=extras,
    )


def largest_fitting_ctx(result: SweepResult, budget_bytes: int, *, include_host_extras: bool = False) -> np.ndarray:
    """Per (cache type, slots): the largest swept context whose allocation fits the budget (0 if none)."""
    need = result.total_bytes if include_host_extras else result.start_bytes
    fits = need <= budget_bytes
    ctx = result.ctx.reshape(-1, 1, 1) * np.ones_like(need)
    largest: np.ndarray = np.where(fits, ctx, 0).max(axis=0)
    return largest
