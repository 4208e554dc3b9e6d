"""kvbook's solver against llama.cpp's --fit (the pinned llama-fit-params) on the same inputs, both checked by
real llama-server runs over loopback ggml-rpc-server devices: wherever fit's choice fits, kvbook's fits too
and is at least as good on the objective; where fit gives up, kvbook still finds a placement that fits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvbook.ops.solver_fit import compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_solver_vs_fit import cases  # the benchmark's cases, one source

pytestmark = pytest.mark.slow
SUBSET = ("gemma3 2 RPC, -c fixed", "gemma3 2 RPC, -c open", "gemma3 user -ngl 12, -c open", "MoE 2 RPC, small",
          "MoE user --cpu-moe", "MoE user --cpu-moe, smaller")


@pytest.fixture(scope="module")
def all_cases(tmp_path_factory):
    return {c.name: c for c in cases(tmp_path_factory.mktemp("cases"))}


@pytest.mark.parametrize("name", SUBSET)
def test_kvbook_fits_wherever_fit_does_and_is_no_worse(rpc_servers, all_cases, tmp_path, name) -> None:
    case = all_cases[name]
    result = compare(case, rpc_servers[:len(case.budgets_mib)], tmp_path)
    k, f = result.kvbook, result.fit
    assert k.argv and k.fits, (k.used_mib, case.budgets_mib, k.argv)
    assert len(k.used_mib) == len(case.budgets_mib) and k.n_ctx > 0
    if "gives up" in f.note:
        # fit aborts on what the user set; its log line ("n_gpu_layers already set by user to 12, abort",
        # "tensor_buft_overrides already set by user, abort") is
        # lost at exit in some runs (llama.cpp's log thread is not flushed on exit(1)), so it is checked when present
        assert not f.argv and f.note.startswith("gives up (exit 1")
        assert ":" not in f.note or "already set by user" in f.note, f.note
        return
    assert f.argv and f.fits, (f.used_mib, case.budgets_mib, f.argv)
    if case.objective == "max-context":
        assert k.n_ctx >= f.n_ctx
    else:
        assert k.n_ctx >= f.n_ctx and f.host_read_bytes is not None and k.host_read_bytes <= f.host_read_bytes


@pytest.fixture()
def rpc_servers(rpc_endpoints):
    return rpc_endpoints[:2]
