"""One streamed /v1/messages request, timed per event: TTFT, the gaps between streamed tokens, end to end,
and the prompt-cache figures llama-server puts in message_start (cache_read_input_tokens, input_tokens)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from kvbook.errors import BadInput, ServerError
from kvbook.smoke.checks import Target, iter_sse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_loopback(target: Target) -> None:
    """Load is generated against this machine only (a load test on someone else's server is an attack)."""
    host = urlsplit(target.base_url).hostname or ""
    if host not in LOOPBACK:
        raise BadInput(f"load generation is loopback-only; {target.base_url} is not on this machine")


@dataclass(frozen=True)
class Streamed:
    """What one streamed request returned and when (seconds from sending it)."""

    ok: bool
    error: str
    ttft_s: float | None
    e2e_s: float
    gaps_s: tuple[float, ...]  # between successive content deltas
    output_tokens: int
    text: str
    prompt_n: int | None
    cache_n: int | None
    stop_reason: str | None

    @property
    def itl_s(self) -> float | None:
        return sum(self.gaps_s) / len(self.gaps_s) if self.gaps_s else None


def _headers(target: Target) -> dict[str, str]:
    return {"content-type": "application/json", "anthropic-version": "2023-06-01", **target.headers}


def stream_message(target: Target, body: dict[str, Any], *, timeout_s: float = 120.0,
                   session: requests.Session | None = None) -> Streamed:
    """POST a streaming request; never raises for server-side failures (they come back as ok=False)."""
    t0 = time.perf_counter()
    post = (session or requests).post
    ttft = None
    last = 0.0  # set with ttft, read only after it
    gaps: list[float] = []
    text: list[str] = []
    out = 0
    prompt_n = cache_n = None
    stop = None
    try:
        with post(target.url("/v1/messages"), json=body, headers=_headers(target), timeout=timeout_s, stream=True) as resp:
            if resp.status_code != 200:
                return Streamed(False, f"HTTP {resp.status_code}: {resp.text[:160]}", None, time.perf_counter() - t0,
                                (), 0, "", None, None, None)
            for event, data in iter_sse(resp):
                now = time.perf_counter() - t0
                try:
                    ev = json.loads(data)
                except json.JSONDecodeError:
                    return Streamed(False, f"non-JSON stream event {event}: {data[:80]!r}", ttft, now, tuple(gaps),
                                    out, "".join(text), prompt_n, cache_n, stop)
                kind = ev.get("type") if isinstance(ev, dict) else None
                if kind == "error" or event == "error":
                    return Streamed(False, f"stream error: {str(ev.get('error', ev))[:160]}", ttft, now, tuple(gaps),
                                    out, "".join(text), prompt_n, cache_n, stop)
                if kind == "message_start":
                    usage = (ev.get("message") or {}).get("usage") or {}
                    cache_n = int(usage.get("cache_read_input_tokens") or 0)
                    prompt_n = cache_n + int(usage.get("input_tokens") or 0)
                elif kind == "content_block_delta":
                    delta = ev.get("delta") or {}
                    if ttft is None:
                        ttft = now
                    else:
                        gaps.append(now - last)
                    last = now
                    text.append(delta.get("text") or delta.get("thinking") or "")
                elif kind == "message_delta":
                    out = int((ev.get("usage") or {}).get("output_tokens") or out)
                    stop = (ev.get("delta") or {}).get("stop_reason", stop)
    except requests.Timeout:
        return Streamed(False, f"no complete answer within {timeout_s:.0f} s", ttft, time.perf_counter() - t0,
                        tuple(gaps), out, "".join(text), prompt_n, cache_n, stop)
    except requests.RequestException as exc:
        return Streamed(False, f"request failed: {type(exc).__name__}: {str(exc)[:120]}", ttft,
                        time.perf_counter() - t0, tuple(gaps), out, "".join(text), prompt_n, cache_n, stop)
    return Streamed(True, "", ttft, time.perf_counter() - t0, tuple(gaps), out, "".join(text), prompt_n, cache_n, stop)


def count_tokens(target: Target, body: dict[str, Any], timeout_s: float = 60.0) -> int:
    """The server's token count for a request body (POST /v1/messages/count_tokens)."""
    slim = {k: v for k, v in body.items() if k in ("model", "system", "tools", "messages")}
    resp = requests.post(target.url("/v1/messages/count_tokens"), json=slim, headers=_headers(target), timeout=timeout_s)
    if resp.status_code != 200:
        raise ServerError(f"count_tokens answered HTTP {resp.status_code}: {resp.text[:160]}")
    return int(resp.json()["input_tokens"])
