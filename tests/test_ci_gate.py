"""`kvbook run` as a CI gate: the very command of docs/ci-example.yml, exit 0 when the required
smoke checks pass, 1 when one fails (unless --no-fail-on-check), and several runs in one call where
a failing notebook is reported with its cell while the others still run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbook.paths import repo_root

pytestmark = pytest.mark.slow
SMALL = ["-c", "2048", "-np", "1", "--jinja"]


def _params(tmp_path: Path, name: str, extra_args: list[str]) -> Path:
    doc = yaml.safe_load((repo_root() / "params" / "runs" / name).read_text())
    doc["server_args"] = SMALL + extra_args  # same flags as the demo, at a small context
    doc["results_path"] = str(tmp_path / "results.jsonl")
    doc.update(routes=["direct"], max_tokens=32)  # the gate, not the routes, is under test: keep it short
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _kvbook(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbook.cli", *args], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env=env, cwd=repo_root())


def _ci_example_run_line() -> list[str]:
    """The `kvbook run` line of docs/ci-example.yml, as argv."""
    doc = yaml.safe_load((repo_root() / "docs" / "ci-example.yml").read_text())
    lines = [step["run"] for job in doc["jobs"].values() for step in job["steps"]
             if "kvbook run" in str(step.get("run", ""))]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[0] == ".venv/bin/kvbook" and argv[1] == "run"
    return argv[1:]


def test_the_ci_example_command_passes(tmp_path):
    """Exactly the documented line, outputs redirected to a temporary folder."""
    env = {**os.environ, "KVBOOK_OUTPUTS": str(tmp_path / "outputs")}
    run = _kvbook(*_ci_example_run_line(), "--quiet", env=env)
    assert run.returncode == 0, run.stderr[-800:]
    assert "2/2 ok" in run.stdout and (tmp_path / "outputs" / "index.html").exists()
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "outputs").glob("*/summary.json")]
    assert sorted(s["kind"] for s in summaries) == ["sizing", "smoke"]
    assert all(s["ok"] for s in summaries) and all((p.parent / s["report"]).exists()
                                                   for p, s in zip((tmp_path / "outputs").glob("*/summary.json"), summaries))
    # secrets: no per-run LiteLLM master key and no x-api-key value in anything the runs left behind
    # (executed notebooks, HTML, logs, LiteLLM config, results.jsonl); the backend's fixed dummy key is not a secret
    # the smoke notebook's own output (this is the headless 02-serve-and-smoke test too): the demo's flags, tool
    # template + prefill, every required check on three routes, plan matching the log, plotly report, records
    smoke_dir, smoke = next((p.parent, s) for p, s in zip((tmp_path / "outputs").glob("*/summary.json"), summaries)
                            if s["kind"] == "smoke")
    assert smoke["plan_matches"] is True
    assert smoke["required_total"] == 18 and smoke["required_passed"] == 18, smoke["required_failures"]
    assert {c["route"] for c in smoke["checks"]} == {"direct", "litellm-anthropic", "litellm-openai"}
    html = (smoke_dir / smoke["report"]).read_text()
    assert "plotly" in html and "Plotly.newPlot" in html
    from kvbook.records.store import read_records

    records, bad = read_records(tmp_path / "outputs" / "results.jsonl")
    assert not bad and len([r for r in records if r["run_id"] == smoke["run_id"]]) == 21
    assert {"run_id", "model_sha256", "llama_server_argv", "versions", "check", "route", "passed", "reason",
            "timings", "plan", "measured"} <= set(records[0])
    key = re.compile(r"sk-kvbook-(?!local-backend)[A-Za-z0-9_-]{20,}")
    header = re.compile(r"x-api-key[\"']?\s*[:=]\s*[\"']?(?!local-backend)[A-Za-z0-9_-]{8,}", re.I)
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name.startswith("litellm") for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        assert not key.search(text) and not header.search(text), f"a key leaked into {path}"


def test_a_failed_notebook_is_reported_and_the_others_still_run(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"notebook: 02-serve-and-smoke\nmodel: {tmp_path / 'not-a-model.gguf'}\n")
    env = {**os.environ, "KVBOOK_OUTPUTS": str(tmp_path / "outputs")}
    sizing = repo_root() / "params" / "runs" / "sizing-default.yaml"
    run = _kvbook("run", "-f", str(broken), "-f", str(sizing), "--quiet", env=env)
    assert run.returncode == 1
    assert "1/2 ok" in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("kvbook: error:")]
    assert len(errors) == 1 and "02-serve-and-smoke with broken.yaml" in errors[0] and "failed in cell" in errors[0]
    assert "neither a bundled model" in errors[0]
    kinds = {json.loads(p.read_text()).get("kind", "failed") for p in (tmp_path / "outputs").glob("*/summary.json")}
    assert kinds == {"sizing", "failed"}  # the sizing run completed after the failure; both left their folder


def test_gate_fails_on_a_required_check_and_can_be_switched_off(tmp_path):
    params = _params(tmp_path, "smoke-contrast.yaml", [])
    run = _kvbook("run", "02-serve-and-smoke", "-f", str(params), "--output-dir", str(tmp_path / "bad"), "--quiet")
    assert run.returncode == 1
    assert "required smoke check(s) failed" in run.stderr and "forced_tool_call" in run.stderr
    assert (tmp_path / "bad" / "02-serve-and-smoke.html").exists()  # the report is kept
    run2 = _kvbook("run", "02-serve-and-smoke", "-f", str(params), "--output-dir", str(tmp_path / "bad2"), "--quiet",
                   "--no-fail-on-check")
    assert run2.returncode == 0, run2.stderr[-800:]


def test_gate_fails_when_a_parameter_is_unknown(tmp_path):
    params = tmp_path / "typo.yaml"
    params.write_text("modle: smollm2-135m\n")
    run = _kvbook("run", "02-serve-and-smoke", "-f", str(params), "--output-dir", str(tmp_path / "typo"))
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "unknown parameter 'modle'" in run.stderr
    assert not (tmp_path / "typo").exists()
