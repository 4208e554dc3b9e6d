"""A stand-in /v1/messages server that streams a fixed answer as fast as it can: against it, the time a
request takes is the load generator's own overhead (JSON, HTTP, threads), the floor under every figure."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away is not an error here


class StandIn:
    """Loopback server on a free port; `with StandIn(tokens=24) as s: s.base_url`."""

    def __init__(self, tokens: int = 24):
        self.tokens = tokens
        self.requests = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandIn:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with owner._lock:
                    owner.requests += 1
                prompt = len(json.dumps(body)) // 4
                events = [("message_start", {"type": "message_start", "message": {
                    "id": "standin", "type": "message", "role": "assistant", "content": [], "model": "standin",
                    "usage": {"cache_read_input_tokens": 0, "input_tokens": prompt, "output_tokens": 0}}}),
                    ("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})]
                events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": " ok"}})] * owner.tokens
                events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                           ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                              "usage": {"output_tokens": owner.tokens}}),
                           ("message_stop", {"type": "message_stop"})]
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for name, data in events:
                    self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="kvbook-standin", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
