"""The comparison statistics against published values, the verdict on fixture records, and
`kvbook run`'s job planning (notebooks x params files) — all without starting a server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvbook.errors import BadInput
from kvbook.notebook.runner import plan_jobs
from kvbook.paths import repo_root
from kvbook.records import comparison as cmp
from kvbook.records.store import CheckRecord


def test_wilson_matches_published_intervals():
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605
    r = cmp.wilson(81, 263)
    assert (round(r.low, 4), round(r.high, 4)) == (0.2553, 0.3662)
    r = cmp.wilson(15, 148)
    assert (round(r.low, 4), round(r.high, 4)) == (0.0624, 0.1605)
    assert cmp.wilson(0, 10).low == 0.0 and 0.27 < cmp.wilson(0, 10).high < 0.28
    assert math.isnan(cmp.wilson(0, 0).value)


def test_newcombe_difference_matches_published_interval():
    # Newcombe (1998), table II example (a): 56/70 vs 48/80 -> +0.2, 95% CI 0.0524 to 0.3339
    d, low, high = cmp.rate_difference(cmp.wilson(48, 80), cmp.wilson(56, 70))
    assert (round(d, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)


def test_bootstrap_median_difference_is_deterministic_and_separates():
    a = [10.0, 11.0, 9.5, 10.5, 10.2, 9.8, 10.1, 10.4, 9.9, 10.3]
    far = [x + 5 for x in a]
    d, low, high = cmp.median_difference(a, far)
    assert d == pytest.approx(5.0) and low > 0 and (d, low, high) == cmp.median_difference(a, far)
    d, low, high = cmp.median_difference(a, list(reversed(a)))
    assert d == 0 and low <= 0 <= high


def _records(label: str, passes: list[bool], first_text_ms: list[float], run_id: str = "r1") -> list[CheckRecord]:
    out = []
    for i, (ok, ms) in enumerate(zip(passes, first_text_ms)):
        base = {"run_id": run_id, "label": label, "model_name": label.upper(), "repeat": i, "route": "direct",
                "required": True, "plan": {"total_bytes": 2**30, "kv_bytes": 2**20}, "plan_matches": True,
                "measured": {"caches_mib": [1.0]}}
        out.append({**base, "check": "forced_tool_call", "passed": ok, "timings": {}})
        out.append({**base, "check": "stream_text", "passed": True,
                    "timings": {"first_text_s": ms / 1000, "tokens_per_s": 100.0 + i % 3}})
    return [CheckRecord.from_json(r) for r in out]


def test_verdict_names_what_beats_the_noise():
    good = _records("a", [True] * 10, [50, 52, 48, 51, 49, 50, 53, 47, 50, 51])
    bad = _records("b", [False] * 9 + [True], [50, 51, 49, 52, 48, 50, 49, 51, 50, 52])
    diffs = cmp.differences(good + bad, "a", "b")
    by = {d.metric: d for d in diffs}
    assert by["tool-call pass rate"].beyond_noise and by["tool-call pass rate"].delta == pytest.approx(-90)
    assert not by["time to first text (median)"].beyond_noise
    text = cmp.verdict(diffs, samples={"a": 10, "b": 10})
    assert any("tool-call pass rate" in line and "larger than the noise; a is better" in line for line in text)
    assert any(line.startswith("Within the noise") and "time to first text" in line for line in text)
    assert text[-1] == "Verdict: a is better on 2 metric(s) beyond the noise and worse on none."


def test_verdict_with_no_difference_and_few_repetitions():
    same = _records("a", [True] * 3, [50, 51, 49]) + _records("b", [True] * 3, [50, 49, 51])
    text = cmp.verdict(cmp.differences(same, "a", "b"), samples={"a": 3, "b": 3})
    assert "Verdict: no difference between a and b is larger than the noise of these runs." in text
    assert any(line.startswith("Caution: only 3 repetition(s) for a") for line in text)


def test_summarize_reports_plan_and_noise():
    c = cmp.summarize(_records("a", [True, False], [40, 60], "r1") + _records("a", [True], [50], "r2"), "a")
    assert (c.runs, c.repeats, c.tool_calls.passed, c.tool_calls.total) == (2, 3, 2, 3)
    assert c.first_text_ms.median == 50 and c.plan_total_mib == 1024.0 and c.measured_kv_mib == 1.0
    assert c.repeat_cv_pct == 20.0  # per-repeat medians 40, 60, 50: sd 10 over mean 50
    with pytest.raises(BadInput, match="no smoke records for 'z'"):
        cmp.summarize([], "z")


def test_no_speed_samples_is_not_comparable_not_a_crash():
    a = [r for r in _records("a", [True], [50]) if r.check != "stream_text"]
    b = [r for r in _records("b", [True], [50]) if r.check != "stream_text"]
    text = cmp.verdict(cmp.differences(a + b, "a", "b"))
    assert any(line.startswith("Not comparable") and "tokens/s" in line for line in text)


RUNS = repo_root() / "params" / "runs"


def test_jobs_from_params_files_that_name_their_notebook():
    jobs = plan_jobs([], [str(RUNS / "smoke-default.yaml"), str(RUNS / "blog-post-m1max.yaml")])
    assert [(j.notebook.stem, j.params_file.name) for j in jobs] == [
        ("02-serve-and-smoke", "smoke-default.yaml"), ("01-sizing", "blog-post-m1max.yaml")]


def test_jobs_cross_notebooks_with_unnamed_params(tmp_path: Path):
    shared = tmp_path / "shared.yaml"
    shared.write_text("output_dir: auto\n")
    jobs = plan_jobs(["01-sizing", "02-serve-and-smoke"], [str(shared)])
    assert [j.name for j in jobs] == ["01-sizing with shared.yaml", "02-serve-and-smoke with shared.yaml"]
    assert [j.name for j in plan_jobs(["01-sizing"], [])] == ["01-sizing (defaults)"]


@pytest.mark.parametrize("notebooks, text, message", [
    ([], "repeats: 2\n", "names no notebook"),
    (["01-sizing"], "notebook: 02-serve-and-smoke\n", "is for notebook '02-serve-and-smoke'"),
    ([], "notebook: 02-serve-and-smoke\nrepeat: 2\n", "unknown parameter 'repeat'"),
    ([], "notebook: 99-nope\n", "notebook '99-nope' not found"),
    ([], "- a list\n", "must be a YAML mapping"),
])
def test_bad_job_lists_fail_before_anything_runs(tmp_path: Path, notebooks, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(BadInput, match=message):
        plan_jobs(notebooks, [str(path)])


def test_unreadable_params_files_are_one_line(tmp_path: Path):
    with pytest.raises(BadInput, match=r"missing.yaml: cannot read parameters \(No such file or directory\)"):
        plan_jobs([], [str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [a, b\n")
    with pytest.raises(BadInput, match=r"broken.yaml: not valid YAML \("):
        plan_jobs([], [str(broken)])


def test_a_comparison_with_a_failed_required_check_fails_the_gate(tmp_path: Path):
    from kvbook.notebook.runner import RunResult, gate_failure

    def result(failures: list[str]) -> RunResult:
        summary = {"kind": "compare", "verdict": "Verdict: no difference", "required_failures": failures}
        return RunResult(Path("03-compare.ipynb"), tmp_path, tmp_path / "x.ipynb", None, summary, True)

    assert gate_failure(result([])) is None
    problem = gate_failure(result(["compare/gemma3-270m direct/forced_tool_call: answered in plain text"]))
    assert problem and problem.startswith("1 required smoke check(s) failed, first: compare/gemma3-270m")
    assert gate_failure(result(["x"]), fail_on_check=False) is None
