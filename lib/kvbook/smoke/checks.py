"""Smoke checks against an Anthropic Messages endpoint (llama-server direct, or LiteLLM's routes).

Each check returns a CheckResult with pass/fail, a reason a person can act on, and timings.
A transport failure never raises: it is a failed check whose reason says "backend down" or
"non-JSON answer", so one dead server cannot lose the records of the other checks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
}
TIME_TOOL = {
    "name": "get_time",
    "description": "Get the current local time in a time zone.",
    "input_schema": {
        "type": "object",
        "properties": {"timezone": {"type": "string"}},
        "required": ["timezone"],
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
TOOL_PROMPT = "What is the weather in Paris right now? Use the get_weather tool."
TEXT_PROMPT = "Write a short paragraph about the sea."
RAW_TOOL_CALL = re.compile(r"<tool_call>|\"name\"\s*:\s*\"get_(weather|time)\"|\[TOOL_CALLS\]")


@dataclass(frozen=True)
class Target:
    """One route to test: a base URL serving POST /v1/messages, the model name to send, and headers."""

    route: str
    base_url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


@dataclass(frozen=True)
class Timings:
    """Seconds from sending the request; None where the answer had no such point."""

    ttfb_s: float | None = None
    first_text_s: float | None = None
    total_s: float | None = None
    output_tokens: int | None = None
    tokens_per_s: float | None = None
    events: int | None = None
    events_per_s: float | None = None


@dataclass(frozen=True)
class CheckResult:
    check: str
    route: str
    passed: bool
    required: bool
    reason: str
    timings: Timings = Timings()
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SmokeConfig:
    max_tokens: int = 96
    temperature: float = 0.0
    timeout_s: float = 120.0
    text_tokens: int = 64
    extra_body: dict[str, Any] = field(default_factory=dict)
    # An assistant prefill (e.g. "<tool_call>\n") added to forced tool-call requests only. With it,
    # llama-server's tool-call grammar starts inside the call instead of allowing prose first.
    tool_prefill: str = ""


class _Fail(Exception):
    """A check failed for a reason that ends it."""


def _headers(target: Target) -> dict[str, str]:
    return {"content-type": "application/json", "anthropic-version": "2023-06-01", **target.headers}


def _post(target: Target, path: str, body: dict, cfg: SmokeConfig) -> tuple[dict, Timings]:
    t0 = time.perf_counter()
    try:
        resp = requests.post(target.url(path), json=body, headers=_headers(target), timeout=cfg.timeout_s)
    except requests.ConnectionError as exc:
        raise _Fail(f"backend down: cannot connect to {target.base_url} ({type(exc).__name__})") from None
    except requests.Timeout:
        raise _Fail(f"no answer within {cfg.timeout_s:.0f} s") from None
    except requests.RequestException as exc:
        raise _Fail(f"request failed: {type(exc).__name__}: {str(exc)[:120]}") from None
    total = time.perf_counter() - t0
    try:
        data = resp.json()
    except ValueError:
        raise _Fail(f"non-JSON answer (HTTP {resp.status_code}): {resp.text[:120]!r}") from None
    if resp.status_code != 200 or (isinstance(data, dict) and data.get("type") == "error"):
        err = data.get("error", data) if isinstance(data, dict) else data
        message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        raise _Fail(http_failure(resp.status_code, message))
    if not isinstance(data, dict):
        raise _Fail("answer is JSON but not an object")
    out = (data.get("usage") or {}).get("output_tokens")
    return data, Timings(ttfb_s=total, total_s=total, output_tokens=out,
                         tokens_per_s=(out / total) if out and total else None)


def http_failure(status: int, message: str) -> str:
    """A failed HTTP answer as a reason; a proxy that cannot reach its backend says 'backend down'."""
    lowered = message.lower()
    down = status in (502, 503, 504) or "cannot connect" in lowered or "connection refused" in lowered \
        or "connection error" in lowered
    return f"{'backend down: ' if down else ''}HTTP {status}: {message[:200]}"


def _body(target: Target, cfg: SmokeConfig, messages: list, **extra: Any) -> dict:
    return {"model": target.model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "messages": messages, **cfg.extra_body, **extra}


def _tool_uses(message: dict) -> list[dict]:
    return [b for b in message.get("content", []) if isinstance(b, dict) and b.get("type") == "tool_use"]


def _texts(message: dict) -> list[str]:
    return [b.get("text", "") for b in message.get("content", []) if isinstance(b, dict) and b.get("type") == "text"]


def validate_tool_use(message: dict, tools: list[dict]) -> str | None:
    """Why this message is not a well-formed forced tool call, or None if it is."""
    uses = _tool_uses(message)
    texts = " ".join(_texts(message))
    if not uses:
        snippet = texts.strip().replace("\n", " ")[:80]
        return f"answered in plain text, no tool_use block (stop_reason {message.get('stop_reason')}): {snippet!r}"
    names = {t["name"]: t for t in tools}
    for use in uses:
        if not use.get("id"):
            return "tool_use block has an empty id"
        if use.get("name") not in names:
            return f"tool_use names {use.get('name')!r}, not an offered tool"
        args = use.get("input")
        if not isinstance(args, dict):
            return f"tool_use input is {type(args).__name__}, not an object"
        missing = [k for k in names[use["name"]]["input_schema"].get("required", []) if k not in args]
        if missing:
            return f"tool_use input lacks required keys {missing}"
    if message.get("stop_reason") != "tool_use":
        return f"stop_reason is {message.get('stop_reason')!r}, not 'tool_use'"
    if RAW_TOOL_CALL.search(texts):
        return "raw tool-call markup left in a text block"
    return None


def _forced_messages(cfg: SmokeConfig) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": TOOL_PROMPT}]
    if cfg.tool_prefill:
        messages.append({"role": "assistant", "content": cfg.tool_prefill})
    return messages


def check_forced_tool(target: Target, cfg: SmokeConfig) -> CheckResult:
    body = _body(target, cfg, _forced_messages(cfg), tools=TOOLS, tool_choice={"type": "any"})
    try:
        data, timings = _post(target, "/v1/messages", body, cfg)
    except _Fail as exc:
        return CheckResult("forced_tool_call", target.route, False, True, str(exc))
    problem = validate_tool_use(data, TOOLS)
    uses = _tool_uses(data)
    return CheckResult("forced_tool_call", target.route, problem is None, True, problem or "structured tool_use",
                       timings, {"tool_use": uses[0] if uses else None, "stop_reason": data.get("stop_reason")})


def check_auto_tool(target: Target, cfg: SmokeConfig) -> CheckResult:
    body = _body(target, cfg, [{"role": "user", "content": TOOL_PROMPT}], tools=TOOLS, tool_choice={"type": "auto"})
    try:
        data, timings = _post(target, "/v1/messages", body, cfg)
    except _Fail as exc:
        return CheckResult("auto_tool_call", target.route, False, False, str(exc))
    problem = validate_tool_use(data, TOOLS)
    return CheckResult("auto_tool_call", target.route, problem is None, False,
                       problem or "chose the tool by itself", timings, {"stop_reason": data.get("stop_reason")})


def check_tool_result(target: Target, cfg: SmokeConfig, *, is_error: bool) -> CheckResult:
    name = "tool_result_error" if is_error else "tool_result"
    messages = [
        {"role": "user", "content": TOOL_PROMPT},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_kvbook_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_kvbook_1",
                                      "content": "Service unavailable" if is_error else "18 C, sunny",
                                      **({"is_error": True} if is_error else {})}]},
    ]
    try:
        data, timings = _post(target, "/v1/messages", _body(target, cfg, messages, tools=TOOLS), cfg)
    except _Fail as exc:
        return CheckResult(name, target.route, False, True, str(exc))
    text = " ".join(_texts(data)).strip()
    if not text and not _tool_uses(data):
        return CheckResult(name, target.route, False, True, "empty answer after the tool result", timings)
    return CheckResult(name, target.route, True, True, "answered after the tool result", timings,
                       {"stop_reason": data.get("stop_reason")})


def iter_sse(resp: requests.Response) -> Iterator[tuple[str | None, str]]:
    """(event, data) pairs of a server-sent-events stream."""
    event: str | None = None
    data: list[str] = []
    for raw in resp.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, "\n".join(data)


def validate_stream(events: list[dict]) -> tuple[str | None, dict]:
    """Why this sequence of Messages stream events is malformed (or None), and the assembled message."""
    if not events:
        return "no events", {}
    if events[0].get("type") != "message_start":
        return f"first event is {events[0].get('type')!r}, not message_start", {}
    if events[-1].get("type") != "message_stop":
        return f"last event is {events[-1].get('type')!r}, not message_stop", {}
    blocks: dict[int, dict] = {}
    open_blocks: set[int] = set()
    stop_reason = None
    for ev in events:
        kind = ev.get("type")
        if kind == "error":
            return f"stream carried an error event: {ev.get('error')}", {}
        if kind == "content_block_start":
            idx: Any = ev.get("index")
            if idx in blocks:
                return f"content block {idx} started twice", {}
            block = dict(ev.get("content_block") or {})
            block["_json"] = ""
            blocks[idx] = block
            open_blocks.add(idx)
        elif kind == "content_block_delta":
            idx = ev.get("index")
            if idx not in open_blocks:
                return f"delta for content block {idx} that is not open", {}
            delta = ev.get("delta") or {}
            if delta.get("type") == "text_delta":
                blocks[idx]["text"] = blocks[idx].get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                blocks[idx]["_json"] += delta.get("partial_json", "")
        elif kind == "content_block_stop":
            idx = ev.get("index")
            if idx not in open_blocks:
                return f"stop for content block {idx} that is not open", {}
            open_blocks.discard(idx)
        elif kind == "message_delta":
            stop_reason = (ev.get("delta") or {}).get("stop_reason")
    if open_blocks:
        return f"content blocks never stopped: {sorted(open_blocks)}", {}
    if stop_reason is None:
        return "no message_delta with a stop_reason", {}
    content = []
    for idx in sorted(blocks):
        block = blocks[idx]
        raw = block.pop("_json")
        if block.get("type") == "tool_use" and raw:
            try:
                block["input"] = json.loads(raw)
            except json.JSONDecodeError:
                return f"input_json_delta fragments of block {idx} do not parse: {raw[:80]!r}", {}
        content.append(block)
    return None, {"content": content, "stop_reason": stop_reason}


def _stream(target: Target, body: dict, cfg: SmokeConfig) -> tuple[list[dict], Timings]:
    t0 = time.perf_counter()
    ttfb = first_text = None
    events: list[dict] = []
    try:
        with requests.post(target.url("/v1/messages"), json={**body, "stream": True}, headers=_headers(target),
                           timeout=cfg.timeout_s, stream=True) as resp:
            if resp.status_code != 200:
                raise _Fail(http_failure(resp.status_code, resp.text))
            for event, data in iter_sse(resp):
                now = time.perf_counter() - t0
                ttfb = ttfb if ttfb is not None else now
                try:
                    payload = json.loads(data)
                except json.JSONDecodeError:
                    raise _Fail(f"non-JSON stream event {event}: {data[:80]!r}") from None
                if not isinstance(payload, dict):
                    raise _Fail(f"stream event {event} is JSON but not an object: {data[:80]!r}")
                if event == "error" or payload.get("type") == "error":
                    events.append({"type": "error", "error": payload.get("error", payload)})
                    continue
                events.append(payload)
                delta = payload.get("delta") or {}
                if first_text is None and delta.get("type") in ("text_delta", "input_json_delta"):
                    first_text = now
    except requests.ConnectionError as exc:
        raise _Fail(f"backend down: cannot connect to {target.base_url} ({type(exc).__name__})") from None
    except requests.Timeout:
        raise _Fail(f"no answer within {cfg.timeout_s:.0f} s") from None
    except requests.RequestException as exc:  # e.g. the backend died mid-stream
        raise _Fail(f"stream broke: {type(exc).__name__}: {str(exc)[:120]}") from None
    total = time.perf_counter() - t0
    out = None
    for ev in events:
        if ev.get("type") == "message_delta":
            out = (ev.get("usage") or {}).get("output_tokens", out)
    gen = total - (first_text or total)
    return events, Timings(ttfb_s=ttfb, first_text_s=first_text, total_s=total, output_tokens=out,
                           tokens_per_s=(out / gen) if out and gen > 0 else None,
                           events=len(events), events_per_s=len(events) / total if total else None)


def check_stream_tool(target: Target, cfg: SmokeConfig, expected_input: dict | None) -> CheckResult:
    body = _body(target, cfg, _forced_messages(cfg), tools=TOOLS, tool_choice={"type": "any"})
    try:
        events, timings = _stream(target, body, cfg)
    except _Fail as exc:
        return CheckResult("stream_tool_call", target.route, False, True, str(exc))
    problem, message = validate_stream(events)
    if problem is None:
        problem = validate_tool_use(message, TOOLS)
    if problem is None and expected_input is not None:
        got = _tool_uses(message)[0].get("input")
        if got != expected_input:
            problem = f"streamed input {got} differs from the non-streamed call's {expected_input}"
    return CheckResult("stream_tool_call", target.route, problem is None, True, problem or "well-formed stream",
                       timings, {"events": len(events)})


def check_stream_text(target: Target, cfg: SmokeConfig) -> CheckResult:
    """A plain streamed answer: the latency and token-rate reference for each route."""
    body = _body(target, cfg, [{"role": "user", "content": TEXT_PROMPT}], max_tokens=cfg.text_tokens)
    try:
        events, timings = _stream(target, body, cfg)
    except _Fail as exc:
        return CheckResult("stream_text", target.route, False, True, str(exc))
    problem, message = validate_stream(events)
    if problem is None and not "".join(_texts(message)).strip():
        problem = "stream carried no text"
    return CheckResult("stream_text", target.route, problem is None, True, problem or "well-formed stream", timings,
                       {"events": len(events)})


def check_text(target: Target, cfg: SmokeConfig) -> CheckResult:
    """The same prompt as stream_text, not streamed: its text (routes compared at temperature 0) and latency."""
    body = _body(target, cfg, [{"role": "user", "content": TEXT_PROMPT}], max_tokens=cfg.text_tokens)
    try:
        data, timings = _post(target, "/v1/messages", body, cfg)
    except _Fail as exc:
        return CheckResult("text", target.route, False, True, str(exc))
    text = "".join(_texts(data))
    return CheckResult("text", target.route, bool(text.strip()), True, "answered" if text.strip() else "no text",
                       timings, {"text": text, "stop_reason": data.get("stop_reason")})


def check_count_tokens(target: Target, cfg: SmokeConfig) -> CheckResult:
    body = {"model": target.model, "messages": [{"role": "user", "content": TOOL_PROMPT}], "tools": TOOLS}
    try:
        data, timings = _post(target, "/v1/messages/count_tokens", body, cfg)
    except _Fail as exc:
        return CheckResult("count_tokens", target.route, False, True, str(exc))
    n = data.get("input_tokens")
    if not isinstance(n, int) or n <= 0:
        return CheckResult("count_tokens", target.route, False, True, f"input_tokens is {n!r}", timings)
    return CheckResult("count_tokens", target.route, True, True, f"{n} input tokens", timings, {"input_tokens": n})


def run_suite(target: Target, cfg: SmokeConfig = SmokeConfig(),
              on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Every check against one route, in a fixed order; on_result sees each result as it lands."""
    results: list[CheckResult] = []

    def keep(result: CheckResult) -> CheckResult:
        results.append(result)
        if on_result:
            on_result(result)
        return result

    forced = keep(check_forced_tool(target, cfg))
    keep(check_auto_tool(target, cfg))
    keep(check_tool_result(target, cfg, is_error=False))
    keep(check_tool_result(target, cfg, is_error=True))
    expected = (forced.details.get("tool_use") or {}).get("input") if forced.passed else None
    keep(check_stream_tool(target, cfg, expected))
    keep(check_stream_text(target, cfg))
    keep(check_count_tokens(target, cfg))
    return results
