"""The speed model: an affine time per token in the context depth, fitted from llama-bench points."""

from __future__ import annotations

import pytest

from kvbook.capacity.speed import (
    Affine,
    SpeedPoint,
    batch_extra_from,
    batch_extra_from_rejections,
    batch_extra_measured,
    fit_affine,
    fit_speed,
    held_out_errors,
    spec_decode_seconds,
)
from kvbook.memory.spec_speed import SpecDecode, acceptance_for_length, expected_tokens_per_step, spec_step
from kvbook.errors import BadInput
from kvbook.ops.bench import measure_speed


def test_the_fit_recovers_an_affine_cost_and_never_lets_depth_speed_a_token_up() -> None:
    truth = Affine(0.002, 5e-7)
    depths = [0, 1000, 4000, 8000]
    fit = fit_affine(depths, [truth.tps(d) for d in depths])
    assert fit.base == pytest.approx(truth.base) and fit.slope == pytest.approx(truth.slope)
    assert fit_affine([0, 1000], [100.0, 120.0]).slope == 0.0  # noise that says "faster when deeper"
    for depths, tps in (([0], [1.0]), ([5, 5], [1.0, 2.0]), ([0, 1], [1.0, 0.0])):
        with pytest.raises(BadInput):
            fit_affine(depths, tps)


def test_a_turn_is_the_integral_over_its_new_tokens() -> None:
    model = fit_speed([SpeedPoint(0, 500.0, 100.0), SpeedPoint(8000, 100.0, 25.0)])
    prefill, decode = model.turn_seconds(6000, cached_tokens=5000, output_tokens=100)
    by_token = sum(model.prefill.seconds_per_token(5000 + i + 0.5) for i in range(1000))
    assert prefill == pytest.approx(by_token, rel=1e-9)
    assert decode == pytest.approx(sum(model.decode.seconds_per_token(6000 + i + 0.5) for i in range(100)))
    cold, _ = model.turn_seconds(6000, 0, 100)
    assert cold > 3 * prefill  # a cached prefix is what makes a warm turn fast
    with pytest.raises(BadInput):
        model.turn_seconds(100, cached_tokens=200)


def test_measured_points_on_the_bundled_model(smollm2) -> None:
    points = measure_speed(smollm2, [0, 512, 1024], prompt_tokens=64, gen_tokens=8, repetitions=1, threads=2)
    assert [p.depth for p in points] == [0, 512, 1024]
    assert all(p.prefill_tps > 0 and p.decode_tps > 0 for p in points)
    model = fit_speed(points)
    assert len(held_out_errors(model, points)) == 3


def test_expected_tokens_per_step_is_the_truncated_geometric_series() -> None:
    assert expected_tokens_per_step(0.0, 3) == 1.0 and expected_tokens_per_step(1.0, 3) == 4.0
    assert expected_tokens_per_step(0.75, 3) == pytest.approx(1 + 0.75 + 0.75**2 + 0.75**3)
    # --spec-synth-len L sets the acceptance whose expected length is L (the server bisects the same sum)
    for n, length in ((3, 2.5), (1, 1.6), (5, 1.0), (4, 5.0)):
        assert expected_tokens_per_step(acceptance_for_length(length, n), n) == pytest.approx(length, abs=1e-9)
    with pytest.raises(BadInput):
        acceptance_for_length(4.5, 3)


def test_a_speculative_step_costs_the_drafts_the_verify_batch_and_the_drafts_reevaluation() -> None:
    free = spec_step(SpecDecode(acceptance=0.75, n_draft=3, draft_cost=0.0, batch_extra=0.0))
    assert free.speedup == pytest.approx(expected_tokens_per_step(0.75, 3))  # free drafts, free batch: all gain
    step = spec_step(SpecDecode(acceptance=0.75, n_draft=3, draft_cost=0.1, batch_extra=0.2))
    assert step.verify == pytest.approx(1.6) and step.draft == pytest.approx(0.1 * (3 + 1.6))
    # a self-draft (draft as costly as the target) never pays off, even at full acceptance
    assert spec_step(SpecDecode(1.0, 3, draft_cost=1.0, batch_extra=0.0)).speedup < 1
    # more acceptance, more speed; a dearer draft, less
    assert (spec_step(SpecDecode(0.6, 3, 0.1, 0.2)).speedup < step.speedup
            < spec_step(SpecDecode(0.9, 3, 0.1, 0.2)).speedup)
    assert spec_step(SpecDecode(0.75, 3, 0.3, 0.2)).speedup < step.speedup
    model = fit_speed([SpeedPoint(0, 500.0, 100.0), SpeedPoint(8000, 100.0, 25.0)])
    plain = model.decode.seconds(6000, 100)
    assert spec_decode_seconds(model, SpecDecode(0.75, 3, 0.1, 0.2), 6000, 100) == pytest.approx(plain / step.speedup)
    assert batch_extra_from(model, 0) == pytest.approx(100 / 500)
    rejected = spec_step(SpecDecode(0.0, 3, 0.1, 0.2)).speedup
    assert batch_extra_from_rejections(rejected, 3, 0.1) == pytest.approx(0.2)
    assert batch_extra_measured(100.0, 200.0, 4) == pytest.approx((4 / 200 * 100 - 1) / 3)
    for bad in (dict(acceptance=1.1), dict(n_draft=0), dict(draft_cost=-1.0)):
        with pytest.raises(BadInput):
            SpecDecode(**{**dict(acceptance=0.5, n_draft=3, draft_cost=0.1, batch_extra=0.1), **bad})


def test_the_capacity_turn_table_shows_each_turn_with_and_without_speculation() -> None:
    """What notebook 05's turn table shows (kvbook.notebook.capacity.turn_time_rows), checked without a server."""
    from kvbook.notebook.capacity import spec_setup, turn_time_rows

    model = fit_speed([SpeedPoint(0, 500.0, 100.0), SpeedPoint(8000, 100.0, 25.0)])
    spec = spec_setup(model, acceptance=0.75, n_draft=3, draft_cost=0.2, depth=6000)
    assert spec.batch_extra == pytest.approx(batch_extra_from(model, 6000))
    rows = turn_time_rows(model, 6000, 5000, 100, spec)
    assert [r["turn"].split(",")[0] for r in rows] == ["cold (nothing cached)"] * 2 + ["system prompt + tools cached"] * 2
    plain, fast = rows[2], rows[3]
    assert "speculative" in fast["turn"] and "estimate" in fast["turn"]
    assert fast["prefill s"] == plain["prefill s"]  # speculation changes decoding only
    assert fast["decode s"] == pytest.approx(plain["decode s"] / spec_step(spec).speedup, abs=0.01)
    assert len(turn_time_rows(model, 6000, 5000, 100)) == 2
