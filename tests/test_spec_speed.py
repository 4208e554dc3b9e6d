"""The speculative speed model against the real llama-server: SmolLM2-135M drafting for itself (draft-simple, one
drafted token per step) with the pinned build's synthetic acceptance (--spec-synth-len). The batch cost is fitted
on the server whose drafts are all rejected; the model must then predict the server whose drafts are all accepted.
Timings on a shared machine are noisy, so the bound is generous; benchmarks/bench_spec_speed.py measures more."""

from __future__ import annotations

import pytest

from kvbook.capacity.speed import batch_extra_from_rejections
from kvbook.memory.spec_speed import expected_tokens_per_step
from kvbook.ops.spec_bench import SpecCase, measure_spec_speed

REJECT, ACCEPT = SpecCase(1, 1.0), SpecCase(1, 2.0)  # acceptance 0 and 1 with one drafted token


@pytest.fixture(scope="module")
def measured(smollm2, tmp_path_factory):
    runs = measure_spec_speed(smollm2, smollm2, [REJECT, ACCEPT], tmp_path_factory.mktemp("spec"), threads=1,
                              n_predict=16, rounds=3)
    return {m.case: m for m in runs}


def test_synthetic_acceptance_is_what_the_server_realizes(measured) -> None:
    assert measured[REJECT].realized_length == 1.0
    assert measured[ACCEPT].realized_length == pytest.approx(expected_tokens_per_step(1.0, 1))


def test_the_speed_model_predicts_full_acceptance_from_full_rejection(measured) -> None:
    reject, accept = measured[REJECT], measured[ACCEPT]
    # a step costs the same whatever is accepted, so the speed-up follows the tokens per step (the model: exactly 2)
    assert 1.3 < accept.measured_speedup / reject.measured_speedup < 2.6, (reject, accept)
    # a self-draft costs as much as the target: even every draft accepted cannot pay for it
    extra = batch_extra_from_rejections(reject.measured_speedup, 1, draft_cost=1.0)
    assert 0.0 <= extra < 3.0, extra  # a 2-token batch costs less than 4 single tokens
    predicted = accept.predicted_speedup(1.0, extra)
    assert predicted < 1.0 and accept.measured_speedup < 1.0
    assert 0.5 < accept.measured_speedup / predicted < 2.0, (predicted, reject, accept)
