"""Compute-buffer estimate for the CPU backend: attention/mask terms from first principles plus a
per-token activation term calibrated on real llama-server runs.

llama.cpp sizes this buffer from a worst-case graph and prints it; there is no closed form.
What is modelled:
- flash attention on: one f16 mask per attention cache, n_kv x n_ubatch;
- flash attention off: f32 scores for the largest cache (n_head x n_kv x n_ubatch) plus f32 masks;
- one row of logits;
- activations: COEF x n_ubatch x width floats, width = n_embd + FFN width + n_head*head_k.
COEF and the measured error come from tools/calibrate_compute.py over
data/compute_calibration.jsonl (both bundled models, 120 flag sets).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from kvbook.interface import ComputeEstimate, ContextShape, ModelArch


@cache
def coefficients() -> dict:
    return json.loads(resources.files("kvbook").joinpath("data/compute_coefficients.json").read_text())


def activation_width(arch: ModelArch) -> int:
    """Floats per token live at the activation peak (dense FFN, or the routed experts' FFN)."""
    ffn = arch.n_expert_used * arch.n_ff_exp if arch.n_expert_used and arch.n_ff_exp else arch.n_ff
    q_width = max((h * arch.head_k for h in arch.n_head), default=0)
    extra = arch.recurrent.d_inner if arch.recurrent else 0
    return arch.n_embd + ffn + q_width + extra


def attention_bytes(arch: ModelArch, shape: ContextShape, cache_cells: list[int]) -> int:
    """Mask and (without flash attention) score buffers for one ubatch."""
    if not cache_cells:
        return 0
    if shape.flash_attn:
        return 2 * shape.n_ubatch * sum(cache_cells)
    n_head = max(arch.n_head, default=0)
    return shape.n_ubatch * (4 * n_head * max(cache_cells) + 4 * sum(cache_cells))


def estimate_compute(arch: ModelArch, shape: ContextShape, cells: list[int]) -> ComputeEstimate:
    """The compute buffer for a context whose attention caches have `cells` cells each."""
    coef = coefficients()
    mode = "fa_on" if shape.flash_attn else "fa_off"
    act = 4 * shape.n_ubatch * activation_width(arch) * coef[mode]["coef"]
    total = attention_bytes(arch, shape, cells) + 4 * arch.n_vocab + act
    return ComputeEstimate(
        bytes=int(total),
        error_pct=float(coef[mode]["max_error_pct"]),
        method=f"calibrated on CPU ({coef['calibrated_on']}); median error {coef[mode]['median_error_pct']}%",
    )
