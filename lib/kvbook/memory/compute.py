"""Compute-buffer estimate for the CPU backend: attention/mask terms from first principles plus a
per-token activation term calibrated on real llama-server runs.

llama.cpp sizes this buffer from a worst-case graph and prints it; there is no closed form.
What is modelled:
- flash attention on: one f16 mask per attention cache, n_kv x n_ubatch;
- flash attention off: f32 scores for the largest cache (n_head x n_kv x n_ubatch) plus f32 masks;
- one row of logits; where speculative decoding reserves many output rows (n_outputs_max: the drafted
  tokens), the peak is at the output instead: the masks, the reserved rows of f32 logits and OUTPUT_TAIL
  residual-width f32 tensors alive beside them (ggml-alloc frees the layers' activations by then);
- activations: COEF x n_ubatch x width floats, width = n_embd + FFN width + n_head*head_k.
COEF and the measured error come from tools/calibrate_compute.py over
data/compute_calibration.jsonl (both bundled models, 120 flag sets).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from kvbook.interface import ComputeEstimate, ContextShape, ModelArch
from kvbook.memory.xp import PY, Num


@cache
def coefficients() -> dict[str, Any]:
    """The fitted compute coefficients shipped in kvbook/data (calibrated on CPU)."""
    coef: dict[str, Any] = json.loads(resources.files("kvbook").joinpath("data/compute_coefficients.json").read_text())
    return coef


def activation_width(arch: ModelArch) -> int:
    """Floats per token live at the activation peak (dense FFN, or the routed experts' FFN)."""
    ffn = arch.n_expert_used * arch.n_ff_exp if arch.n_expert_used and arch.n_ff_exp else arch.n_ff
    q_width = max((h * arch.head_k for h in arch.n_head), default=0)
    extra = arch.recurrent.d_inner if arch.recurrent else 0
    return arch.n_embd + ffn + q_width + extra


# residual-width f32 tensors (n_embd x n_ubatch) alive at the output matmul beside the logits: fitted to the pinned
# server's CPU buffer for SmolLM2 with 130 and 512 reserved rows (ngram speculation): 33.1 vs 32.02 MiB, 104.75
# vs 104.77 (tests/test_spec_ngram.py checks it within the CPU estimate's error)
OUTPUT_TAIL = 6


def output_peak(xp: Any, arch: ModelArch, flash_attn: bool, n_ubatch: Num, cells_sum: Num, rows: Num) -> Num:
    """The buffer at the output matmul when `rows` logits rows are reserved (module docstring)."""
    mask = 2 * n_ubatch * cells_sum if flash_attn else 4 * n_ubatch * cells_sum
    return mask + 4 * arch.n_vocab * rows + OUTPUT_TAIL * 4 * arch.n_embd * n_ubatch


def compute_bytes(xp: Any, arch: ModelArch, flash_attn: bool, n_ubatch: Num, cells_sum: Num, cells_max: Num,
                  coef: float | None = None) -> Num:
    """The estimate for one ubatch over attention caches of `cells_sum` cells in all (the largest
    `cells_max`): masks (and scores without flash attention), one row of logits, and `coef` (the
    calibrated coefficient unless given) x the activations. Scalars or arrays (see kvbook.memory.xp)."""
    if coef is None:
        coef = coefficients()["fa_on" if flash_attn else "fa_off"]["coef"]
    if flash_attn:
        attention = 2 * n_ubatch * cells_sum
    else:
        attention = n_ubatch * (4 * max(arch.n_head, default=0) * cells_max + 4 * cells_sum)
    return attention + 4 * arch.n_vocab + xp.to_int(4 * n_ubatch * activation_width(arch) * coef)


def estimate_compute(arch: ModelArch, shape: ContextShape, cells: list[int]) -> ComputeEstimate:
    """The compute buffer for a context whose attention caches have `cells` cells each."""
    coef = coefficients()
    mode = "fa_on" if shape.flash_attn else "fa_off"
    total = compute_bytes(PY, arch, shape.flash_attn, shape.n_ubatch, sum(cells), max(cells, default=0))
    rows = shape.reserve_outputs or min(shape.n_ubatch, shape.n_outputs_max)  # graph_reserve's logits rows
    total = max(total, output_peak(PY, arch, shape.flash_attn, shape.n_ubatch, sum(cells), rows))
    return ComputeEstimate(
        bytes=int(total),
        error_pct=float(coef[mode]["max_error_pct"]),
        method=f"calibrated on CPU ({coef['calibrated_on']}); median error {coef[mode]['median_error_pct']}%",
    )
