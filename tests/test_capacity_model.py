"""The capacity math without a server: percentile intervals, the SLO search, session bodies, miss causes,
the log parser on this build's log lines, trends and the regression gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbook.capacity.cache import CAUSES, TurnCache, cache_summary, miss_cause
from kvbook.capacity.slo import LevelResult, RequestSample, Slo, search_max_concurrency, summarize_level
from kvbook.capacity.stats import percentile, quantile_ci
from kvbook.capacity.workload import (
    BILLING_PREFIX,
    AgentShape,
    Conversation,
    Workload,
    scale_shape,
    shape_from_capture,
    without_attribution,
)
from kvbook.errors import BadInput
from kvbook.load.serverlog import log_cause, match_tasks, parse_tasks
from kvbook.notebook.trends import regressions, trend_point


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([5], 0.95) == 5
    assert percentile([], 0.5) is None


def test_median_interval_is_the_textbook_order_statistics() -> None:
    # n = 20: the 95% distribution-free interval for the median is (x(6), x(15))
    q = quantile_ci(list(range(1, 21)), 0.5)
    assert (q.low, q.high) == (6, 15)
    # p99 of 20 samples has no upper bound yet; of 500 it has
    assert quantile_ci(list(range(20)), 0.99).high is None
    big = quantile_ci(list(range(500)), 0.99)
    assert big.low is not None and big.high is not None and big.low <= big.value <= big.high


def test_slo_rejects_nonsense() -> None:
    with pytest.raises(BadInput, match="attainment"):
        Slo(attainment=0)
    with pytest.raises(BadInput, match="at least one target"):
        Slo(ttft_ms=None, itl_ms=None, e2e_ms=None)
    with pytest.raises(BadInput, match="ttft_ms must be positive"):
        Slo(ttft_ms=-1)


def _level(c: int, capacity: int) -> LevelResult:
    """A fake level: requests are fast while c <= capacity, slow beyond."""
    ms = 100.0 if c <= capacity else 10_000.0
    return summarize_level(c, [RequestSample(ms, 10.0, ms, 8, True)] * 10, 10.0, Slo(ttft_ms=1000))


@pytest.mark.parametrize("capacity, maximum, expect, probed", [
    (5, 64, 5, [1, 2, 4, 8, 6, 5]),
    (1, 64, 1, [1, 2]),
    (0, 64, 0, [1]),
    (100, 8, 8, [1, 2, 4, 8]),
    (6, 6, 6, [1, 2, 4, 6]),
])
def test_search_doubles_then_bisects(capacity: int, maximum: int, expect: int, probed: list[int]) -> None:
    seen: list[int] = []

    def measure(c: int) -> LevelResult:
        seen.append(c)
        return _level(c, capacity)

    result = search_max_concurrency(measure, maximum)
    assert result.max_concurrency_meeting_slo == expect
    assert seen == probed  # each level measured once, in this order
    assert result.capped == (capacity >= maximum)


def test_a_failed_request_fails_the_level() -> None:
    ok = [RequestSample(10, 1, 20, 4, True)] * 19
    level = summarize_level(2, [*ok, RequestSample(None, None, 5, 0, False, "HTTP 500")], 4.0, Slo(attainment=0.9))
    assert level.attained == 0.95 and level.failed == 1 and not level.meets_slo
    assert level.goodput_rps == 19 / 4.0


CAPTURE = {
    "model": "claude-opus-4-8", "max_tokens": 64000, "stream": True, "thinking": {"type": "adaptive"},
    "system": [{"type": "text", "text": f"{BILLING_PREFIX}: cc_version=2.1.197.c27; cc_entrypoint=sdk-cli;"},
               {"type": "text", "text": "You are a Claude agent."},
               {"type": "text", "text": "word " * 400}],
    "tools": [{"name": f"T{i}", "description": "d", "input_schema": {"type": "object"}} for i in range(24)],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nctx\n</system-reminder>\n"},
                                              {"type": "text", "text": "Say hello."}]},
                 {"role": "system", "content": "Available agent types: general-purpose"}],
}


def test_shape_keeps_what_the_client_sent() -> None:
    shape = shape_from_capture(CAPTURE, "2.1.197")
    assert shape.attribution and len(shape.tools) == 24 and shape.reminder.startswith("<system-reminder>")
    assert dict(shape.fields) == {"thinking": {"type": "adaptive"}}
    assert not without_attribution(shape).attribution
    small = scale_shape(shape, 0.1)
    assert len(small.tools) == 3 and len(small.system[2]["text"]) < len(shape.system[2]["text"]) / 5
    with pytest.raises(BadInput, match="prompt scale"):
        scale_shape(shape, 0)
    with pytest.raises(BadInput, match="system prompt and messages"):
        shape_from_capture({"messages": []})


def _turns(shape: AgentShape, nonce: str, session: str, workload: Workload = Workload(turns=3)) -> list[dict]:
    conv = Conversation(shape, workload, model="local", nonce=nonce, session=session)
    bodies = []
    for i in range(workload.turns):
        conv.user_turn()
        bodies.append(conv.body())
        conv.reply(f"reply {i}")
    return bodies


def test_sessions_grow_share_the_run_prefix_and_differ_across_runs() -> None:
    shape = without_attribution(shape_from_capture(CAPTURE))
    a, b = _turns(shape, "run1", "s0"), _turns(shape, "run1", "s1")
    assert a[0]["system"] == b[0]["system"] and a[0]["tools"] == b[0]["tools"]  # shared within a run
    assert a[0]["messages"] != b[0]["messages"]  # unique content per session
    assert _turns(shape, "run2", "s0")[0]["system"] != a[0]["system"]  # no run reuses another run's cache
    assert a[1]["messages"][: len(a[0]["messages"])] == a[0]["messages"]  # the history only grows
    assert a[1]["messages"][len(a[0]["messages"])] == {"role": "assistant", "content": [{"type": "text", "text": "reply 0"}]}
    assert a[2]["system"] == a[0]["system"]  # appended reminders leave the prefix alone
    assert "<system-reminder>" in json.dumps(a[2]["messages"][-1])
    assert a[0]["max_tokens"] == 24 and a[0]["stream"] is True and a[0]["thinking"] == {"type": "adaptive"}


def test_billing_header_changes_every_request_and_reminder_position_moves_the_break() -> None:
    shape = shape_from_capture(CAPTURE)
    bodies = _turns(shape, "r", "s")
    billing = [b["system"][0]["text"] for b in bodies]
    assert all(t.startswith(BILLING_PREFIX) for t in billing) and len(set(billing)) == 3
    moved = _turns(without_attribution(shape), "r", "s", Workload(turns=3, reminder="system"))
    assert moved[1]["system"] != moved[2]["system"]  # a changing reminder before the history
    with pytest.raises(BadInput, match="reminder must be one of"):
        Workload(reminder="middle")


def _t(**kw) -> TurnCache:
    base = dict(session="s", turn=2, kind="main", prompt_n=1000, cache_n=0, reusable_n=900)
    return TurnCache(**{**base, **kw})


def test_miss_causes_in_order_of_evidence() -> None:
    assert miss_cause(_t(cache_n=899)) is None  # a hit
    assert miss_cause(_t(reusable_n=0)) is None  # nothing to reuse: not a miss
    assert miss_cause(_t(client_change="attribution_header", log_cause="slot_evicted")) == "attribution_header"
    assert miss_cause(_t(log_cause="swa_checkpoint", sessions_over_slots=True)) == "swa_checkpoint"
    assert miss_cause(_t(near_context_end=True, sessions_over_slots=True)) == "context_shift"
    assert miss_cause(_t(sessions_over_slots=True, swa_or_hybrid=True)) == "slot_evicted"
    assert miss_cause(_t(swa_or_hybrid=True)) == "swa_checkpoint"
    assert miss_cause(_t()) == "unknown"
    summary = cache_summary([_t(cache_n=899), _t(client_change="attribution_header"), _t()])
    assert summary["misses_by_cause"] == {"attribution_header": 1, "unknown": 1} and summary["turns"] == 3
    assert set(summary["fixes"]) == {"attribution_header", "unknown"} and set(CAUSES) >= set(summary["fixes"])


LOG = """\
0.08.913.874 I slot get_availabl: id  0 | task -1 | selected slot by LRU, t_last = -1
0.08.914.077 I slot launch_slot_: id  0 | task 26 | processing task, is_child = 0
0.08.945.524 I slot   operator(): id  0 | task 26 | new prompt, n_ctx_slot = 8192, n_keep = 0, task.n_tokens = 3317
0.08.945.543 I slot   operator(): id  0 | task 26 | cached n_tokens = 38, memory_seq_rm [38, end)
0.13.663.464 I slot   operator(): id  0 | task 26 | cached n_tokens = 2048, memory_seq_rm [2048, end)
0.20.000.000 I slot get_availabl: id  0 | task -1 | selected slot by LCP similarity, f_sim_best = 0.654 (> 0.100 thold), f_keep = 1.000
0.20.000.100 I slot   operator(): id  0 | task 40 | new prompt, n_ctx_slot = 8192, n_keep = 0, task.n_tokens = 500
0.20.000.200 I slot   operator(): id  0 | task 40 | restored context checkpoint (pos_min = 0, pos_max = 95, n_tokens = 96, n_past = 95, size = 1.408 MiB)
0.30.000.100 I slot   operator(): id  0 | task 55 | new prompt, n_ctx_slot = 8192, n_keep = 0, task.n_tokens = 3317
0.30.000.200 I slot   operator(): id  0 | task 55 | slot context shift, n_keep = 0, n_left = 8191, n_discard = 4095
"""


def test_log_parser_reads_this_builds_lines() -> None:
    tasks = parse_tasks(LOG)
    assert [(t.task, t.slot, t.n_tokens, t.cached, t.selected_by) for t in tasks] == [
        (26, 0, 3317, 38, "lru"), (40, 0, 500, None, "lcp"), (55, 0, 3317, None, None)]
    assert tasks[1].restored_checkpoint == 95 and tasks[2].context_shift and tasks[2].previous_task_on_slot == 40
    matched = match_tasks([3317, 500, 3317, 7], tasks)
    assert [m.task if m else None for m in matched] == [26, 40, 55, None]
    assert log_cause(tasks[1], set()) == "swa_checkpoint"
    assert log_cause(tasks[2], {26}) == "context_shift"
    assert log_cause(tasks[0], set()) is None


def _summary(label: str, tps: float) -> dict:
    return {"kind": "capacity", "label": label, "model": "m", "llama_build": "b1",
            "trend": {"goodput_rps": 1.0, "tokens_per_s": tps, "ttft_p50_ms": 100.0}}


def test_regression_gate_needs_history_and_respects_noise() -> None:
    history = [trend_point(_summary("cap", tps), f"r{i}", f"2026-11-0{i + 1}") for i, tps in enumerate([50, 52, 49, 51])]
    same, basis = regressions(history[:1], trend_point(_summary("cap", 10), "now", "2026-12-01"))
    assert same == [] and "2 needed" in basis
    found, _ = regressions(history, trend_point(_summary("cap", 47), "now", "2026-12-01"))
    assert found == []  # within the noise band
    found, _ = regressions(history, trend_point(_summary("cap", 30), "now", "2026-12-01"))
    assert [r.metric for r in found] == ["tokens_per_s"] and found[0].change < -0.1
    other, _ = regressions(history, trend_point(_summary("other", 30), "now", "2026-12-01"))
    assert other == []  # another label is not this run's history


def test_smoke_summaries_become_trend_points() -> None:
    s = {"kind": "smoke", "label": "demo", "model": "smollm2", "versions": {"llama_server": "b11434"},
         "required_passed": 3, "required_total": 4,
         "checks": [{"route": "direct", "check": "stream_text", "tok/s": 80.0, "first text ms": 30.0},
                    {"route": "litellm-openai", "check": "stream_text", "tok/s": 10.0, "first text ms": 90.0}]}
    p = trend_point(s, "run", "2026-12-01")
    assert p["pass_rate"] == 0.75 and p["tokens_per_s"] == 80.0 and p["ttft_ms"] == 30.0 and p["build"] == "b11434"
    assert trend_point({**s, "error": "failed"}, "run", "d") is None


def test_capacity_notebook_has_one_parameters_cell() -> None:
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "05-capacity.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def test_gate_reads_the_outputs_folder_and_index_charts_trends(tmp_path: Path) -> None:
    """Earlier runs' summaries in an outputs folder are the history; the index draws them."""
    from kvbook.notebook.index import build_index
    from kvbook.notebook.runner import RunResult, regression_failure

    for i, tps in enumerate([50, 52, 49]):
        run = tmp_path / f"2026110{i}-cap"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(_summary("cap", tps)))
    slow = RunResult(Path("nb"), tmp_path / "now", Path("x"), None, _summary("cap", 20), True)
    problem, basis = regression_failure(slow, tmp_path)
    assert problem and problem.startswith("regression: output tokens/s 20 is 60% worse") and "3 earlier run(s)" in basis
    fine = RunResult(Path("nb"), tmp_path / "now", Path("x"), None, _summary("cap", 51), True)
    assert regression_failure(fine, tmp_path)[0] is None
    page = build_index(tmp_path).read_text()
    assert "Trends per label and model" in page and "plotly" in page


def test_capacity_params_files_are_checked_before_anything_runs(tmp_path: Path) -> None:
    from kvbook.notebook.runner import plan_jobs

    runs = Path(__file__).resolve().parents[1] / "params" / "runs"
    jobs = plan_jobs([], [str(runs / "capacity-default.yaml"), str(runs / "capacity-demo.yaml")])
    assert [j.notebook.stem for j in jobs] == ["05-capacity", "05-capacity"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("notebook: 05-capacity\nmax_concurrency: many\n")
    with pytest.raises(BadInput, match="parameter 'max_concurrency' must be int"):
        plan_jobs([], [str(bad)])
    from kvbook.notebook.capacity import capacity_params

    with pytest.raises(BadInput, match="max_concurrency must be 1..64"):
        capacity_params(model="m", server_args=[], speed_depths=[0, 1], speed_fit_depths=[0, 1], prompt_scale=0.1,
                        turns=2, turn_words=10, max_tokens=8, reminder="append", subagent_every=0, slo_ttft_ms=1000,
                        slo_itl_ms=0, slo_e2e_ms=0, slo_attainment=0.9, max_concurrency=0, sessions_min=1,
                        level_budget_s=10, cache_sessions=1, slot_counts=[1], per_slot_ctx=0, scale_out=False,
                        scale_out_levels=[1])
