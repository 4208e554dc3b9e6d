"""The real `claude -p` through kvbook's LiteLLM to a real llama-server, and what got lost on the way.

1. Capture: Claude Code talks to kvbook's recording endpoint; the request it really sends is kept.
2. Fields: that request goes through LiteLLM to the recording endpoint (what LiteLLM forwards and
   drops) and straight to llama-server (what it rejects), once whole and once per field removed.
3. Turns: `claude -p` through LiteLLM (routes from the probe) to llama-server: a first turn, a
   follow-up with `--continue` and a new session in the same folder with another first prompt, once
   with the attribution header and once with CLAUDE_CODE_ATTRIBUTION_HEADER=0. The prompt-cache
   reuse is read from llama-server's log and from the usage Claude Code reports.
Every step is a CheckRecord appended with kvbook.records.store.append_checks.

What makes a turn complete with the bundled 135M SmolLM2 (measured with 2.1.197, see TURN_FLAGS):
by default the request ends with a `system`-role message after the user's prompt (the Agent tool's
agent types and the Skill tool's skills, about 1.5k tokens); the model continues that message
instead of answering and writes until max_tokens. `--tools ""` removes the tools and that message
and keeps the default system prompt; `--temp 0` on llama-server (Claude Code sends no temperature)
makes the short factual answer the same every run.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from kvbook.claude.client import claude_env, claude_version, run_claude
from kvbook.claude.endpoint import RecordingEndpoint
from kvbook.claude.probe import ProbeReport, probe_claude_code
from kvbook.claude.routes import plan_routes
from kvbook.errors import BadInput, ServerError
from kvbook.ops.litellm import ANTHROPIC, Route, start_proxy

BILLING_PREFIX = "x-anthropic-billing-header"
# The fields of a real Claude Code request that a local backend may not understand.
FIELDS = ("thinking", "context_management", "output_config", "metadata", "billing_block", "tools", "max_tokens")
DEFAULT_SERVER_ARGS = ("-c", "32768", "-np", "1", "--jinja", "-n", "256", "--temp", "0")
# Claude Code flags for the turns. The full-default request is still what the field checks use.
TURN_FLAGS = ("--tools", "")
# First turn, follow-up (--continue), new session. The first prompts differ early on purpose: the
# billing block's cc_version suffix is derived from the first prompt (2.1.197: 2.1.197.73f for the first,
# 2.1.197.f03 for the third), so a new session with another prompt changes system[0]. A 135M model's
# answer may be wrong (it says Neptune); the test is that it ends the turn itself.
PROMPTS = ("What is the capital of France? Answer in one word.", "And the capital of Italy?",
           "Which planet is the largest? Answer in one word.")
# Claude Code asks for max_tokens 64000; llama-server's -n does not lower a request's max_tokens, so an
# uncapped turn can generate until the slot is full and the next request overflows the context (measured
# with 2.1.197 and SmolLM2). Capped, Claude Code sends up to 3 continuations after stop_reason max_tokens,
# then fails the turn ("response exceeded the N output token maximum"): 256 was too small for SmolLM2.
# 1024 keeps prompt (~3.1k) + 4 x 1024 inside the 8192-token slot.
MAX_OUTPUT_TOKENS = 1024


@dataclass(frozen=True)
class FieldCheck:
    """One field of the real request: what it was, and what each hop did with it."""

    field: str
    sent: str  # short form of the value Claude Code sent
    litellm_forwarded: bool | None  # did it reach the upstream behind LiteLLM's anthropic/ route
    llama_status_with: int | None  # llama-server's HTTP status for the whole request
    llama_status_without: int | None  # ... with this field removed
    note: str


@dataclass(frozen=True)
class Turn:
    """One `claude -p` turn through LiteLLM to llama-server."""

    label: str
    attribution_header: bool
    kind: str  # "first", "continue" (same session) or "new session" (same folder, another first prompt)
    returncode: int
    text: str
    seconds: float
    prompt_tokens: int | None  # llama-server's task.n_tokens for the turn's main request
    cached_tokens: int | None  # llama-server's "cached n_tokens" (prefix reused from the cache)
    cache_read_input_tokens: int | None  # what Claude Code's usage says
    generated_tokens: int | None = None  # llama-server: tokens after the prompt in the largest task
    truncated: bool | None = None  # llama-server stopped because the slot was full
    backend_requests: int = 0  # prompts llama-server saw in the turn (continuations after max_tokens add more)
    stop_reason: str | None = None  # Claude Code's JSON result
    input_tokens: int | None = None  # Claude Code's usage: prompt tokens not read from the cache
    error: str = ""

    @property
    def completed(self) -> bool:
        """Exit 0, a result, and the model ended the turn itself."""
        return self.returncode == 0 and bool(self.text.strip()) and self.stop_reason == "end_turn" and not self.error


@dataclass(frozen=True)
class E2EReport:
    client_version: str
    model_id: str
    request_keys: tuple[str, ...]
    beta_header: str
    billing_changes_between_runs: bool
    billing_block_with_header_off: bool
    template_supports_tools: bool | None
    slot_ctx: int | None
    fields: tuple[FieldCheck, ...]
    turns: tuple[Turn, ...]
    server_args: tuple[str, ...]
    max_output_tokens: int | None
    turn_flags: tuple[str, ...]
    # (cached tokens, prompt tokens) in llama-server's log for the follow-up turn and the new
    # session, with the attribution header on and off.
    within_session_header_on: tuple[int | None, int | None]
    within_session_header_off: tuple[int | None, int | None]
    across_sessions_header_on: tuple[int | None, int | None]
    across_sessions_header_off: tuple[int | None, int | None]

    @property
    def ok(self) -> bool:
        return bool(self.turns) and all(t.completed for t in self.turns)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 90 else text[:87] + "..."


def _has_billing(body: Mapping[str, Any]) -> bool:
    system = body.get("system")
    return isinstance(system, list) and any(isinstance(b, dict) and str(b.get("text", "")).startswith(BILLING_PREFIX)
                                            for b in system)


def _without(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(body))
    if name == "billing_block":
        out["system"] = [b for b in out.get("system") or [] if not str(b.get("text", "")).startswith(BILLING_PREFIX)]
    elif name == "max_tokens":
        out["max_tokens"] = 64
    else:
        out.pop(name, None)
    return out


def capture_request(claude: Path, *, alias: str = "opus", attribution: bool = True, prompt: str = "Say hello.",
                    timeout_s: float = 90.0) -> dict[str, Any]:
    """The first main-session request Claude Code sends for one `-p` turn (headers under `_headers`)."""
    marker = "kvbook-capture-" + secrets.token_hex(4)
    extra = {} if attribution else {"CLAUDE_CODE_ATTRIBUTION_HEADER": "0"}
    with tempfile.TemporaryDirectory(prefix="kvbook-claude-") as tmp, RecordingEndpoint(main_marker=marker) as ep:
        home = Path(tmp)
        run = run_claude(claude, ["-p", f"{prompt} {marker}", "--model", alias, "--max-turns", "1"],
                         env=claude_env(home, ep.base_url, extra), cwd=home, timeout_s=timeout_s)
        main = [r for r in ep.requests if r.role == "main" and r.path.split("?", 1)[0] == "/v1/messages"]
    if not main:
        raise ServerError(f"claude -p sent no main-session request to the recording endpoint (exit {run.returncode}: "
                          f"{(run.stderr.strip() or run.stdout.strip())[:160]})")
    return {**main[0].body, "_headers": dict(main[0].headers)}


def _post(url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout_s: float) -> tuple[int | None, str]:
    try:
        resp = requests.post(url, json=body, headers=dict(headers), timeout=timeout_s)
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}"
    return resp.status_code, resp.text


def _log_since(path: Path, offset: int) -> str:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def _cache_numbers(log: str) -> tuple[int | None, int | None, int | None, bool | None]:
    """(prompt tokens, cached tokens, generated tokens, truncated) of the largest prompt in a
    llama-server log excerpt (lines `new prompt ... task.n_tokens`, `cached n_tokens`, `stop processing`)."""
    tasks: dict[str, list[Any]] = {}
    for m in re.finditer(r"task (\d+) \| new prompt, .*?task\.n_tokens = (\d+)", log):
        tasks.setdefault(m.group(1), [None, None, None, None])[0] = int(m.group(2))
    for m in re.finditer(r"task (\d+) \| cached n_tokens = (\d+)", log):
        entry = tasks.setdefault(m.group(1), [None, None, None, None])
        if entry[1] is None:  # the first line is the reuse; later ones are prompt-processing progress
            entry[1] = int(m.group(2))
    for m in re.finditer(r"task (\d+) \| stop processing: n_tokens = (\d+), truncated = (\d)", log):
        entry = tasks.setdefault(m.group(1), [None, None, None, None])
        entry[2], entry[3] = int(m.group(2)), m.group(3) == "1"
    best = max((t for t in tasks.values() if t[0] is not None), key=lambda t: t[0], default=None)
    if best is None:
        return None, None, None, None
    generated = best[2] - best[0] if best[2] is not None else None
    return best[0], best[1], generated, best[3]


Record = Any  # the record(check, passed, reason, **details) callable run_e2e builds


def _field_check(name: str, body: Mapping[str, Any], arrived: Mapping[str, Any], base_url: str,
                 whole: tuple[int | None, str], caps: Mapping[str, Any], slot_ctx: int | None,
                 max_output_tokens: int | None, timeout_s: float) -> FieldCheck:
    """What LiteLLM and llama-server did with one field of the real request."""
    if name == "billing_block":
        present, sent = _has_billing(body), _short(body["system"][0]) if _has_billing(body) else "absent"
        forwarded = _has_billing(arrived) if arrived else None
    elif name == "tools":
        present, sent = "tools" in body, f"{len(body.get('tools') or [])} tools"
        forwarded = bool(arrived.get("tools")) if arrived else None
    else:
        present, sent = name in body, _short(body.get(name))
        forwarded = (name in arrived) if arrived else None
    if not present:
        return FieldCheck(name, "not sent", None, None, None, "Claude Code did not send it")
    status_all, text_all = whole
    note = ""
    if name == "max_tokens":
        # The real value with a tiny prompt: accepted or rejected, and how far generation may run.
        tiny = {"model": "local", "max_tokens": body["max_tokens"], "stream": False,
                "messages": [{"role": "user", "content": "Say ok."}]}
        with_status, _ = _post(base_url + "/v1/messages", tiny, {}, timeout_s)
        without_status = status_all
        note = (f"{body['max_tokens']} > slot context {slot_ctx}: accepted; -n does not lower it, so an "
                f"uncapped turn runs until the slot is full and the next one overflows (kvbook's turns set "
                f"CLAUDE_CODE_MAX_OUTPUT_TOKENS={max_output_tokens})")
    else:
        with_status = status_all
        small = {**body, "stream": False, "max_tokens": 16}
        without_status, _ = _post(base_url + "/v1/messages", _without(small, name), {}, timeout_s)
    if name == "tools" and caps.get("supports_tools") is False:
        note = "accepted, but the model's chat template has no tool support: tools are left out of the prompt"
    elif name == "thinking" and with_status == 200:
        note = "accepted and ignored (template has no reasoning support)" if not caps.get("supports_reasoning_effort") \
            else "accepted"
    elif not note:
        note = "accepted" if with_status == 200 else f"rejected: {text_all[:120]}"
    if forwarded is False:
        note += "; LiteLLM dropped it before the backend"
    return FieldCheck(name, sent, forwarded, with_status, without_status, note)


def check_fields(body: Mapping[str, Any], proxy_url: str, proxy_key: str, upstream: RecordingEndpoint, llama_url: str,
                 caps: Mapping[str, Any], slot_ctx: int | None, max_output_tokens: int | None,
                 timeout_s: float) -> list[FieldCheck]:
    """The full-default request through LiteLLM (what it forwards) and to llama-server (what it rejects)."""
    auth = {"x-api-key": proxy_key, "anthropic-version": "2023-06-01"}
    _post(proxy_url + "/v1/messages", {**body, "model": "kvbook-capture", "stream": False}, auth, 60)
    arrived = upstream.requests[-1].body if upstream.requests else {}
    whole = _post(llama_url + "/v1/messages", {**body, "stream": False, "max_tokens": 16}, {}, timeout_s)
    return [_field_check(name, body, arrived, llama_url, whole, caps, slot_ctx, max_output_tokens, timeout_s)
            for name in FIELDS]


def _parse_result(out: str) -> dict[str, Any]:
    """Claude Code's `--output-format json` document (plain text is kept as the result)."""
    try:
        doc = json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        return {"result": out}
    return doc if isinstance(doc, dict) else {"result": str(doc)}


def claude_turn(claude: Path, args: list[str], *, env: Mapping[str, str], cwd: Path, server: Any, label: str,
                attribution: bool, kind: str, timeout_s: float) -> Turn:
    """One `claude -p` run through LiteLLM; llama-server's log excerpt says what the backend did."""
    offset = server.log_path.stat().st_size
    start = time.monotonic()
    err = ""
    try:
        run = run_claude(claude, [*args, "--model", "opus", "--output-format", "json", "--max-turns", "1", *TURN_FLAGS],
                         env=env, cwd=cwd, timeout_s=timeout_s)
        code, out, stderr = run.returncode, run.stdout, run.stderr
    except ServerError as exc:
        code, out, stderr, err = -9, "", "", str(exc)
    seconds = time.monotonic() - start
    doc = _parse_result(out)
    text = str(doc.get("result") or "")
    usage = doc.get("usage") or {}
    excerpt = _log_since(server.log_path, offset)
    n, cached, generated, truncated = _cache_numbers(excerpt)
    if not err and (code != 0 or doc.get("is_error")):
        err = (stderr.strip() or text or "is_error")[:200]
    return Turn(label, attribution, kind, code, text[:300], round(seconds, 2), n, cached,
                usage.get("cache_read_input_tokens"), generated, truncated,
                len(re.findall(r"\| new prompt,", excerpt)), doc.get("stop_reason"), usage.get("input_tokens"), err)


def header_sessions(claude: Path, proxy: Any, server: Any, *, attribution: bool, max_output_tokens: int | None,
                    timeout_s: float, prompts: tuple[str, str, str] = PROMPTS) -> list[Turn]:
    """First turn, `--continue` follow-up, then a new session in the same folder, for one header setting."""
    extra = {"ANTHROPIC_API_KEY": proxy.master_key}
    if not attribution:
        extra["CLAUDE_CODE_ATTRIBUTION_HEADER"] = "0"
    if max_output_tokens:
        extra["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(max_output_tokens)
    setting = "header on" if attribution else "header off"
    plan = (("first", ["-p", prompts[0]]), ("continue", ["-p", "--continue", prompts[1]]),
            ("new session", ["-p", prompts[2]]))
    with tempfile.TemporaryDirectory(prefix="kvbook-claude-") as tmp:
        home, work = Path(tmp) / "home", Path(tmp) / "work"
        work.mkdir(parents=True)
        env = claude_env(home, proxy.base_url, extra)
        return [claude_turn(claude, args, env=env, cwd=work, server=server, label=f"{setting}, {kind}",
                            attribution=attribution, kind=kind, timeout_s=timeout_s) for kind, args in plan]


def _reuse(turns: list[Turn], attribution: bool, kind: str) -> tuple[int | None, int | None]:
    """(cached, prompt tokens) from llama-server's log for one turn kind and header setting."""
    found = [t for t in turns if t.attribution_header == attribution and t.kind == kind]
    return (found[0].cached_tokens, found[0].prompt_tokens) if found else (None, None)


def cache_figures(turns: list[Turn]) -> dict[str, dict[str, Any]]:
    """Prefix-cache reuse before/after CLAUDE_CODE_ATTRIBUTION_HEADER=0, within and across sessions."""
    out: dict[str, dict[str, Any]] = {}
    for scope, kind in (("within_session", "continue"), ("across_sessions", "new session")):
        row: dict[str, Any] = {}
        for attribution, key in ((True, "header_on"), (False, "header_off")):
            cached, total = _reuse(turns, attribution, kind)
            usage = next((t.cache_read_input_tokens for t in turns
                          if t.attribution_header == attribution and t.kind == kind), None)
            row[key] = {"cached_tokens": cached, "prompt_tokens": total, "cache_read_input_tokens": usage,
                        "share": round(cached / total, 3) if cached is not None and total else None}
        out[scope] = row
    return out


def _share_text(fig: Mapping[str, Any]) -> str:
    return f"{fig['cached_tokens']} of {fig['prompt_tokens']}"


def _record_cache(record: Record, turns: list[Turn], billing: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The prefix-cache records, one per scope and header setting, and the before/after summary."""
    figures = cache_figures(turns)
    for scope, check, what in (("within_session", "claude_code_prefix_cache", "a --continue turn"),
                               ("across_sessions", "claude_code_prefix_cache_across_sessions",
                                "a new session with another first prompt")):
        for key, on in (("header_on", True), ("header_off", False)):
            fig = figures[scope][key]
            ok = bool(fig["share"] and fig["share"] > 0.5)
            record(check, ok, f"header {'on' if on else 'off'}: {what} reused {_share_text(fig)} prompt tokens",
                   attribution_header=on, **fig)
    across, within = figures["across_sessions"], figures["within_session"]
    on_share, off_share = across["header_on"]["share"], across["header_off"]["share"]
    helped = on_share is not None and off_share is not None and off_share > on_share
    record("claude_code_attribution_header_effect", helped,
           f"new session reused {_share_text(across['header_on'])} prompt tokens with the attribution header, "
           f"{_share_text(across['header_off'])} with CLAUDE_CODE_ATTRIBUTION_HEADER=0; a --continue turn reused "
           f"{_share_text(within['header_on'])} and {_share_text(within['header_off'])}",
           **figures, billing=dict(billing))
    return figures


def _captures(claude: Path, prompts: tuple[str, str, str]) -> tuple[dict[str, Any], ...]:
    """The real request for the first prompt (headers apart), for the new session's prompt, and with the header off."""
    body = capture_request(claude, prompt=prompts[0])
    headers = body.pop("_headers")
    second = capture_request(claude, prompt=prompts[2])
    second.pop("_headers")
    off = capture_request(claude, attribution=False, prompt=prompts[0])
    off.pop("_headers")
    return body, headers, second, off


def _billing(body: Mapping[str, Any], second: Mapping[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """The billing block of each captured request and whether it changed."""
    def text(b: Mapping[str, Any]) -> str | None:
        return str(b["system"][0]["text"]) if _has_billing(b) else None

    return {"first_prompt": text(body), "other_prompt": text(second), "header_off": text(off),
            "changes_between_prompts": _has_billing(body) and text(body) != text(second)}


def run_e2e(*, run_dir: Path, results_path: Path | None = None, run_id: str = "", claude: Path | None = None,
            probe: ProbeReport | None = None, server_args: tuple[str, ...] = DEFAULT_SERVER_ARGS,
            timeout_s: float = 300.0, prompts: tuple[str, str, str] = PROMPTS,
            max_output_tokens: int | None = MAX_OUTPUT_TOKENS) -> E2EReport:
    """Capture, check each field, then three turns with the attribution header and three without."""
    from kvbook.ops.components import find_claude, model_path
    from kvbook.ops.llama_server import start_llama_server
    from kvbook.records.store import CheckRecord, append_checks

    if len(prompts) != 3 or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise BadInput("prompts must be three non-empty texts: first turn, --continue follow-up, new session")
    claude = claude or find_claude()
    version = claude_version(claude)
    probe = probe or probe_claude_code(None, claude, aliases=("opus",), opusplan=False)
    run_id = run_id or "claude-e2e-" + secrets.token_hex(3)
    body, headers, second, off = _captures(claude, prompts)
    billing = _billing(body, second, off)
    model = model_path("smollm2-135m")
    records: list[CheckRecord] = []
    context = {"claude_code_version": version, "model_file": str(model), "llama_server_args": list(server_args),
               "claude_flags": list(TURN_FLAGS)}

    def record(check: str, passed: bool, reason: str, **details: Any) -> None:
        records.append(CheckRecord(
            run_id=run_id, check=check, route="claude-code", passed=passed, required=check == "claude_code_turn",
            reason=reason, time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            model_name="smollm2-135m", extra={**context, "details": details}))

    with RecordingEndpoint(main_marker="\0") as upstream, \
            start_llama_server(["llama-server", "-m", str(model), *server_args], run_dir=run_dir, force=True) as server:
        props = requests.get(server.base_url + "/props", timeout=10).json()
        caps = props.get("chat_template_caps") or {}
        slot_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        plan = plan_routes({"opus": "smollm2-135m"}, probe, server.base_url)
        routes = (*plan.routes, Route("kvbook-capture", ANTHROPIC, "capture", upstream.base_url))
        with start_proxy(routes, run_dir=run_dir) as proxy:
            fields = check_fields(body, proxy.base_url, proxy.master_key, upstream, server.base_url, caps, slot_ctx,
                                  max_output_tokens, timeout_s)
            for f in fields:
                if f.sent != "not sent":
                    record("claude_code_field", f.llama_status_with == 200, f.note, field=f.field, sent=f.sent,
                           litellm_forwarded=f.litellm_forwarded, llama_status_with=f.llama_status_with,
                           llama_status_without=f.llama_status_without)
            record("claude_code_billing_block", not _has_billing(off),
                   f"billing block in system[0]: {'changes' if billing['changes_between_prompts'] else 'same'} between "
                   f"runs with different first prompts; {'still sent' if _has_billing(off) else 'gone'} with "
                   f"CLAUDE_CODE_ATTRIBUTION_HEADER=0", changes_between_runs=billing["changes_between_prompts"],
                   present_with_header_off=_has_billing(off), **billing)
            turns = [t for on in (True, False) for t in header_sessions(
                claude, proxy, server, attribution=on, max_output_tokens=max_output_tokens, timeout_s=timeout_s,
                prompts=prompts)]
    for t in turns:
        record("claude_code_turn", t.completed, "completed: stop_reason end_turn" if t.completed
               else (t.error or f"stop_reason {t.stop_reason}"), **asdict(t), completed=t.completed)
    _record_cache(record, turns, billing)
    report = E2EReport(
        client_version=version, model_id=str(body.get("model")), request_keys=tuple(body),
        beta_header=headers.get("anthropic-beta", ""), billing_changes_between_runs=billing["changes_between_prompts"],
        billing_block_with_header_off=_has_billing(off), template_supports_tools=caps.get("supports_tools"),
        slot_ctx=slot_ctx, fields=tuple(fields), turns=tuple(turns), server_args=tuple(server_args),
        max_output_tokens=max_output_tokens, turn_flags=TURN_FLAGS,
        within_session_header_on=_reuse(turns, True, "continue"),
        within_session_header_off=_reuse(turns, False, "continue"),
        across_sessions_header_on=_reuse(turns, True, "new session"),
        across_sessions_header_off=_reuse(turns, False, "new session"),
    )
    if results_path is not None:
        append_checks(results_path, records)
    return report
