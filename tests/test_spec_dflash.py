"""`--spec-type draft-dflash` with `-md` a plain DFlash draft: its context (weights, a standard KV cache over its
layers, logits, n_outputs_max = n_batch) as memory/speculative.py models it, checked against the real pinned
llama-server at -lv 4 on a tiny synthetic llama target and a synthetic 2-layer DFlash draft (one start, no request:
a synthetic vocabulary cannot be sampled). The DFlash forms kvbook does not model are refused (pure checks)."""

from __future__ import annotations

import pytest

from kvbook import cli
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.testing.synthetic import tiny_metadata, write_synthetic_gguf

ARGS = ["-c", "4096", "-np", "2", "-nr"]  # -nr: no CPU_REPACK, the mapped weights are all of them


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A 4-layer llama target (n_embd 256) and a 2-layer DFlash draft reading its layers 0, 2 and 3 (block 4)."""
    folder = tmp_path_factory.mktemp("dflash")
    draft = tiny_metadata("dflash", block_count=2, target_layers=[0, 2, 3], block_size=4)
    swa = tiny_metadata("dflash", block_count=2, target_layers=[0, 2, 3], **{"attention.sliding_window": 128})
    return {"target": str(write_synthetic_gguf(tiny_metadata("llama"), folder / "target.gguf")),
            "draft": str(write_synthetic_gguf(draft, folder / "draft.gguf")),
            "swa": str(write_synthetic_gguf(swa, folder / "swa.gguf"))}


@pytest.fixture(scope="module")
def served(models, tmp_path_factory) -> tuple:
    """One real server with the DFlash draft, stopped before the tests: (plan, target log, draft log, raw log)."""
    with start_llama_server(["-m", models["target"], "-md", models["draft"], "--spec-type", "draft-dflash", *ARGS,
                             "-t", "1", "--no-warmup"], run_dir=tmp_path_factory.mktemp("run")) as server:
        return server.plan, server.measured(), server.measured_draft(), server.log_path.read_text(errors="replace")


def test_both_contexts_are_what_the_server_allocates(served) -> None:
    plan, target, draft, log = served
    assert plan is not None and plan.memory.draft is not None and draft is not None
    assert "adding speculative implementation 'draft-dflash'" in log and "n_extract=3" in log
    for memory, logged in ((plan.memory, target), (plan.memory.draft, draft)):
        rows = compare_memory(memory, logged)
        assert not [r for r in rows if r.matches is False], rows
    (cache,) = draft.caches
    assert (cache.layers, cache.cells) == (2, plan.memory.shape.n_ctx_seq) and draft.model_mib
    assert plan.memory.draft.shape.n_outputs_max == 2048 and "n_outputs_max         = 2048" in log
    assert plan.memory.shape.n_outputs_max == 8 and "n_outputs_max         = 8" in log
    # run-time growth (from the source): 3 extracted layers x 256 x n_batch 2048 floats, and the draft's
    # logits and pre-norm rows for one 4-token block per slot, less its logits at start
    assert plan.memory.host_extras.spec_output_bytes == 3 * 256 * 2048 * 4 + (1000 + 256) * 8 * 4 - 1000 * 2 * 4


@pytest.mark.parametrize("draft, why", [
    ("none", "needs -md with a DFlash draft GGUF"),
    ("target", "the -md draft is a llama model, not a DFlash one"),
    ("swa", "sliding window or DSpark stages"),
])
def test_what_kvbook_does_not_model_is_one_line(capsys, models, draft, why) -> None:
    extra = [] if draft == "none" else ["-md", models[draft]]
    code = cli.main(["plan", "--", "llama-server", "-m", models["target"], *extra, "--spec-type", "draft-dflash"])
    _, err = capsys.readouterr()
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1
