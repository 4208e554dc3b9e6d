"""The seed scenario's recommendation (#25 item 3): where the model has an MTP head the line does not use, the plan
offers the MTP line that fits as an alternative, with its exact extra memory per device (the planner's own plan of
that line) and its decode speed-up as an estimate interval. Pure plans, no server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvbook.memory.spec_speed import expected_tokens_per_step
from kvbook.model.sources import load_model
from kvbook.plan.spec_offer import ACCEPTANCE, speedup_interval

_spec = importlib.util.spec_from_file_location("golden_plans", Path(__file__).resolve().parents[1] / "tools" / "golden_plans.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)  # type: ignore[union-attr]

MTP = "qwen3.6-35b-a3b-mtp"


def _offer(plan):
    alts = [a for a in plan.alternatives if "--spec-type" in a.flags]
    notes = [n for n in plan.notes if n.code.startswith("speculative.mtp-")]
    return alts, notes


@pytest.mark.parametrize("device, argv", [("m1-max-64", ()), ("rtx-4090-host-64", ()),
                                          ("rtx-4090-host-64", ("-c", "32768"))])
def test_the_seed_scenario_is_offered_mtp_with_its_exact_memory(device, argv) -> None:
    plan = golden.plan_request(["-m", MTP, *argv], device)
    (alt,), (note,) = _offer(plan)
    assert note.code == "speculative.mtp-offer" and "estimate" in note.text and "(exact" in note.text
    assert alt.verdict.value == "fits" and "draft-mtp" in alt.flags
    # the alternative's line, planned on its own, is what the offer says, and it fits
    with_mtp = golden.plan_request(list(alt.flags), device)
    assert with_mtp.verdict.value == "fits" and with_mtp.memory.draft is not None
    assert alt.total_bytes == sum(u.need_bytes for u in with_mtp.pools)
    # the extra memory is exact: the MTP line against the same line (same -c) without --spec-type
    without = golden.plan_request([a for a in alt.flags if a not in ("--spec-type", "draft-mtp")], device)
    for mtp_pool, base_pool in zip(with_mtp.pools, without.pools):
        diff = (mtp_pool.need_bytes - base_pool.need_bytes) / 2**20
        if round(diff):
            assert f"{diff:+.0f} MiB on {mtp_pool.pool}" in note.text, (note.text, mtp_pool.pool, diff)
    gpu = next(p for p in with_mtp.pools if p.pool in ("Metal", "CUDA0"))
    assert 0 < gpu.need_bytes - next(p for p in without.pools if p.pool == gpu.pool).need_bytes < 4 * 2**30


def test_no_offer_without_a_head_or_with_speculation_already_on() -> None:
    for argv in (["-m", "qwen3.6-35b-a3b"], ["-m", MTP, "--spec-type", "draft-mtp"]):
        assert _offer(golden.plan_request(argv, "m1-max-64")) == ([], [])


def test_the_speed_up_interval_brackets_the_public_reports() -> None:
    """Low end: 0.6 acceptance and verify batches that read each token's experts (MoE at the bandwidth bound);
    high end: 0.8 and free batches. Qwen3.6-35B-A3B reports range from no gain to +20% on CUDA with 2 drafts
    (ikawrakow/ik_llama.cpp#1815, ggml-org/llama.cpp#23230), inside the interval."""
    low, high = speedup_interval(load_model(MTP), 2)
    assert low < 1.0 < 1.2 < high < expected_tokens_per_step(ACCEPTANCE[1], 2)
    assert speedup_interval(load_model(MTP), 3)[1] > high  # more drafts: more to gain and to lose
