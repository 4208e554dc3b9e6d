"""`kvbook run` as a CI gate, exactly as docs/ci-example.yml calls it: exit 0 when the required
smoke checks pass, 1 when one fails (unless --no-fail-on-check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbook.runner import repo_root

pytestmark = pytest.mark.slow
SMALL = ["-c", "2048", "-np", "1", "--jinja"]


def _params(tmp_path: Path, name: str, extra_args: list[str]) -> Path:
    doc = yaml.safe_load((repo_root() / "params" / "runs" / name).read_text())
    doc["server_args"] = SMALL + extra_args  # same flags as the demo, at a small context
    doc["results_path"] = str(tmp_path / "results.jsonl")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _kvbook(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbook.cli", *args], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def test_gate_passes_with_structured_tool_calls(tmp_path):
    params = _params(tmp_path, "smoke-default.yaml",
                     ["--chat-template-file", "params/templates/smollm2-chatml-tools.jinja"])
    run = _kvbook("run", "02-serve-and-smoke", "-f", str(params), "--output-dir", str(tmp_path / "ok"), "--quiet")
    assert run.returncode == 0, run.stderr[-800:]
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["required_failures"] == []


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
