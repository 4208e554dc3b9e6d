"""The memory model against the real llama-server: every cache to the log's printed precision,
cells and n_ctx_seq exactly, compute within its stated error, for both bundled models."""

from __future__ import annotations

import pytest

from kvbook.testing.verify import CASES, run_case


def _ids(args):
    return " ".join(args) or "defaults"


@pytest.mark.slow
@pytest.mark.parametrize("args", CASES["smollm2-135m"], ids=_ids)
def test_smollm2_matches_server_log(smollm2, llama_server, tmp_path, args):
    result = run_case("smollm2-135m", smollm2, args, tmp_path)
    assert result.mismatches == ()
    assert abs(result.compute_error_pct) <= result.compute_error_limit_pct


@pytest.mark.slow
@pytest.mark.parametrize("args", CASES["gemma3-270m"], ids=_ids)
def test_gemma3_matches_server_log(gemma3, llama_server, tmp_path, args):
    result = run_case("gemma3-270m", gemma3, args, tmp_path)
    assert result.mismatches == ()
    assert abs(result.compute_error_pct) <= result.compute_error_limit_pct


def test_compare_catches_a_wrong_prediction(smollm2):
    """The comparison can fail: a log that disagrees with the model is reported field by field."""
    from kvbook.ops.logparse import LoggedCache, LoggedMemory

    fake = LoggedMemory(n_ctx=4096, n_ctx_seq=4096, n_ubatch=512, output_mib=0.19, model_mib={"CPU_Mapped": 92.1},
                        compute_mib={"CPU": 10.0},
                        caches=(LoggedCache("kv", 4096, 30, "f16", 45.0, "f16", 46.0, 91.0),))
    from kvbook.testing.verify import check_case

    result = check_case("smollm2-135m", smollm2, ["-c", "4096", "-np", "1"], fake)
    assert any("V MiB" in m for m in result.mismatches)
    assert any("kv cache MiB" in m for m in result.mismatches)
