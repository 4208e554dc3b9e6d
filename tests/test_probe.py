"""The Claude Code routing probe, run against the REAL claude binary (the pinned npm install).

A missing binary fails every test here with the set-up step to run; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kvbook.claude.agents import load_agents
from kvbook.claude.client import claude_env, run_claude
from kvbook.claude.endpoint import RecordingEndpoint
from kvbook.claude.probe import ProbeReport, ProbeRow, probe_claude_code
from kvbook.claude.routes import configured_slots, plan_routes
from kvbook.errors import BadInput, KvbookError, ServerError

OPUS_AGENT = """---
name: opus-reviewer
description: Reviews a change. Use it when asked to review.
model: opus
---
You review code changes and answer briefly.
"""
PLAIN_AGENT = """---
name: plain-helper
description: Helps with small questions.
---
You answer briefly.
"""


def _claude_path() -> Path:
    from kvbook.ops.components import CLAUDE_CODE_VERSION, ComponentMissing, find_claude

    try:
        return find_claude()
    except ComponentMissing as exc:
        pytest.fail(f"the real Claude Code binary is missing, so the probe cannot be tested: {exc}. The set-up step "
                    f"`make setup` (npm install --prefix ~/.cache/kvbook/npm @anthropic-ai/claude-code@"
                    f"{CLAUDE_CODE_VERSION} from the npm registry) did not run or failed", pytrace=False)


@pytest.fixture(scope="module")
def claude() -> Path:
    return _claude_path()


def _pids_running(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (read from /proc; no broad pkill anywhere)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if needle in cmd and "zombie" not in state:
            found.append(int(entry.name))
    return found


def _ours(pid: int) -> bool:
    """A claude that kvbook or these tests started: its HOME is a throwaway folder (kvbook-claude-*, or a pytest
    tmp_path), never the user's, so a Claude Code session the user runs meanwhile is not counted."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    home = next((e[5:].decode(errors="replace") for e in env if e.startswith(b"HOME=")), "")
    return "kvbook-claude-" in home or "pytest-" in home


@pytest.fixture
def no_claude_left(claude: Path):
    before = set(_pids_running(str(claude.resolve().parent.parent)))
    yield
    left = {p for p in set(_pids_running(str(claude.resolve().parent.parent))) - before if _ours(p)}
    assert not left, f"claude processes left running: {sorted(left)}"


@pytest.fixture(scope="module")
def agents_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("agents")
    (d / "opus-reviewer.md").write_text(OPUS_AGENT)
    (d / "plain-helper.md").write_text(PLAIN_AGENT)
    return d


@pytest.fixture(scope="module")
def report(claude: Path, agents_dir: Path) -> ProbeReport:
    return probe_claude_code(agents_dir, claude, timeout_s=120, aliases=("opus", "sonnet", "haiku"), opusplan=False)


def _row(report: ProbeReport, how_prefix: str) -> ProbeRow:
    rows = [r for r in report.rows if r.how.startswith(how_prefix)]
    assert rows, f"no probe row starting {how_prefix!r}: {[r.how for r in report.rows]}"
    return rows[0]


# ---------------------------------------------------------------- the probe, real client

def test_probe_reports_an_id_per_alias(report: ProbeReport, claude: Path, no_claude_left: None) -> None:
    from kvbook.ops.components import CLAUDE_CODE_VERSION

    assert report.client_version == CLAUDE_CODE_VERSION
    for alias in ("opus", "sonnet", "haiku"):
        row = _row(report, f"--model {alias}")
        assert row.returncode == 0, row.note
        assert row.model_id and row.model_id.startswith(f"claude-{alias}"), row
        assert "max_tokens" in row.body_keys and "messages" in row.body_keys
    assert json.loads(json.dumps(report.to_dict()))["rows"][0]["model_id"]


def test_probe_reports_agents_and_subagents(report: ProbeReport) -> None:
    opus_id = _row(report, "--model opus").model_id
    assert _row(report, "--agent opus-reviewer").model_id == opus_id
    sub = _row(report, "subagent opus-reviewer")
    assert sub.model_id == opus_id, sub
    inherit = _row(report, "subagent plain-helper")
    assert inherit.model_id, inherit  # inherits the session's model, whatever this version picks


def test_generated_config_covers_exactly_the_sent_ids(report: ProbeReport, tmp_path: Path) -> None:
    opus_id = _row(report, "--model opus").model_id
    plan = plan_routes({"opus": "smollm2-135m"}, report, "http://127.0.0.1:9", configured=("claude-opus-4-7", opus_id))
    assert [r.model_name for r in plan.routes] == [opus_id]
    assert plan.routes[0].litellm_entry()["litellm_params"]["model"] == "anthropic/smollm2-135m"
    stale = [w for w in plan.warnings if "claude-opus-4-7" in w]
    assert stale and opus_id in stale[0], plan.warnings
    assert not [w for w in plan.warnings if f"slot {opus_id} " in w]
    from kvbook.ops.litellm import write_config

    cfg = write_config(plan.routes, tmp_path / "cfg.yaml")
    assert configured_slots(cfg) == (opus_id,)


def test_plan_routes_bad_intent(report: ProbeReport) -> None:
    with pytest.raises(BadInput, match="did not try"):
        plan_routes({"gpt-5": "local"}, report, "http://127.0.0.1:9")
    with pytest.raises(BadInput, match="empty"):
        plan_routes({}, report, "http://127.0.0.1:9")


# ---------------------------------------------------------------- bad input, each one clear line

def _script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, repr(text)
    return text


def test_agents_dir_missing(claude: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput) as info:
        probe_claude_code(tmp_path / "nope", claude)
    assert "does not exist" in _one_line(info.value)


def test_agent_file_without_frontmatter(claude: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.md").write_text("You are an agent with no frontmatter.\n")
    with pytest.raises(BadInput) as info:
        probe_claude_code(tmp_path, claude)
    assert "no YAML frontmatter" in _one_line(info.value) and "bad.md" in str(info.value)
    (tmp_path / "bad.md").write_text("---\nname: x\n---\nno description\n")
    with pytest.raises(BadInput, match="description"):
        load_agents(tmp_path)


@pytest.mark.parametrize("kind", ["echo", "script"])
def test_not_claude_code(kind: str, tmp_path: Path) -> None:
    fake = Path("/bin/echo") if kind == "echo" else _script(tmp_path, "claude", "echo 'usage: something else'\nexit 3\n")
    with pytest.raises(BadInput) as info:
        probe_claude_code(None, fake, timeout_s=20)
    assert "is not Claude Code" in _one_line(info.value)


def test_version_alike_that_never_calls(tmp_path: Path) -> None:
    fake = _script(tmp_path, "claude", 'echo "9.9.9 (Claude Code)"\n')
    with pytest.raises(BadInput) as info:
        probe_claude_code(None, fake, timeout_s=20)
    assert "sent no request" in _one_line(info.value)


def test_hanging_client_is_killed(tmp_path: Path) -> None:
    fake = _script(tmp_path, "claude", 'case "$1" in --version) echo "9.9.9 (Claude Code)";; *) sleep 300 & wait;; esac\n')
    with pytest.raises(ServerError) as info:
        probe_claude_code(None, fake, timeout_s=3)
    assert "did not finish within 3 s and was killed" in _one_line(info.value)
    assert not _pids_running(str(tmp_path)), "the hanging client or its child survived"
    assert not [p for p in _pids_running("sleep 300")], "the client's child survived"


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvbook.cli import main

    assert main(["probe", "claude-code", "--agents", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvbook: error:") and "\n" not in err


def test_endpoint_records_without_secrets() -> None:
    import requests

    with RecordingEndpoint(main_marker="m1") as ep:
        resp = requests.post(ep.base_url + "/v1/messages", timeout=10, headers={"x-api-key": "sk-secret"},
                             json={"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "m1"}]})
        count = requests.post(ep.base_url + "/v1/messages/count_tokens", timeout=10, json={"model": "claude-x"})
    assert resp.status_code == 200 and resp.json()["content"][0]["type"] == "text"
    assert count.json()["input_tokens"] >= 1
    first = ep.requests[0]
    assert first.model == "claude-x" and first.role == "main" and "x-api-key" not in first.headers
    assert "sk-secret" not in json.dumps(first.summary())


# ---------------------------------------------------------------- end to end, real servers

@pytest.mark.slow
def test_opus_agent_reaches_local_model_through_generated_config(report: ProbeReport, claude: Path, agents_dir: Path,
                                                                 smollm2: Path, tmp_path: Path, no_claude_left: None) -> None:
    """The real `claude -p` with an opus agent completes a turn through kvbook's LiteLLM config to llama-server.

    Completed means exit 0, a result and stop_reason end_turn: the model stopped by itself. The flags that
    make that happen with the 135M SmolLM2 (`--tools ""`, llama-server `--temp 0`, a one-word question) are
    kvbook.claude.e2e's, and why is written there.
    """
    from kvbook.claude.e2e import TURN_FLAGS
    from kvbook.ops.litellm import start_proxy
    from kvbook.ops.llama_server import start_llama_server

    with start_llama_server(["llama-server", "-m", str(smollm2), "-c", "8192", "-np", "1", "--jinja", "--temp", "0",
                             "-t", "1"], run_dir=tmp_path, force=True) as server:
        plan = plan_routes({"opus": "smollm2-135m"}, report, server.base_url)
        with start_proxy(plan.routes, run_dir=tmp_path) as proxy:
            home = tmp_path / "home"
            (home / ".claude" / "agents").mkdir(parents=True)
            (home / ".claude" / "agents" / "opus-reviewer.md").write_text(OPUS_AGENT)
            env = claude_env(home, proxy.base_url, {"ANTHROPIC_API_KEY": proxy.master_key,
                                                    "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "256"})
            before = server.log_path.stat().st_size
            run = run_claude(claude, ["-p", "What is the capital of France? Answer in one word.", "--agent",
                                      "opus-reviewer", "--output-format", "json", "--max-turns", "1", *TURN_FLAGS],
                             env=env, cwd=home, timeout_s=240)
            logged = server.log_path.read_bytes()[before:].decode(errors="replace")
    assert "new prompt" in logged, "the turn never reached llama-server"
    assert run.returncode == 0, (run.stdout + run.stderr)[-600:]
    doc = json.loads(run.stdout)
    assert doc["is_error"] is False and doc["stop_reason"] == "end_turn" and doc["result"].strip(), doc


@pytest.mark.slow
def test_claude_p_completes_and_records_cache_figures(report: ProbeReport, claude: Path, tmp_path: Path,
                                                       no_claude_left: None) -> None:
    """Notebook 05's e2e step for real: every turn completes, and the before/after of
    CLAUDE_CODE_ATTRIBUTION_HEADER=0 on prefix-cache reuse lands in results.jsonl."""
    from kvbook.claude.e2e import DEFAULT_SERVER_ARGS, FIELDS, run_e2e
    from kvbook.records.store import read_records

    results = tmp_path / "results.jsonl"
    # Two threads: alone on this 2-core machine the test takes 47 s with -t 2 and 71 s with -t 1 (the 3k-token
    # prompts dominate); the proxy and claude wait while the server computes.
    e2e = run_e2e(run_dir=tmp_path, results_path=results, claude=claude, probe=report,
                  server_args=(*DEFAULT_SERVER_ARGS, "-t", "2"), timeout_s=180)
    records, bad = read_records(results)
    assert not bad
    turns = [r for r in records if r["check"] == "claude_code_turn"]
    assert len(turns) == 6 and all(r["passed"] and r["details"]["stop_reason"] == "end_turn" for r in turns), \
        [(r["details"]["label"], r["reason"]) for r in turns]
    assert e2e.ok and all(t.text.strip() for t in e2e.turns)
    assert {r["details"]["field"] for r in records if r["check"] == "claude_code_field"} == set(FIELDS)
    effect = [r for r in records if r["check"] == "claude_code_attribution_header_effect"]
    assert len(effect) == 1, [r["check"] for r in records]
    across, within = effect[0]["details"]["across_sessions"], effect[0]["details"]["within_session"]
    assert effect[0]["details"]["billing"]["changes_between_prompts"], effect[0]["details"]["billing"]
    assert across["header_off"]["share"] > 0.9 > 0.1 > across["header_on"]["share"], across
    assert within["header_on"]["share"] > 0.9 and within["header_off"]["share"] > 0.9, within
    assert across["header_off"]["cache_read_input_tokens"] == across["header_off"]["cached_tokens"], across
    assert effect[0]["passed"] and effect[0]["claude_flags"] == ["--tools", ""]


def test_e2e_bad_prompts_one_line(tmp_path: Path) -> None:
    from kvbook.claude.e2e import run_e2e

    with pytest.raises(BadInput) as info:
        run_e2e(run_dir=tmp_path, prompts=("What is 2+2?", ""))  # type: ignore[arg-type]
    assert "three non-empty texts" in _one_line(info.value)


def test_run_claude_timeout_reports_one_line(tmp_path: Path) -> None:
    fake = _script(tmp_path, "slow", "sleep 300\n")
    with pytest.raises(KvbookError) as info:
        run_claude(fake, [], env=dict(os.environ), cwd=tmp_path, timeout_s=1)
    _one_line(info.value)
    assert not _pids_running(str(tmp_path))


@pytest.mark.slow
def test_claude_code_notebook_headless(tmp_path: Path, no_claude_left: None) -> None:
    """Notebook 05 runs with papermill: probe table, generated routes and the stale-slot warning."""
    from kvbook.notebook.runner import resolve_notebook, run_notebook

    result = run_notebook(resolve_notebook("04-claude-code"),
                          {"run_e2e": False, "results_path": str(tmp_path / "results.jsonl")},
                          tmp_path / "run", progress=False)
    assert result.ok, result.error
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "claude-opus-4-7" in " ".join(summary["warnings"])
    assert summary["routes"] and all(r.startswith("claude-") for r in summary["routes"])
    assert result.html and "model ID sent" in result.html.read_text()
