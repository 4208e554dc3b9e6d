"""A loopback stand-in for the Hugging Face hub (huggingface.co is unreachable from the test machines).

It answers the calls the pinned llama-server makes for `-hf` (common/hf-cache.cpp, common/download.cpp) and
that kvbook makes to plan it: `api/models/REPO/refs` (branches with their commit), `api/models/REPO/tree/
COMMIT?recursive=true` (the file listing), and `REPO/resolve/COMMIT/PATH`, which redirects (302) to a
content URL as the hub does; content answers HEAD (size, ETag, Accept-Ranges), plain GET and Range GET.
Files are local paths served under repo paths; bytes sent per file are counted (to prove headers-only reads).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class HubState:
    """repo -> {path in repo: local file}; the commit every repo is at; what was served."""

    repos: dict[str, dict[str, Path]] = field(default_factory=dict)
    commit: str = hashlib.sha1(b"kvbook-loopback-hub").hexdigest()
    sent: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    authorization: list[str] = field(default_factory=list)  # the Authorization header of each API call


def _handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: httplib did not follow a redirect over keep-alive

        def log_message(self, *args):  # quiet
            pass

        def _json(self, doc: object, status: int = 200) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self) -> None:
            self._json({"error": "Repository or file not found"}, 404)

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            state.requests.append(("HEAD" if head else "GET", self.path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                state.authorization.append(self.headers.get("Authorization") or "")
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                repo = "/".join(parts[2:4])
                if repo not in state.repos:
                    return self._missing()
                if parts[4] == "refs":
                    return self._json({"branches": [{"name": "main", "ref": "refs/heads/main",
                                                     "targetCommit": state.commit}], "tags": [], "converts": []})
                if parts[4] == "tree" and len(parts) >= 6 and parts[5] == state.commit:
                    return self._json([{"type": "file", "path": p, "size": f.stat().st_size,
                                        "oid": hashlib.sha1(p.encode()).hexdigest(),
                                        "lfs": {"oid": hashlib.sha256(p.encode()).hexdigest(),
                                                "size": f.stat().st_size}}
                                       for p, f in state.repos[repo].items()])
                return self._missing()
            if len(parts) >= 5 and parts[2] == "resolve":  # USER/REPO/resolve/COMMIT/PATH -> the content URL
                repo, rest = "/".join(parts[:2]), "/".join(parts[4:])
                if repo not in state.repos or rest not in state.repos[repo] or parts[3] != state.commit:
                    return self._missing()
                self.send_response(302)
                host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"  # type: ignore[index]
                self.send_header("Location", f"http://{host}/cdn/{repo}/{rest}")  # absolute, as the hub's CDN
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if parts[0] == "cdn" and len(parts) >= 4:
                repo, rest = "/".join(parts[1:3]), "/".join(parts[3:])
                file = state.repos.get(repo, {}).get(rest)
                return self._content(file, rest, head) if file else self._missing()
            return self._missing()

        def _content(self, file: Path, name: str, head: bool) -> None:
            size = file.stat().st_size
            rng = self.headers.get("Range")
            start, end, status = 0, size - 1, 200
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start, end, status = int(a), min(int(b) if b else size - 1, size - 1), 206
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{hashlib.sha1(name.encode()).hexdigest()}"')
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            with file.open("rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left > 0:
                    block = fh.read(min(left, 1 << 20))
                    if not block:
                        break
                    try:
                        self.wfile.write(block)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    left -= len(block)
                    state.sent[name] = state.sent.get(name, 0) + len(block)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Hub


class LoopbackHub:
    """Start with the repos to serve; `endpoint` is what MODEL_ENDPOINT should be set to."""

    def __init__(self, repos: Mapping[str, Mapping[str, Path]]):
        self.state = HubState(repos={r: dict(files) for r, files in repos.items()})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
