"""A real GPU backend without a GPU: the pinned llama.cpp built with Vulkan (`make vulkan`) runs on Mesa's lavapipe,
and for each flag set every device's model and KV buffers (Vulkan0, Vulkan1, the CPU's CPU_Mapped / CPU_REPACK /
Vulkan_Host, RPC) equal kvbook's plan to the printed MiB; compute buffers are compared within a stated error.

The live tests are marked `vulkan`: without the build they are deselected and the session summary says so
(tests/conftest.py); `make test-vulkan` builds it and makes them fail instead. The replay test re-plans every
committed measurement (tests/data/vulkan/lavapipe.jsonl, benchmarks/bench_vulkan.py) and needs no Vulkan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbook.testing.vulkan import CASES, argv_for, model_file, plan_json, planned_by_device, run_case

DATA = Path(__file__).resolve().parent / "data" / "vulkan" / "lavapipe.jsonl"
BY_ID = {c.id: c for c in CASES}
# compute buffers on Vulkan: kvbook's CPU-calibrated estimate is within this much of lavapipe's per device
# (measured: docs/accuracy.md); it is not the exact rule, so a stated band, not equality
COMPUTE_TOLERANCE_PCT = 60.0
COMPUTE_FLOOR_MIB = 5.0  # small buffers (a few MiB): absolute band instead
LIVE = [c for c in CASES if c.id in {  # one of each kind; the full grid runs in benchmarks/bench_vulkan.py
    "smollm2-1vk -ngl 12 -c 4096 -np 1",
    "gemma3-1vk -ngl 10 -fa on -c 8192 -np 2",
    "gemma3-2vk -ngl all -ts 1,1 -c 4096 -np 1",
    "moe-1vk -ngl all --n-cpu-moe 2 -c 4096 -np 1",
    "hybrid-1vk -ngl 4 -c 4096 -np 1",
    "gemma3-1vk-1rpc -ngl all -c 4096 -np 1",
}]


def rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def assert_exact_weights_and_kv(logged: dict, planned: dict, case_id: str) -> None:
    assert set(logged) == set(planned), (case_id, logged, planned)
    for dev, got in logged.items():
        want = planned[dev]
        assert got["weights"] == want["weights"], (case_id, dev, got, want)
        assert got["repack"] == want["repack"], (case_id, dev, got, want)
        assert got["kv"] == want["kv"], (case_id, dev, got, want)


def compute_ok(got: float, want: float) -> bool:
    return abs(want - got) <= max(COMPUTE_TOLERANCE_PCT / 100 * got, COMPUTE_FLOOR_MIB)


@pytest.mark.slow
@pytest.mark.vulkan
@pytest.mark.parametrize("case", LIVE, ids=[c.id for c in LIVE])
def test_vulkan_devices_hold_what_the_plan_says(case, tmp_path) -> None:
    from kvbook.ops.components import vulkan_llama_server

    row = run_case(case, vulkan_llama_server(), tmp_path)
    assert any(dev.startswith("Vulkan") for dev in row.logged), row.logged  # it really ran on Vulkan
    assert_exact_weights_and_kv(row.logged, row.planned, case.id)
    for dev, got in row.logged.items():
        assert compute_ok(got["compute"], row.planned[dev]["compute"]), (case.id, dev, got, row.planned[dev])


def test_every_case_was_measured_and_replans_to_the_logged_buffers(tmp_path) -> None:
    """The committed lavapipe measurements against today's rules: weights and KV exact per device, compute in band."""
    measured = rows()
    assert {r["case"] for r in measured} == set(BY_ID), "rerun benchmarks/bench_vulkan.py after changing CASES"
    for r in measured:
        case = BY_ID[r["case"]]
        endpoints = [f"127.0.0.1:{50052 + i}" for i in range(case.rpc)]  # names only: planning contacts nothing
        planned = planned_by_device(plan_json(case, argv_for(case, model_file(case.model, tmp_path), endpoints)))
        assert_exact_weights_and_kv(r["logged"], planned, case.id)
        for dev, got in r["logged"].items():
            assert compute_ok(got["compute"], planned[dev]["compute"]), (case.id, dev, got, planned[dev])
