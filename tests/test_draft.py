"""`-md FILE` (speculative decoding with a draft model): the draft gets its own context, which kvbook plans
with the same rules as the target's (the target's n_ctx, the server's slots and batch sizes, -ctkd/-ctvd
cache types, logits for one output per slot). Checked against real loads of the bundled models, each its
own draft: every exact figure the server logs for both contexts equals the plan."""

from __future__ import annotations

import json

import pytest

from kvbook import cli
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory

CASES = [
    ("smollm2", ["-c", "4096", "-np", "2"]),
    ("smollm2", ["-c", "8192"]),  # the server's default: 4 unified slots
    ("smollm2", ["-c", "4096", "-np", "1", "-ctkd", "q8_0", "-ctvd", "q8_0", "-fa", "on"]),
    ("gemma3", ["-c", "8192", "-np", "2"]),  # a sliding-window draft: its own SWA cache
    ("gemma3", ["-c", "4096", "-np", "3", "--swa-full"]),
]


@pytest.mark.parametrize("model, args", CASES, ids=[f"{m} {' '.join(a)}" for m, a in CASES])
def test_the_draft_context_is_what_the_server_allocates(request, tmp_path, model, args) -> None:
    path = str(request.getfixturevalue(model))
    with start_llama_server(["-m", path, "-md", path, *args, "-t", "1", "--no-warmup"], run_dir=tmp_path) as server:
        target, draft = server.measured(), server.measured_draft()
        plan = server.plan
    assert plan is not None and plan.memory.draft is not None and draft is not None
    for memory, logged in ((plan.memory, target), (plan.memory.draft, draft)):
        rows = compare_memory(memory, logged)
        assert not [r for r in rows if r.matches is False], rows
        assert logged.caches, "the log shows the caches"
    assert plan.memory.draft.shape.n_ctx == plan.memory.shape.n_ctx


def test_the_plan_lists_the_draft_and_counts_it(capsys, smollm2) -> None:
    base = ["plan", "--json", "--", "llama-server", "-m", str(smollm2), "-c", "4096", "-np", "2"]
    assert cli.main(base) == 0
    alone = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "-md", str(smollm2), "-ctkd", "q8_0", "-ctvd", "q8_0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert alone["draft"] is None and doc["draft"]["n_ctx"] == doc["n_ctx"]
    assert [c["k_type"] for c in doc["draft"]["caches"]] == ["q8_0"]
    assert doc["start_bytes"] - alone["start_bytes"] == doc["draft"]["start_bytes"]
    assert any(f["flag"].startswith("-md ") and "draft model" in f["changes"] for f in doc["flags_read"])


def test_a_partial_draft_offload_and_an_unknown_draft_are_one_line(capsys, smollm2) -> None:
    code = cli.main(["plan", "--device", "rtx-4090-host-64", "--", "llama-server", "-m", str(smollm2), "-md",
                     str(smollm2), "-ngld", "5"])
    _, err = capsys.readouterr()
    assert code == 2 and "-ngld 5" in err and len(err.strip().splitlines()) == 1
    # a preset with no tensor listing (presets with an exact one are sized tensor by tensor, as a GGUF)
    code = cli.main(["plan", "--", "llama-server", "-m", str(smollm2), "-md", "gemma3-270m"])
    _, err = capsys.readouterr()
    assert code == 2 and "must be a GGUF" in err


def test_the_draft_sits_where_its_flags_put_it(capsys, smollm2) -> None:
    """-ngld reads like -ngl (auto/all: the GPU; 0: the host), and the draft inherits -nkvo."""
    def devices(*extra: str) -> dict[str, dict]:
        assert cli.main(["plan", "--json", "--device", "rtx-4090-host-64", "--", "llama-server", "-m", str(smollm2),
                         "-c", "4096", "-np", "1", *extra]) == 0
        return {d["kind"]: d for d in json.loads(capsys.readouterr().out)["devices"]}

    alone, gpu, host, nkvo = (devices(), devices("-md", str(smollm2)), devices("-md", str(smollm2), "-ngld", "0"),
                              devices("-md", str(smollm2), "-nkvo"))
    assert gpu["gpu"]["weights_bytes"] == 2 * alone["gpu"]["weights_bytes"]
    assert host["gpu"]["weights_bytes"] == alone["gpu"]["weights_bytes"] and host["host"]["weights_bytes"] > 0
    assert nkvo["gpu"]["kv_bytes"] == 0 and nkvo["host"]["kv_bytes"] == 2 * alone["gpu"]["kv_bytes"]
