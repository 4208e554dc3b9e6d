"""`--spec-type draft-eagle3` with `-md` an EAGLE3 draft: the draft context (weights, one-layer KV cache, logits,
compute), and the run-time growth of the output buffers, as memory/speculative.py models them. Checked against the
real pinned llama-server (one start): SmolLM2 as the target and a synthetic eagle3 draft of its width with its
tokenizer; every exact figure the server logs at -lv 4 for both contexts equals the plan, and one request grows
the server's anonymous RSS by at least the 3 extracted layers' rows. The refusals are pure checks."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.interface import MiB
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.testing.synthetic import donor_tokenizer, tiny_metadata, write_synthetic_gguf

ARGS = ["-c", "8192", "-np", "1", "-b", "8192", "-nr"]  # -nr: no CPU_REPACK, the mapped weights are all of them
FEATURES = 3 * 576 * 8192 * 4  # 3 extracted layers x SmolLM2's n_embd x n_batch floats (the target's output buffer)


@pytest.fixture(scope="module")
def draft(smollm2, tmp_path_factory) -> str:
    """An EAGLE3 draft for SmolLM2 (n_embd 576, 49152 tokens) reading its layers 2, 15 and 27."""
    md = tiny_metadata("eagle3", block_count=1, target_layers=[2, 15, 27], target_hidden_size=576,
                       embedding_length=576, vocab_size=49152, context_length=8192, feed_forward_length=1536,
                       **{"attention.head_count": 9, "attention.head_count_kv": 3, "attention.key_length": 64,
                          "attention.value_length": 64})
    path = tmp_path_factory.mktemp("eagle3") / "eagle3.gguf"
    return str(write_synthetic_gguf(md, path, tokenizer=donor_tokenizer(smollm2)))


def _anon_rss(pid: int) -> int:
    kib = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert kib, "no RssAnon in /proc (Linux only)"
    return int(kib.group(1)) * 1024


@pytest.fixture(scope="module")
def served(smollm2, draft, tmp_path_factory) -> tuple:
    """One real server with the EAGLE3 draft, stopped before the tests: (plan, target log, draft log, raw log at
    start, then the anonymous RSS growth over one 8-token request and the raw log after it)."""
    with start_llama_server(["-m", str(smollm2), "-md", draft, "--spec-type", "draft-eagle3", *ARGS, "-t", "1",
                             "--no-warmup", "--cache-ram", "0"], run_dir=tmp_path_factory.mktemp("run")) as server:
        logged = (server.plan, server.measured(), server.measured_draft(), server.log_path.read_text(errors="replace"))
        before = _anon_rss(server.process.pid)
        body = json.dumps({"prompt": list(range(100, 108)), "n_predict": 2}).encode()
        req = urllib.request.Request(f"{server.base_url}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
        growth = _anon_rss(server.process.pid) - before
        return (*logged, growth, server.log_path.read_text(errors="replace"))


def test_both_contexts_are_what_the_server_allocates(served) -> None:
    plan, target, logged_draft, log, *_ = served
    assert plan is not None and plan.memory.draft is not None and logged_draft is not None
    assert "adding speculative implementation 'draft-eagle3'" in log and "EAGLE3 extract_layers = [2, 15, 27]" in log
    for memory, logged in ((plan.memory, target), (plan.memory.draft, logged_draft)):
        rows = compare_memory(memory, logged)
        assert not [r for r in rows if r.matches is False], rows
    # the draft: one full-attention layer of n_ctx_seq cells, f16 by default, and its own weights
    (cache,) = logged_draft.caches
    assert (cache.layers, cache.cells, cache.k_type) == (1, plan.memory.shape.n_ctx_seq, "f16")
    assert logged_draft.model_mib
    # an encoder context: n_outputs_max is n_batch (llama_model_has_encoder), so the graph reserves ubatch logits
    assert plan.memory.draft.shape.n_outputs_max == 8192 and "n_outputs_max         = 8192" in log
    # the draft's compute buffer, reserved again with the backend sampler over its 512 logits rows (98.25 ->
    # 194.44 MiB logged): the estimate adds one more n_vocab x 512 floats (measured: within +6.3%)
    planned = plan.memory.draft.compute.bytes / MiB
    assert abs(planned - logged_draft.compute_bytes / MiB) <= 0.1 * logged_draft.compute_bytes / MiB, planned
    # the target drafts 1 + 3 tokens per slot
    assert plan.memory.shape.n_outputs_max == 4 and "n_outputs_max         = 4" in log


def test_the_output_rows_grow_at_decode_time(served) -> None:
    """The release build does not log output_reserve, so the figure is the source's (eagle3_output_bytes); the
    server's anonymous RSS over one short request brackets it: at least the extracted rows (without them it grew
    ~12 MiB here), at most those plus 24 MiB (compute buffers first touched, samplers: measured 11.6 MiB)."""
    plan, target, *_, growth, log_after = served
    encoder = (49152 + 576) * 512 * 4 - 49152 * 1 * 4  # the draft's logits and pre-norm rows for a ubatch, less start
    assert plan.memory.host_extras.spec_output_bytes == FEATURES + encoder
    assert FEATURES <= growth <= FEATURES + 24 * MiB, growth / MiB
    # the target's graph, reserved again at the first decode with the 3 layers' inputs as outputs (logged
    # 22.64 -> 24.89 MiB here): the plan's estimate (with its +3.38 MiB term) stays within 10% of the later figure
    later = [float(m) for m in re.findall(r"CPU compute buffer size = +([0-9.]+) MiB", log_after)][-1]
    assert later > target.compute_bytes / MiB
    assert abs(plan.memory.compute.bytes / MiB - later) <= 0.1 * later, (plan.memory.compute.bytes / MiB, later)


def test_the_plan_counts_the_draft_and_the_growth(capsys, smollm2, draft) -> None:
    base = ["plan", "--json", "--", "llama-server", "-m", str(smollm2), *ARGS]
    assert cli.main([*base, "-md", draft]) == 0
    simple = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "-md", draft, "--spec-type", "draft-eagle3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["draft"]["weights_bytes"] == simple["draft"]["weights_bytes"] > 0
    assert any(f["flag"] == "--spec-type draft-eagle3" for f in doc["flags_read"])
    assert cli.main(["plan", "--", "llama-server", "-m", str(smollm2), "-md", draft, *ARGS,
                     "--spec-type", "draft-eagle3"]) == 0
    assert "speculative output rows" in capsys.readouterr().out
    assert cli.main([*base, "-md", draft, "--spec-type", "draft-eagle3", "--no-spec-draft-backend-sampling"]) == 0
    cpu_sampling = json.loads(capsys.readouterr().out)
    assert doc["draft"]["compute_bytes"] - cpu_sampling["draft"]["compute_bytes"] == 4 * 49152 * 512


@pytest.mark.parametrize("with_md, why", [
    (False, "needs -md with an EAGLE3 draft GGUF"),
    (True, "the -md draft is a llama model, not an EAGLE3 one"),
])
def test_eagle3_without_an_eagle3_draft_is_one_line(capsys, smollm2, with_md, why) -> None:
    extra = ["-md", str(smollm2)] if with_md else []
    code = cli.main(["plan", "--", "llama-server", "-m", str(smollm2), *extra, "--spec-type", "draft-eagle3"])
    _, err = capsys.readouterr()
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1
