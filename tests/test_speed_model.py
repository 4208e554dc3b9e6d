"""The speed model: an affine time per token in the context depth, fitted from llama-bench points."""

from __future__ import annotations

import pytest

from kvbook.capacity.speed import Affine, SpeedPoint, fit_affine, fit_speed, held_out_errors
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
