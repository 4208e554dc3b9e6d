"""Which model ID does the installed Claude Code really send? Ask it, don't guess.

A scripted Anthropic-compatible endpoint (`RecordingEndpoint`, loopback, free port) records every
request and answers with a short text; told to, it answers the first main-session turn with a
`tool_use` of the `Agent` tool so the client starts a subagent, whose own request then carries
the subagent's resolved model ID. `probe_claude_code()` runs the real `claude -p` once per
`--model` alias, once per agent file with `--agent NAME` and once per agent as a subagent, each
in a throwaway HOME, its own process group and under a timeout. kvbook.claude.routes turns that
report into LiteLLM routes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvbook.claude.agents import AgentFile, load_agents
from kvbook.claude.client import STRIP_ENV, claude_env, claude_version, run_claude
from kvbook.claude.endpoint import RecordedRequest, RecordingEndpoint
from kvbook.errors import BadInput

__all__ = ["ALIASES", "ProbeReport", "ProbeRow", "format_table", "probe_claude_code"]

# `--model` values probed; opusplan is probed twice (normal mode, then plan mode).
ALIASES = ("opus", "sonnet", "haiku", "default")


# ---------------------------------------------------------------- recording endpoint


# ---------------------------------------------------------------- running claude


# ---------------------------------------------------------------- agent files


# ---------------------------------------------------------------- the probe

@dataclass(frozen=True)
class ProbeRow:
    """How the model was chosen -> the model ID that reached the server."""

    how: str  # e.g. "--model opus", "--agent reviewer", "subagent reviewer"
    kind: str  # "alias", "agent", "subagent"
    requested: str  # the alias or frontmatter model asked for ("inherit" when none)
    model_id: str | None  # None: no request of that conversation arrived
    other_ids: tuple[str, ...]  # IDs of the run's other requests (side calls), if any
    requests: int
    returncode: int
    note: str = ""
    body_keys: tuple[str, ...] = ()  # top-level keys of that conversation's first request
    max_tokens: int | None = None


@dataclass(frozen=True)
class ProbeReport:
    """Everything one probe saw; round-trips through to_dict()/JSON."""

    client_version: str
    claude_path: str
    rows: tuple[ProbeRow, ...]
    stripped_env: tuple[str, ...]  # names of inherited variables removed before running claude
    seconds: float

    def ids_for(self, requested: str) -> tuple[str, ...]:
        """Every model ID sent when `requested` (an alias or a frontmatter model) was asked for."""
        return tuple(dict.fromkeys(r.model_id for r in self.rows if r.requested == requested and r.model_id))

    def to_dict(self) -> dict[str, Any]:
        return {"client_version": self.client_version, "claude_path": self.claude_path,
                "rows": [asdict(r) for r in self.rows], "stripped_env": list(self.stripped_env),
                "seconds": round(self.seconds, 2)}


def _one(claude: Path, args: list[str], *, how: str, kind: str, requested: str, timeout_s: float,
         agents: Sequence[AgentFile] = (), spawn: str | None = None) -> tuple[ProbeRow, list[RecordedRequest]]:
    marker = "kvbook-probe-" + secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="kvbook-claude-") as tmp, \
            RecordingEndpoint(main_marker=marker, spawn_agent=spawn) as ep:
        home = Path(tmp) / "home"
        work = Path(tmp) / "work"
        work.mkdir()
        if agents:
            dest = home / ".claude" / "agents"
            dest.mkdir(parents=True)
            for a in agents:
                shutil.copyfile(a.path, dest / a.path.name)
        prompt = f"Reply with the single word ok. {marker}"
        if spawn:
            prompt = f"Use the {spawn} agent to say ok. {marker}"
        argv = ["-p", prompt, *args, "--allowedTools", "Agent", "--max-turns", "4"]
        run = run_claude(claude, argv, env=claude_env(home, ep.base_url), cwd=work, timeout_s=timeout_s)
        reqs = list(ep.requests)
    role = "subagent" if kind == "subagent" else "main"
    conv = [r for r in reqs if r.role == role and r.path.startswith("/v1/messages") and r.model]
    mine = [str(r.model) for r in conv]
    others = tuple(dict.fromkeys(str(r.model) for r in reqs if r.role == "other" and r.model))
    note = ""
    if run.returncode != 0:
        note = f"claude exited {run.returncode}: {(run.stderr.strip() or run.stdout.strip())[:160]}"
    elif not mine:
        note = "no request of this conversation arrived"
        if kind == "subagent" and not any(r.answered == "tool_use" for r in reqs):
            note = "the main session offered no Agent tool, so no subagent was started"
    row = ProbeRow(how=how, kind=kind, requested=requested, model_id=mine[0] if mine else None, other_ids=others,
                   requests=len(reqs), returncode=run.returncode, note=note,
                   body_keys=conv[0].body_keys if conv else (), max_tokens=conv[0].body.get("max_tokens") if conv else None)
    return row, reqs


def probe_claude_code(agents_dir: Path | None = None, claude: Path | None = None, timeout_s: float = 90.0,
                      aliases: Sequence[str] = ALIASES, opusplan: bool = True) -> ProbeReport:
    """Run the installed claude once per alias, per `--agent` and per subagent; record the IDs it sends."""
    from kvbook.ops.components import find_claude

    if timeout_s <= 0:
        raise BadInput(f"timeout must be positive seconds, got {timeout_s}")
    agents = load_agents(agents_dir) if agents_dir is not None else ()
    claude = claude or find_claude()
    if not (claude.is_file() and os.access(claude, os.X_OK)):
        raise BadInput(f"{claude} is not an executable file; point it at Claude Code or run `make setup`")
    start = time.monotonic()
    version = claude_version(claude, min(timeout_s, 30.0))
    stripped = tuple(sorted(k for k in os.environ if STRIP_ENV.match(k)))
    rows: list[ProbeRow] = []
    plan: list[tuple[list[str], str, str, str, str | None]] = [
        (["--model", a], f"--model {a}", "alias", a, None) for a in aliases]
    plan.append(([], "(no --model)", "alias", "(none)", None))
    if opusplan:
        plan.append((["--model", "opusplan"], "--model opusplan", "alias", "opusplan", None))
        plan.append((["--model", "opusplan", "--permission-mode", "plan"], "--model opusplan --permission-mode plan",
                     "alias", "opusplan (plan mode)", None))
    for a in agents:
        plan.append((["--agent", a.name], f"--agent {a.name} (model: {a.model or 'inherit'})", "agent",
                     a.model or "inherit", None))
        plan.append(([], f"subagent {a.name} (model: {a.model or 'inherit'})", "subagent", a.model or "inherit", a.name))
    for i, (args, how, kind, requested, spawn) in enumerate(plan):
        row, reqs = _one(claude, args, how=how, kind=kind, requested=requested, timeout_s=timeout_s,
                         agents=agents, spawn=spawn)
        if i == 0 and not reqs:
            raise BadInput(f"{claude} ran but sent no request to the local endpoint ({row.note or 'exit 0'}); "
                           f"is it really Claude Code?")
        rows.append(row)
    return ProbeReport(client_version=version, claude_path=str(claude), rows=tuple(rows), stripped_env=stripped,
                       seconds=time.monotonic() - start)


def format_table(report: ProbeReport) -> str:
    """A plain-text table: how chosen -> model ID sent."""
    lines = [f"Claude Code {report.client_version} ({report.claude_path})"]
    width = max([len(r.how) for r in report.rows] + [len("how the model was chosen")])
    lines.append(f"{'how the model was chosen':<{width}}  model ID sent")
    for r in report.rows:
        extra = f"  (also: {', '.join(r.other_ids)})" if r.other_ids else ""
        note = f"  [{r.note}]" if r.note else ""
        lines.append(f"{r.how:<{width}}  {r.model_id or '-'}{extra}{note}")
    if report.stripped_env:
        lines.append(f"ignored inherited settings: {', '.join(report.stripped_env)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- routes from the probe


