"""The real `claude -p` through kvbook's LiteLLM to a real llama-server, and what got lost on the way.

1. Capture: Claude Code talks to kvbook's recording endpoint; the request it really sends is kept.
2. Fields: that request goes through LiteLLM to the recording endpoint (what LiteLLM forwards and
   drops) and straight to llama-server (what it rejects), once whole and once per field removed.
3. Turns: `claude -p` through LiteLLM (routes from the probe) to llama-server, then a follow-up
   turn with `--continue`; the prompt-cache reuse is read from llama-server's log and from the
   usage Claude Code reports, before and after CLAUDE_CODE_ATTRIBUTION_HEADER=0.
Every step is a record appended with kvbook.records.append_records.
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

from kvbook.errors import ServerError
from kvbook.probe import (ProbeReport, RecordingEndpoint, claude_env, claude_version, plan_routes, probe_claude_code,
                          run_claude)
from kvbook.proxy import ANTHROPIC, Route, start_proxy

BILLING_PREFIX = "x-anthropic-billing-header"
# The fields of a real Claude Code request that a local backend may not understand.
FIELDS = ("thinking", "context_management", "output_config", "metadata", "billing_block", "tools", "max_tokens")
DEFAULT_SERVER_ARGS = ("-c", "32768", "-np", "1", "--jinja", "-n", "256")
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
    returncode: int
    text: str
    seconds: float
    prompt_tokens: int | None  # llama-server's task.n_tokens for the turn's main request
    cached_tokens: int | None  # llama-server's "cached n_tokens" (prefix reused from the cache)
    cache_read_input_tokens: int | None  # what Claude Code's usage says
    generated_tokens: int | None = None  # llama-server: tokens after the prompt in the largest task
    truncated: bool | None = None  # llama-server stopped because the slot was full
    backend_requests: int = 0  # prompts llama-server saw in the turn (continuations after max_tokens add more)
    error: str = ""


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
    # Two sessions with different prompts, one after the other, sent straight to llama-server:
    # (cached tokens, prompt tokens) of the second, with the attribution header on and off.
    across_sessions_header_on: tuple[int | None, int | None]
    across_sessions_header_off: tuple[int | None, int | None]

    @property
    def ok(self) -> bool:
        return bool(self.turns) and all(t.returncode == 0 and t.text.strip() for t in self.turns)

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


def run_e2e(*, run_dir: Path, results_path: Path | None = None, run_id: str = "", claude: Path | None = None,
            probe: ProbeReport | None = None, server_args: tuple[str, ...] = DEFAULT_SERVER_ARGS,
            timeout_s: float = 300.0, prompt: str = "Say hello in one short sentence.",
            max_output_tokens: int | None = MAX_OUTPUT_TOKENS) -> E2EReport:
    """Capture, check each field, then two turns before and two after CLAUDE_CODE_ATTRIBUTION_HEADER=0."""
    from kvbook.components import find_claude, model_path
    from kvbook.records import append_records
    from kvbook.serve import start_llama_server

    claude = claude or find_claude()
    version = claude_version(claude)
    probe = probe or probe_claude_code(None, claude, aliases=("opus",), opusplan=False)
    run_id = run_id or "claude-e2e-" + secrets.token_hex(3)
    body = capture_request(claude)
    headers = body.pop("_headers")
    second = capture_request(claude, prompt="Say goodbye.")
    second.pop("_headers")
    off = capture_request(claude, attribution=False)
    off.pop("_headers")
    off_second = capture_request(claude, attribution=False, prompt="Say goodbye.")
    off_second.pop("_headers")
    billing_changes = _has_billing(body) and body["system"][0] != second["system"][0]
    model = model_path("smollm2-135m")
    records: list[dict[str, Any]] = []
    base = {"run_id": run_id, "claude_code_version": version, "model_file": str(model),
            "llama_server_args": list(server_args)}

    def record(check: str, passed: bool, reason: str, **details: Any) -> None:
        records.append({**base, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "check": check, "route": "claude-code", "passed": passed, "required": check == "claude_code_turn",
                        "reason": reason, "details": details})

    with RecordingEndpoint(main_marker="\0") as upstream, \
            start_llama_server(["llama-server", "-m", str(model), *server_args], run_dir=run_dir, force=True) as server:
        props = requests.get(server.base_url + "/props", timeout=10).json()
        caps = props.get("chat_template_caps") or {}
        slot_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        plan = plan_routes({"opus": "smollm2-135m"}, probe, server.base_url)
        routes = (*plan.routes, Route("kvbook-capture", ANTHROPIC, "capture", upstream.base_url))
        with start_proxy(routes, run_dir=run_dir) as proxy:
            auth = {"x-api-key": proxy.master_key, "anthropic-version": "2023-06-01"}
            # What LiteLLM forwards: the real body, sent through the proxy to the recording endpoint.
            _post(proxy.base_url + "/v1/messages", {**body, "model": "kvbook-capture", "stream": False}, auth, 60)
            arrived = upstream.requests[-1].body if upstream.requests else {}
            # What llama-server rejects: the whole body, then without each field (generation capped small).
            small = {**body, "stream": False, "max_tokens": 16}
            status_all, text_all = _post(server.base_url + "/v1/messages", small, {}, timeout_s)
            fields = []
            for name in FIELDS:
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
                    fields.append(FieldCheck(name, "not sent", None, None, None, "Claude Code did not send it"))
                    continue
                if name == "max_tokens":
                    # The real value with a tiny prompt: accepted or rejected, and how far generation may run.
                    tiny = {"model": "local", "max_tokens": body["max_tokens"], "stream": False,
                            "messages": [{"role": "user", "content": "Say ok."}]}
                    with_status, _ = _post(server.base_url + "/v1/messages", tiny, {}, timeout_s)
                    without_status = status_all
                    note = (f"{body['max_tokens']} > slot context {slot_ctx}: accepted; -n does not lower it, so an "
                            f"uncapped turn runs until the slot is full and the next one overflows (kvbook's turns set "
                            f"CLAUDE_CODE_MAX_OUTPUT_TOKENS={max_output_tokens})")
                else:
                    with_status = status_all
                    without_status, _ = _post(server.base_url + "/v1/messages", _without(small, name), {}, timeout_s)
                    note = ""
                if name == "tools" and caps.get("supports_tools") is False:
                    note = "accepted, but the model's chat template has no tool support: tools are left out of the prompt"
                elif name == "thinking" and with_status == 200:
                    note = "accepted and ignored (template has no reasoning support)" \
                        if not caps.get("supports_reasoning_effort") else "accepted"
                elif not note:
                    note = "accepted" if with_status == 200 else f"rejected: {text_all[:120]}"
                if forwarded is False:
                    note += "; LiteLLM dropped it before the backend"
                fields.append(FieldCheck(name, sent, forwarded, with_status, without_status, note))
                record("claude_code_field", with_status == 200, note, field=name, sent=sent,
                       litellm_forwarded=forwarded, llama_status_with=with_status, llama_status_without=without_status)

            record("claude_code_billing_block", not _has_billing(off),
                   f"billing block in system[0]: {'changes' if billing_changes else 'same'} between runs with different "
                   f"prompts; {'still sent' if _has_billing(off) else 'gone'} with CLAUDE_CODE_ATTRIBUTION_HEADER=0",
                   changes_between_runs=billing_changes, present_with_header_off=_has_billing(off))
            across: dict[bool, tuple[int | None, int | None]] = {}
            for on, (first, then) in ((True, (body, second)), (False, (off, off_second))):
                _post(server.base_url + "/v1/messages", {**first, "stream": False, "max_tokens": 1}, {}, timeout_s)
                status, text = _post(server.base_url + "/v1/messages", {**then, "stream": False, "max_tokens": 1}, {},
                                     timeout_s)
                try:
                    usage = json.loads(text).get("usage", {}) if status == 200 else {}
                except ValueError:
                    usage = {}
                cached = usage.get("cache_read_input_tokens")
                total = (usage.get("input_tokens") or 0) + (cached or 0) if usage else None
                across[on] = (cached, total)
                record("claude_code_prefix_cache_across_sessions", bool(cached and total and cached > total // 2),
                       f"header {'on' if on else 'off'}: a new session reused {cached} of {total} prompt tokens",
                       attribution_header=on, cached_tokens=cached, prompt_tokens=total)
            turns = []
            for attribution in (True, False):
                extra = {} if attribution else {"CLAUDE_CODE_ATTRIBUTION_HEADER": "0"}
                if max_output_tokens:
                    extra["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(max_output_tokens)
                with tempfile.TemporaryDirectory(prefix="kvbook-claude-") as tmp:
                    home = Path(tmp)
                    env = claude_env(home, proxy.base_url, {**extra, "ANTHROPIC_API_KEY": proxy.master_key})
                    for i, args in enumerate((["-p", prompt], ["-p", "--continue", "And once more."])):
                        label = f"{'header on' if attribution else 'header off'}, turn {i + 1}"
                        offset = server.log_path.stat().st_size
                        start = time.monotonic()
                        err = ""
                        try:
                            run = run_claude(claude, [*args, "--model", "opus", "--output-format", "json",
                                                      "--max-turns", "1"], env=env, cwd=home, timeout_s=timeout_s)
                            code, out = run.returncode, run.stdout
                        except ServerError as exc:
                            code, out, err = -9, "", str(exc)
                        seconds = time.monotonic() - start
                        try:
                            doc = json.loads(out) if out.strip() else {}
                        except json.JSONDecodeError:
                            doc = {"result": out}
                        text = str(doc.get("result") or "")
                        usage = doc.get("usage") or {}
                        n, cached, generated, truncated = _cache_numbers(_log_since(server.log_path, offset))
                        if code != 0 and not err:
                            err = (run.stderr.strip() or text)[:200]
                        excerpt = _log_since(server.log_path, offset)
                        turn = Turn(label, attribution, code, text[:300], round(seconds, 2), n, cached,
                                    usage.get("cache_read_input_tokens"), generated, truncated,
                                    len(re.findall(r"\| new prompt,", excerpt)), err)
                        turns.append(turn)
                        passed = code == 0 and bool(text.strip()) and not doc.get("is_error")
                        record("claude_code_turn", passed, "completed" if passed else (err or "no text"),
                               **asdict(turn))
    report = E2EReport(
        client_version=version, model_id=str(body.get("model")), request_keys=tuple(body),
        beta_header=headers.get("anthropic-beta", ""), billing_changes_between_runs=billing_changes,
        billing_block_with_header_off=_has_billing(off), template_supports_tools=caps.get("supports_tools"),
        slot_ctx=slot_ctx, fields=tuple(fields), turns=tuple(turns), server_args=tuple(server_args),
        max_output_tokens=max_output_tokens, across_sessions_header_on=across[True],
        across_sessions_header_off=across[False],
    )
    for t in (turns[1], turns[3]) if len(turns) == 4 else ():
        record("claude_code_prefix_cache", bool(t.cached_tokens), f"{t.label}: {t.cached_tokens} of {t.prompt_tokens} "
               f"prompt tokens reused", cached_tokens=t.cached_tokens, prompt_tokens=t.prompt_tokens,
               cache_read_input_tokens=t.cache_read_input_tokens, attribution_header=t.attribution_header)
    if results_path is not None:
        append_records(results_path, records)
    return report
