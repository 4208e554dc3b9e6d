"""The memory model against the real llama-server: every cache to the log's printed precision,
cells and n_ctx_seq exactly, for both bundled models and many flag sets."""

from __future__ import annotations

import pytest

from kvbook.flags import parse_server_args
from kvbook.loaders import load_gguf
from kvbook.logparse import mib2
from kvbook.memory import plan_memory
from kvbook.serve import start_llama_server

SMOLLM2_CASES = [
    [],  # server defaults: 4 slots, unified KV, -c 0 = training context
    ["-c", "4096", "-np", "1"],
    ["-c", "20000", "-np", "3"],
    ["-c", "8192", "-np", "2", "-kvu"],
    ["-c", "0", "-np", "2"],
    ["-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
    ["-c", "4096", "-ctk", "q4_0", "-ctv", "q4_1", "-fa", "on", "-np", "1"],
    ["-c", "2048", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-np", "1"],
    ["-c", "4096", "-ctk", "bf16", "-ctv", "bf16", "-np", "1"],
    ["-c", "4096", "-ctk", "iq4_nl", "-ctv", "q5_1", "-fa", "on", "-np", "1"],
    ["-c", "3000", "-ctk", "q5_0", "-ctv", "q5_0", "-fa", "auto", "-np", "2", "-kvu"],
    ["-c", "4096", "-ub", "128", "-b", "256", "-np", "1"],
    ["-c", "4096", "-fa", "off", "-ctk", "q8_0", "-np", "1"],
]
GEMMA3_CASES = [
    [],
    ["-c", "32768", "-np", "1"],
    ["-c", "32768", "-np", "4", "--kv-unified"],
    ["-c", "16384", "-np", "1", "--swa-full"],
    ["-c", "20000", "-np", "3", "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "-ub", "256"],
    ["-c", "8192", "-ub", "1024", "-b", "1024", "-np", "1"],
    ["-c", "4096", "-fa", "off", "-np", "1"],
    ["-c", "8192", "-np", "2", "-ctk", "q5_1", "-ctv", "q5_0", "-fa", "on"],
    ["-c", "0", "-np", "1", "-ctk", "bf16", "-ctv", "bf16"],
    ["-c", "4096", "-np", "4", "--swa-full", "-ub", "64"],
    ["-c", "10000", "-np", "2", "-kvu", "-ub", "300", "-b", "600"],
]


def _check(model, args, tmp_path):
    flags = parse_server_args(["llama-server", "-m", str(model), *args, "--no-warmup"])
    predicted = plan_memory(load_gguf(model), flags)
    with start_llama_server(flags, run_dir=tmp_path, plan_first=False) as server:
        logged = server.measured()
    where = f"llama-server {' '.join(args) or '(defaults)'}"
    assert logged.n_ctx == predicted.shape.n_ctx, where
    assert logged.n_ctx_seq == predicted.shape.n_ctx_seq, where
    assert logged.n_ubatch == predicted.shape.n_ubatch, where
    assert [c.kind for c in logged.caches] == [c.kind.value for c in predicted.caches], where
    for seen, want in zip(logged.caches, predicted.caches):
        assert (seen.cells, seen.layers) == (want.cells, want.layers), where
        assert (seen.k_type, seen.v_type) == (want.k_type, want.v_type), where
        assert seen.k_mib == mib2(want.k_bytes), where
        assert seen.v_mib == mib2(want.v_bytes), where
        assert seen.total_mib == mib2(want.bytes), where
    assert logged.output_mib == mib2(predicted.output_bytes), where
    assert logged.model_mib.get("CPU_Mapped") == mib2(predicted.weights_bytes), where
    err = abs(logged.compute_bytes - predicted.compute.bytes) / logged.compute_bytes * 100
    assert err <= predicted.compute.error_pct, f"{where}: compute off by {err:.1f}%"


@pytest.mark.slow
@pytest.mark.parametrize("args", SMOLLM2_CASES, ids=lambda a: " ".join(a) or "defaults")
def test_smollm2_matches_server_log(smollm2, llama_server, tmp_path, args):
    _check(smollm2, args, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("args", GEMMA3_CASES, ids=lambda a: " ".join(a) or "defaults")
def test_gemma3_matches_server_log(gemma3, llama_server, tmp_path, args):
    _check(gemma3, args, tmp_path)
