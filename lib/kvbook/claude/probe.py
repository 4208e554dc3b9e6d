"""Which model ID does the installed Claude Code really send? Ask it, don't guess.

A scripted Anthropic-compatible endpoint (`RecordingEndpoint`, loopback, free port) records every
request and answers with a short text; told to, it answers the first main-session turn with a
`tool_use` of the `Agent` tool so the client starts a subagent, whose own request then carries
the subagent's resolved model ID. `probe_claude_code()` runs the real `claude -p` once per
`--model` alias, once per agent file with `--agent NAME` and once per agent as a subagent, each
in a throwaway HOME, its own process group and under a timeout. `plan_routes()` turns a routing
intent ({"opus": "local-model"}) plus that report into LiteLLM routes covering exactly the IDs
the client sends, with warnings for configured slots it never sends.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from kvbook.errors import BadInput, ServerError
from kvbook.ops.litellm import ANTHROPIC, Route
from kvbook.ops.procs import die_with_parent, kill_group
from kvbook.yamlio import read_yaml

__all__ = [
    "ALIASES",
    "AgentFile",
    "ProbeReport",
    "ProbeRow",
    "RecordedRequest",
    "RecordingEndpoint",
    "RoutingPlan",
    "claude_env",
    "claude_version",
    "format_table",
    "load_agents",
    "plan_routes",
    "probe_claude_code",
    "run_claude",
]

# `--model` values probed; opusplan is probed twice (normal mode, then plan mode).
ALIASES = ("opus", "sonnet", "haiku", "default")
_SECRET_HEADERS = {"x-api-key", "authorization", "proxy-authorization", "cookie"}
_VERSION_RE = re.compile(r"^(\d+\.\d+\.\d+)\s+\(Claude Code\)\s*$")
# Inherited variables that would change which model the client picks, or where it sends it.
_STRIP_ENV = re.compile(r"^(ANTHROPIC_|CLAUDE_|CLAUDECODE$|AWS_BEARER_TOKEN_BEDROCK$|HTTPS?_PROXY$|https?_proxy$)")


# ---------------------------------------------------------------- recording endpoint

@dataclass(frozen=True)
class RecordedRequest:
    """One request the endpoint saw; secrets are removed from the headers, the body kept aside."""

    seq: int
    method: str
    path: str
    model: str | None
    stream: bool
    headers: Mapping[str, str]
    body_keys: tuple[str, ...]
    role: str  # "main", "subagent", "other": which conversation it belongs to
    answered: str  # "text", "tool_use", "count_tokens", "404"
    body: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """The record without the body (it holds the whole system prompt)."""
        out = asdict(self)
        out.pop("body")
        out["headers"] = dict(self.headers)
        return out


def _messages_text(body: Mapping[str, Any], index: int = 0) -> str:
    msgs = body.get("messages") or []
    if not isinstance(msgs, list) or len(msgs) <= index:
        return ""
    return json.dumps(msgs[index].get("content", ""), ensure_ascii=False) if isinstance(msgs[index], dict) else ""


def _tool_names(body: Mapping[str, Any]) -> list[str]:
    return [t.get("name", "") for t in body.get("tools") or [] if isinstance(t, dict)]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-request (claude exiting) is normal here, not a traceback."""


class RecordingEndpoint:
    """A scripted Anthropic Messages endpoint in a thread on 127.0.0.1; use as a context manager.

    `main_marker` identifies the main session (it is in the prompt kvbook gives `claude -p`);
    `spawn_agent` names the agent to start with an `Agent` tool_use on the first main turn.
    """

    def __init__(self, *, main_marker: str = "", spawn_agent: str | None = None, reply: str = "kvbook probe ok"):
        self.main_marker = main_marker
        self.spawn_agent = spawn_agent
        self.reply = reply
        self.sub_marker = "kvbook-subagent-" + secrets.token_hex(4)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._spawned = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise ServerError("the recording endpoint is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> RecordingEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802
                endpoint._handle(self, {})

            def do_HEAD(self) -> None:  # noqa: N802
                endpoint._handle(self, {})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_unparsed": raw[:200].decode(errors="replace")}
                endpoint._handle(self, body if isinstance(body, dict) else {"_unparsed": str(body)[:200]})

        # Port 0: the OS picks a free port at bind time, so there is no race with another process.
        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvbook-probe-endpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -------------------------------------------------- request handling

    def _role(self, body: Mapping[str, Any]) -> str:
        first = _messages_text(body)
        if self.sub_marker in first:
            return "subagent"
        if self.main_marker and self.main_marker in first:
            return "main"
        return "other"

    def _handle(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        path = h.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in h.headers.items() if k.lower() not in _SECRET_HEADERS}
        role = self._role(body)
        if h.command == "POST" and path == "/v1/messages/count_tokens":
            answered = "count_tokens"
        elif h.command == "POST" and path == "/v1/messages":
            answered = "text"
            with self._lock:
                if (self.spawn_agent and not self._spawned and role == "main" and "Agent" in _tool_names(body)):
                    self._spawned = True
                    answered = "tool_use"
        else:
            answered = "404"
        with self._lock:
            self.requests.append(RecordedRequest(
                seq=len(self.requests), method=h.command, path=h.path, model=body.get("model"),
                stream=bool(body.get("stream")), headers=headers, body_keys=tuple(body), role=role,
                answered=answered, body=body,
            ))
        if answered == "404":
            self._send_json(h, 404, {"type": "error", "error": {"type": "not_found_error", "message": f"{path} is not served here"}})
        elif answered == "count_tokens":
            self._send_json(h, 200, {"input_tokens": max(1, len(json.dumps(body)) // 4)})
        else:
            self._answer(h, body, answered == "tool_use")

    @staticmethod
    def _send_json(h: BaseHTTPRequestHandler, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _content(self, tool_use: bool) -> list[dict[str, Any]]:
        if not tool_use:
            return [{"type": "text", "text": self.reply}]
        return [{"type": "tool_use", "id": "toolu_kvbook_" + secrets.token_hex(6), "name": "Agent",
                 "input": {"description": "kvbook probe", "prompt": f"Say ok. {self.sub_marker}",
                           "subagent_type": self.spawn_agent}}]

    def _answer(self, h: BaseHTTPRequestHandler, body: Mapping[str, Any], tool_use: bool) -> None:
        model = str(body.get("model") or "unknown")
        content = self._content(tool_use)
        stop = "tool_use" if tool_use else "end_turn"
        usage = {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        msg_id = "msg_kvbook_" + secrets.token_hex(6)
        if not body.get("stream"):
            self._send_json(h, 200, {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                                     "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage})
            return
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}})]
        block = content[0]
        if block["type"] == "text":
            events += [
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": block["text"]}}),
            ]
        else:
            events += [
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}),
            ]
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        data = b"".join(f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode() for name, doc in events)
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("cache-control", "no-cache")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


# ---------------------------------------------------------------- running claude

@dataclass(frozen=True)
class ClaudeRun:
    """One finished `claude` process."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def claude_env(home: Path, base_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every claude run gets: inherited ANTHROPIC_*/CLAUDE_* settings removed (they
    would change the model it picks), a throwaway HOME, a local base URL and a dummy key."""
    env = {k: v for k, v in os.environ.items() if not _STRIP_ENV.match(k)}
    env.update({
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-kvbook-dummy",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    env.update(extra or {})
    return env


def run_claude(claude: Path, args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float) -> ClaudeRun:
    """Run claude in its own process group; on timeout the whole group is killed and ServerError raised."""
    argv = (str(claude), *args)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, start_new_session=True, preexec_fn=die_with_parent)
    except OSError as exc:
        raise BadInput(f"cannot run {claude} ({exc.strerror}); point KVBOOK_CLAUDE at Claude Code or run `make setup`") from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise ServerError(f"`claude {' '.join(args[:3])} ...` did not finish within {timeout_s:.0f} s and was killed "
                          f"(pass a larger timeout if the machine is slow)") from None
    except BaseException:
        kill_group(proc)
        raise
    kill_group(proc)  # anything it left in its group
    return ClaudeRun(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                     time.monotonic() - start)


def claude_version(claude: Path, timeout_s: float = 30.0) -> str:
    """The client's version from `claude --version`; anything that is not Claude Code is an error."""
    with tempfile.TemporaryDirectory(prefix="kvbook-claude-") as tmp:
        home = Path(tmp)
        try:
            run = run_claude(claude, ["--version"], env=claude_env(home, "http://127.0.0.1:9"), cwd=home,
                             timeout_s=timeout_s)
        except ServerError:
            raise BadInput(f"{claude} is not Claude Code: `--version` did not answer within {timeout_s:.0f} s") from None
    first = (run.stdout.strip().splitlines() or [""])[0]
    match = _VERSION_RE.match(first)
    if run.returncode != 0 or match is None:
        shown = first[:80] or run.stderr.strip()[:80] or "nothing"
        raise BadInput(f"{claude} is not Claude Code: `--version` exited {run.returncode} and printed {shown!r} "
                       f"(expected 'X.Y.Z (Claude Code)'); point KVBOOK_CLAUDE at the npm-installed claude or run `make setup`")
    return match.group(1)


# ---------------------------------------------------------------- agent files

@dataclass(frozen=True)
class AgentFile:
    """An agent definition: a markdown file whose YAML frontmatter names it."""

    name: str
    model: str | None  # frontmatter `model:`; None means it inherits the session's model
    description: str
    path: Path


def _frontmatter(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"agent file {path}: cannot read it ({exc})") from None
    match = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.DOTALL)
    if match is None:
        raise BadInput(f"agent file {path} has no YAML frontmatter; start it with '---', name: and description: lines, then '---'")
    try:
        doc = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise BadInput(f"agent file {path}: frontmatter is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise BadInput(f"agent file {path}: frontmatter must be a mapping of name: value")
    return doc


def load_agents(agents_dir: Path) -> tuple[AgentFile, ...]:
    """Every *.md agent in a folder (sorted by name); each must have frontmatter with name and description."""
    if not agents_dir.is_dir():
        raise BadInput(f"agents folder {agents_dir} does not exist or is not a folder")
    agents = []
    for path in sorted(agents_dir.glob("*.md")):
        doc = _frontmatter(path)
        name, desc = doc.get("name"), doc.get("description")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
            raise BadInput(f"agent file {path}: frontmatter needs name: made of letters, digits, - or _ (got {name!r})")
        if not isinstance(desc, str) or not desc.strip():
            raise BadInput(f"agent file {path}: frontmatter needs a description:")
        model = doc.get("model")
        agents.append(AgentFile(name=name, model=None if model is None else str(model), description=desc, path=path))
    names = [a.name for a in agents]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadInput(f"agents folder {agents_dir}: agent name {dupes[0]} is used by more than one file")
    if not agents:
        raise BadInput(f"agents folder {agents_dir} has no *.md agent files")
    return tuple(agents)


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
    stripped = tuple(sorted(k for k in os.environ if _STRIP_ENV.match(k)))
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

@dataclass(frozen=True)
class RoutingPlan:
    """LiteLLM routes for the IDs the client really sends, and what a person should know about them."""

    routes: tuple[Route, ...]
    warnings: tuple[str, ...]
    covered: Mapping[str, tuple[str, ...]]  # intent key -> model IDs routed for it


def plan_routes(intent: Mapping[str, str], report: ProbeReport, api_base: str, *, backend: str = ANTHROPIC,
                configured: Iterable[str] = ()) -> RoutingPlan:
    """Routes for each alias in `intent` (alias -> upstream model), covering exactly the IDs the probe saw.

    `configured` are model slots from an existing config (e.g. a blog's `claude-opus-4-7`); each one
    the client never sends is named in a warning, as is any side-call ID left without a route.
    """
    if not intent:
        raise BadInput("the routing intent is empty; give at least one alias -> upstream model, e.g. {'opus': 'local'}")
    probed = sorted({r.requested for r in report.rows})
    by_id: dict[str, str] = {}
    covered: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    for alias, upstream in intent.items():
        if not isinstance(upstream, str) or not upstream:
            raise BadInput(f"routing intent {alias!r}: the upstream model must be a non-empty name")
        ids = report.ids_for(alias)
        if not ids:
            if alias not in probed:
                raise BadInput(f"routing intent names {alias!r}, which the probe did not try; probed: {', '.join(probed)}")
            raise BadInput(f"the probe saw no model ID for {alias!r} (see its note in the probe table)")
        for mid in ids:
            if by_id.get(mid, upstream) != upstream:
                raise BadInput(f"model ID {mid} would go to both {by_id[mid]} and {upstream}; "
                               f"the client sends the same ID for two aliases of the intent")
            by_id[mid] = upstream
        covered[alias] = ids
    routes = tuple(Route(mid, backend, up, api_base) for mid, up in by_id.items())
    sent = {r.model_id for r in report.rows if r.model_id}
    for slot in configured:
        if slot not in sent:
            near = [f"{a} sends {', '.join(covered.get(a) or report.ids_for(a))}" for a in intent]
            warnings.append(f"configured slot {slot} is never sent by Claude Code {report.client_version} "
                            f"({'; '.join(near)})")
    routed_rows = [r for r in report.rows if r.requested in intent]
    side = sorted({i for r in routed_rows for i in r.other_ids if i not in by_id})
    for mid in side:
        warnings.append(f"the client also sends {mid} (side requests in the same runs), which no route covers; "
                        f"add it to the intent or a catch-all route")
    return RoutingPlan(routes=routes, warnings=tuple(warnings), covered=covered)


def configured_slots(config: Path) -> tuple[str, ...]:
    """The model_name entries of an existing LiteLLM config, to check against the probe."""
    doc = read_yaml(config)
    entries = doc.get("model_list") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise BadInput(f"{config}: no model_list found; is it a LiteLLM config?")
    return tuple(str(e["model_name"]) for e in entries if isinstance(e, dict) and "model_name" in e)
