"""Capacity against the real parts on loopback: the installed Claude Code's request shape, the pinned
llama-server's prompt cache (SmolLM2 and Gemma 3 270M), the SLO search, LiteLLM, and the notebook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook.capacity.cache import miss_cause
from kvbook.capacity.slo import Slo
from kvbook.capacity.workload import Workload, run_nonce
from kvbook.errors import BadInput
from kvbook.load.generator import ServerFacts, run_level
from kvbook.load.standin import StandIn
from kvbook.load.sweep import SweepConfig
from kvbook.notebook import capacity as cap
from kvbook.smoke.checks import Target

ROOT = Path(__file__).resolve().parents[1]
TOOLS_TEMPLATE = ["--jinja", "--chat-template-file", "params/templates/smollm2-chatml-tools.jinja"]


@pytest.fixture(scope="module")
def shapes():
    """(full, scaled with the attribution header, scaled without) from two real `claude -p` requests."""
    return cap.capture_shapes(0.02)


def test_generator_runs_every_turn_and_is_cheap(shapes) -> None:
    """Against a stand-in that answers instantly, every session and turn is recorded and a request costs the
    generator milliseconds (benchmarks/bench_loadgen.py prints the ratio against llama-server)."""
    full = shapes[0]
    with StandIn(tokens=8) as s:
        run = run_level(Target("standin", s.base_url, "x"), full, Workload(turns=3), 4, sessions=6,
                        facts=ServerFacts(4, 10**6), prefix_tokens=0, nonce=run_nonce())
        assert s.requests == 18
    assert len(run.turns) == 18 and run.sessions == 6 and all(t.streamed.ok for t in run.turns)
    assert all(t.streamed.output_tokens == 8 and len(t.streamed.gaps_s) == 7 for t in run.turns)
    assert sorted({t.turn for t in run.turns}) == [1, 2, 3]


def test_subagent_branches_run_before_their_parent_turn(shapes) -> None:
    full = shapes[0]
    with StandIn(tokens=4) as s:
        run = run_level(Target("standin", s.base_url, "x"), full, Workload(turns=3, subagent_every=2, subagent_turns=2),
                        1, sessions=1, facts=ServerFacts(1, 10**6), prefix_tokens=0, nonce=run_nonce())
    kinds = [(t.kind, t.turn) for t in run.turns]
    assert kinds == [("main", 1), ("main", 2), ("subagent", 1), ("subagent", 2), ("main", 3)]


def test_load_is_loopback_only_and_bounded(shapes) -> None:
    with pytest.raises(BadInput, match="loopback-only"):
        run_level(Target("x", "http://192.0.2.1:8080", "m"), shapes[0], Workload(), 1, sessions=1,
                  facts=ServerFacts(1, 4096), prefix_tokens=0, nonce="n")
    with pytest.raises(BadInput, match="concurrency must be 1..64"):
        run_level(Target("x", "http://127.0.0.1:9", "m"), shapes[0], Workload(), 65, sessions=1,
                  facts=ServerFacts(1, 4096), prefix_tokens=0, nonce="n")


def _causes(records) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in records:
        if r.cache is not None:
            out.setdefault(r.session.split("-")[0], []).append(miss_cause(r.cache))
    return out


def test_swa_model_rolls_back_to_a_checkpoint_for_a_new_session(tmp_path: Path, gemma3: Path, shapes) -> None:
    """Gemma 3 (sliding window 512): a second session sharing only the system prompt cannot reuse it from a
    slot that moved on; the server restores an early checkpoint and the log says so."""
    _, _, without = shapes
    with cap.serve(gemma3, ["-c", "8192", "-np", "1", "-t", "2", "--jinja", "-lv", "4"], tmp_path) as served:
        assert served.facts.swa_or_hybrid
        records = cap.cache_sessions(served, {"swa": without}, Workload(turns=3, turn_words=200), sessions=2,
                                     nonce=run_nonce())
    second = next(r for r in records if r.session.endswith("s1") and r.turn == 1)
    assert miss_cause(second.cache) == "swa_checkpoint" and second.cache.log_cause == "swa_checkpoint"
    for r in (r for r in records if r.turn > 1):  # continuing turns reuse all but the reply (no checkpoint after it)
        assert miss_cause(r.cache) in (None, "swa_checkpoint") and r.cache.cache_n >= 0.85 * r.cache.reusable_n, r.cache


def test_more_sessions_than_slots_evict_each_other(tmp_path: Path, smollm2: Path, shapes) -> None:
    """Two concurrent sessions on one slot with no host prompt cache: each turn finds the other's prompt."""
    _, _, without = shapes
    with cap.serve(smollm2, ["-c", "8192", "-np", "1", "-t", "2", "--cache-ram", "0", *TOOLS_TEMPLATE, "-lv", "4"],
                   tmp_path) as served:
        records = cap.cache_sessions(served, {"crowded": without}, Workload(turns=3), sessions=2, concurrency=2,
                                     nonce=run_nonce())
    later = [r for r in records if r.turn > 1]
    assert later and all(miss_cause(r.cache) == "slot_evicted" for r in later), _causes(records)
    assert any(r.cache.log_cause == "slot_evicted" for r in later)


def test_sweep_finds_the_slo_answer(tmp_path: Path, smollm2: Path, shapes) -> None:
    _, _, without = shapes
    with cap.serve(smollm2, ["-c", "8192", "-np", "2", "-t", "2", *TOOLS_TEMPLATE], tmp_path) as served:
        nonce = run_nonce()
        easy = cap.run_sweep(served, without, Workload(turns=2), SweepConfig(Slo(ttft_ms=60_000, itl_ms=None), 2, 2),
                             nonce, progress=False)
        strict = cap.run_sweep(served, without, Workload(turns=2), SweepConfig(Slo(ttft_ms=1, itl_ms=None), 8, 2),
                               nonce, progress=False)
    assert easy.search.max_concurrency_meeting_slo == 2 and easy.search.capped
    assert [lv.concurrency for lv in easy.search.levels] == [1, 2]
    assert all(lv.requests >= 4 and lv.failed == 0 for lv in easy.search.levels)
    assert strict.search.max_concurrency_meeting_slo == 0 and [lv.concurrency for lv in strict.search.levels] == [1]


def test_capacity_notebook_headless(tmp_path: Path) -> None:
    """The short capacity run `make demo` uses: report, and summary.json with the keys scripts read. It also is
    the real attribution-header contrast: Claude Code's default header makes every reusable turn miss (named),
    CLAUDE_CODE_ATTRIBUTION_HEADER=0 makes none miss."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kvbook.cli", "run", "-f", str(ROOT / "params/runs/capacity-demo.yaml"),
                           "--output-dir", str(out), "--quiet"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    point = summary["speed"]["points"][0]
    assert set(point) >= {"depth", "prefill_tps_measured", "prefill_tps_predicted", "decode_tps_measured",
                          "decode_tps_predicted"}
    g = summary["goodput"]
    assert set(g) >= {"slo", "levels", "max_concurrency_meeting_slo"} and g["levels"]
    assert set(g["levels"][0]) >= {"concurrency", "ttft_p95_ms", "itl_p95_ms", "e2e_p95_ms", "goodput_rps", "meets_slo"}
    assert g["max_concurrency_meeting_slo"] >= 1
    c = summary["cache"]
    assert set(c) >= {"turns", "hit_ratio_median", "misses_by_cause"} and c["turns"] > 0
    header, noheader = c["by_variant"]["header"], c["by_variant"]["noheader"]
    assert header["misses_by_cause"] == {"attribution_header": header["turns"] - 1}, header  # all but the first
    assert not noheader["misses_by_cause"] and noheader["hit_ratio_median"] > 0.8, noheader
    assert header["hit_ratio_median"] < 0.1, header
    rows = summary["memory"]["slot_options"]
    assert rows and all("predicted goodput (req/s)" in r and r["verdict"] for r in rows)
    assert summary["memory"]["recommendation"]["agents"] == g["max_concurrency_meeting_slo"]
    assert summary["scale_out"] and {r["servers"] for r in summary["scale_out"]} == {1, 2}
    assert all(r["failed"] == 0 and r["requests"] > 0 for r in summary["scale_out"]), summary["scale_out"]
    assert (out / "05-capacity.html").stat().st_size > 100_000
