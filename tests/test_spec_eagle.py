"""`--spec-type draft-eagle3` with `-md` an EAGLE3 draft: the draft context (weights, one-layer KV cache, logits,
compute), and the run-time growth of the output buffers, as memory/speculative.py models them. Checked against the
real pinned llama-server on a tiny synthetic llama target and a synthetic eagle3 draft (one server start): every
exact figure the server logs at -lv 4 for both contexts equals the plan. The refusals are pure checks."""

from __future__ import annotations

import json

import pytest

from kvbook import cli
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.testing.synthetic import tiny_metadata, write_synthetic_gguf

ARGS = ["-c", "4096", "-np", "2", "-b", "1024", "-nr"]  # no CPU_REPACK: the mapped weights are all of them


@pytest.fixture(scope="module")
def eagle(tmp_path_factory) -> dict[str, str]:
    """A 4-layer llama target (n_embd 256) and an EAGLE3 draft reading its layers 0, 2 and 3."""
    folder = tmp_path_factory.mktemp("eagle3")
    draft = tiny_metadata("eagle3", block_count=1, target_layers=[0, 2, 3], target_hidden_size=256)
    return {"target": str(write_synthetic_gguf(tiny_metadata("llama"), folder / "target.gguf")),
            "draft": str(write_synthetic_gguf(draft, folder / "draft.gguf"))}


@pytest.fixture(scope="module")
def served(eagle, tmp_path_factory) -> tuple:
    """One real server with the EAGLE3 draft, stopped before the tests: (plan, target log, draft log, raw log)."""
    run_dir = tmp_path_factory.mktemp("eagle3-run")
    with start_llama_server(["-m", eagle["target"], "-md", eagle["draft"], "--spec-type", "draft-eagle3", *ARGS,
                             "-t", "1", "--no-warmup"], run_dir=run_dir) as server:
        return server.plan, server.measured(), server.measured_draft(), server.log_path.read_text(errors="replace")


def test_both_contexts_are_what_the_server_allocates(served) -> None:
    plan, target, draft, log = served
    assert plan is not None and plan.memory.draft is not None and draft is not None
    assert "adding speculative implementation 'draft-eagle3'" in log and "EAGLE3 extract_layers = [0, 2, 3]" in log
    for memory, logged in ((plan.memory, target), (plan.memory.draft, draft)):
        rows = compare_memory(memory, logged)
        assert not [r for r in rows if r.matches is False], rows
    # the draft: one full-attention layer of n_ctx_seq cells, f16 by default, and its own weights
    (cache,) = draft.caches
    assert (cache.layers, cache.cells, cache.k_type) == (1, plan.memory.shape.n_ctx_seq, "f16")
    assert draft.model_mib
    # an encoder context: n_outputs_max is n_batch (llama_model_has_encoder), so the graph reserves ubatch logits
    assert plan.memory.draft.shape.n_outputs_max == 1024 and "n_outputs_max         = 1024" in log
    # the target drafts 1 + 3 tokens per slot
    assert plan.memory.shape.n_outputs_max == 8 and "n_outputs_max         = 8" in log


def test_the_output_rows_grow_at_decode_time(served) -> None:
    """Not logged by the release build: the figure is the source's (speculative.py eagle3_output_bytes)."""
    plan, *_ = served
    features = 3 * 256 * 1024 * 4  # 3 extracted layers x n_embd x n_batch floats, in the target's output buffer
    encoder = (1000 + 256) * 512 * 4 - 1000 * 2 * 4  # the draft's logits and pre-norm rows for a ubatch, less start
    assert plan.memory.host_extras.spec_output_bytes == features + encoder


def test_the_plan_counts_the_draft_and_the_growth(capsys, eagle) -> None:
    base = ["plan", "--json", "--", "llama-server", "-m", eagle["target"], *ARGS]
    assert cli.main([*base, "-md", eagle["draft"]]) == 0
    simple = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "-md", eagle["draft"], "--spec-type", "draft-eagle3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["draft"]["weights_bytes"] == simple["draft"]["weights_bytes"] > 0
    assert any(f["flag"] == "--spec-type draft-eagle3" for f in doc["flags_read"])
    assert cli.main(["plan", "--", "llama-server", "-m", eagle["target"], "-md", eagle["draft"], *ARGS,
                     "--spec-type", "draft-eagle3"]) == 0
    assert "EAGLE3 output rows" in capsys.readouterr().out


@pytest.mark.parametrize("extra, why", [
    ([], "needs -md with an EAGLE3 draft GGUF"),
    (["-md", "TARGET"], "the -md draft is a llama model, not an EAGLE3 one"),
])
def test_eagle3_without_an_eagle3_draft_is_one_line(capsys, eagle, extra, why) -> None:
    extra = [eagle["target"] if a == "TARGET" else a for a in extra]
    code = cli.main(["plan", "--", "llama-server", "-m", eagle["target"], *extra, "--spec-type", "draft-eagle3"])
    _, err = capsys.readouterr()
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1
