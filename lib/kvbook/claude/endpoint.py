"""A loopback endpoint that answers like the Anthropic Messages API and records what the client sends."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvbook.errors import ServerError

_SECRET_HEADERS = {"x-api-key", "authorization", "proxy-authorization", "cookie"}


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

            def do_GET(self) -> None:
                endpoint._handle(self, {})

            def do_HEAD(self) -> None:
                endpoint._handle(self, {})

            def do_POST(self) -> None:
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
