"""Start LiteLLM proxies by forking one process that has already imported LiteLLM, instead of running `litellm`.

LiteLLM 1.106.2 spends about 17 s of CPU importing itself on every start (measured with `-X importtime` on a 2-core
machine; 42 s under load), which made proxy starts the largest single cost of `make test`. A fork of a process that
imported it once is ready in about 3 s. The forked proxy runs the same code at the same pin through the same CLI entry
point (`litellm.proxy.proxy_cli.run_server`); only exec is replaced by fork. It is used only where
KVBOOK_LITELLM_FORKSERVER names the server's socket (`make test` sets it for the modules that only need a route);
`kvbook run` and `kvbook serve` as users start them run the `litellm` command.

The forked proxy behaves as a started one: its own session and process group (so group signals reach it), its output
appended to the log file, the given environment and working directory, and it stops when the process that asked for
it dies (in place of PR_SET_PDEATHSIG, whose parent would be the fork server) or when the fork server dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvbook.errors import ServerError

ENV_VAR = "KVBOOK_LITELLM_FORKSERVER"
_PRELOAD_ENV = {"LITELLM_LOG": "INFO"}  # read at import by LiteLLM's logging: the same value every start passes


def socket_path() -> str | None:
    """The fork server's socket when this process should use one, else None (run the `litellm` command)."""
    return os.environ.get(ENV_VAR) or None


def _ask(path: str, request: dict[str, object], timeout_s: float = 10.0) -> dict[str, object]:
    """One JSON request and its JSON answer over the server's Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(path)
        conn.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, object] = json.loads(data or b"{}")
    return answer


def wait_ready(path: str, timeout_s: float) -> None:
    """Wait until the server answers (it binds its socket only once LiteLLM is imported)."""
    deadline = time.monotonic() + timeout_s
    last = "no socket yet"
    while time.monotonic() < deadline:
        try:
            if _ask(path, {"ping": True}).get("pong"):
                return
        except (OSError, ValueError) as exc:
            last = str(exc)
        failed = Path(path + ".failed")
        if failed.exists():
            raise ServerError(f"the LiteLLM fork server at {path} could not start: {failed.read_text()}; "
                              f"unset {ENV_VAR} to run the litellm command instead")
        time.sleep(0.2)
    raise ServerError(f"the LiteLLM fork server at {path} did not answer within {timeout_s:.0f} s ({last}); "
                      f"unset {ENV_VAR} to run the litellm command instead")


class ForkedProcess:
    """A process the fork server started, with the parts of subprocess.Popen that kvbook's process handling uses."""

    def __init__(self, path: str, pid: int):
        self.path, self.pid = path, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                code = _ask(self.path, {"status": self.pid}).get("code")
            except OSError:  # the server is gone, and with it (it takes them along) its children
                code = None if _alive(self.pid) else -signal.SIGTERM
            if isinstance(code, int):
                self.returncode = code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout or 0)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, input: object = None, timeout: float | None = None) -> tuple[None, None]:
        self.wait(timeout)
        return None, None


def _alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def spawn(path: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, ready_timeout_s: float) -> ForkedProcess:
    """Ask the fork server for a proxy started as `argv` (a litellm command line) would be."""
    wait_ready(path, ready_timeout_s)
    answer = _ask(path, {"argv": list(argv), "env": dict(env), "log": str(log_path), "cwd": os.getcwd(),
                         "watch": os.getpid()})
    pid = answer.get("pid")
    if not isinstance(pid, int):
        raise ServerError(f"the LiteLLM fork server refused to start a proxy: {answer.get('error', answer)}")
    return ForkedProcess(path, pid)


# --- the server side: `python -m kvbook.ops.forkserver SOCKET` -------------------------------------------------------


def _watch(pid: int) -> None:
    """In a forked proxy: stop its own process group once the process that asked for it is gone."""
    while _alive(pid):
        time.sleep(0.5)
    os.killpg(os.getpid(), signal.SIGTERM)


def _child(request: dict[str, object]) -> None:
    """In the forked child: become the proxy the request describes; never returns."""
    code = 1
    try:
        os.setsid()
        _die_with_parent()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        log = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        os.chdir(str(request["cwd"]))
        watch = request["watch"]
        assert isinstance(watch, int)
        threading.Thread(target=_watch, args=(watch,), daemon=True).start()
        argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
        sys.argv = ["litellm", *argv[1:]]
        from litellm.proxy.proxy_cli import run_server

        try:
            run_server.main(args=argv[1:], prog_name="litellm", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            print(f"kvbook fork server: the proxy failed to start: {exc!r}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _reap(codes: dict[int, int]) -> None:
    """Collect every exited child's status (as Popen reports it: negative for a signal)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        codes[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _status(pid: int, codes: dict[int, int]) -> int | None:
    """A forked proxy's exit status as Popen reports it, None while it runs. A child that turned zombie after the
    reap above is reaped here (no race with its exit); a pid that was never ours reads as killed."""
    _reap(codes)
    if pid in codes:
        return codes[pid]
    if _alive(pid):
        return None
    try:
        got, status = os.waitpid(pid, 0)  # a zombie child: returns at once
    except ChildProcessError:
        return -signal.SIGKILL
    codes[got] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return codes[got]


def serve(path: str) -> None:
    """Import LiteLLM once, then fork a proxy per request until killed; answers pings and exit statuses."""
    _die_with_parent()
    os.environ.update(_PRELOAD_ENV)
    try:
        import litellm.proxy.proxy_cli
        import litellm.proxy.proxy_server  # noqa: F401
    except BaseException as exc:  # said to every client at once, instead of a wait until their timeout
        Path(path + ".failed").write_text(f"importing LiteLLM failed: {exc!r}")
        raise SystemExit(1) from None

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # clients connect only once it listens
    listener.listen(16)
    listener.settimeout(1.0)
    codes: dict[int, int] = {}
    while True:
        _reap(codes)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            request = json.loads(data or b"{}")
            if request.get("ping"):
                answer: dict[str, object] = {"pong": True}
            elif "status" in request:
                pid = int(request["status"])
                answer = {"code": _status(pid, codes)}
            else:
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    _child(request)
                answer = {"pid": pid}
            conn.sendall(json.dumps(answer).encode() + b"\n")


def start_server(path: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the fork server as a child process (it dies with its parent); returns its Popen."""
    return subprocess.Popen([sys.executable, "-m", "kvbook.ops.forkserver", path], env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    serve(sys.argv[1])
