"""Start, health-check and stop a server process; every failure carries the exit code and log tail.

A started process runs in its own process group and is registered so that it is stopped on
normal interpreter exit, on SIGTERM/SIGHUP to the parent, and by the context manager on any
exception (KeyboardInterrupt included).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from pathlib import Path

from kvbook.errors import BadInput, ServerError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host if host != "localhost" else "127.0.0.1", port)) == 0


def check_host(host: str, allow_remote: bool) -> None:
    """Loopback unless the user explicitly allows another address."""
    if host in LOOPBACK:
        return
    if not allow_remote:
        raise BadInput(f"host {host} is not loopback; pass allow_remote=True to expose a server on purpose")


_SIGNAL_MEANING = {
    signal.SIGILL: "SIGILL: the program used an instruction this CPU cannot run",
    signal.SIGSEGV: "SIGSEGV: the program crashed (invalid memory access)",
    signal.SIGABRT: "SIGABRT: the program aborted (a failed assertion; see the log)",
    signal.SIGBUS: "SIGBUS: the program crashed (bus error: a truncated or unreadable mapped file?)",
    signal.SIGKILL: "SIGKILL: the process was killed (out of memory, or by another process)",
}


def describe_exit(code: int | None) -> str:
    """An exit status in words: -4 (Popen) and 132 (a shell's 128+4) both read as SIGILL."""
    if code is None:
        return "still running"
    signum = -code if code < 0 else code - 128 if 128 < code < 160 else 0
    if signum:
        with contextlib.suppress(ValueError):
            meaning = _SIGNAL_MEANING.get(signal.Signals(signum))
            return f"code {code} ({meaning or signal.Signals(signum).name})"
    return f"code {code}"


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Proc(Protocol):
    """What kvbook uses of a started process: subprocess.Popen, or a proxy the LiteLLM fork server started."""

    pid: int

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class ProcessSpec:
    """How to run one server: argv (never a shell string), environment, log file, readiness URL."""

    name: str
    argv: tuple[str, ...]
    host: str
    port: int
    log_path: Path
    ready_paths: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 5.0
    inherit_env: bool = True  # False: `env` is the whole environment
    forkserver: str | None = None  # a LiteLLM fork server's socket (ops/forkserver.py): fork there instead of exec


class ManagedProcess:
    """A running server; use as a context manager so it is always stopped."""

    def __init__(self, spec: ProcessSpec):
        self.spec = spec
        self.proc: Proc | None = None

    @property
    def base_url(self) -> str:
        host = self.spec.host if ":" not in self.spec.host else f"[{self.spec.host}]"
        return f"http://{host}:{self.spec.port}"

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch, then wait until every readiness path answers 200; on failure nothing is left running."""
        import requests

        spec = self.spec
        if port_in_use(spec.host, spec.port):
            raise ServerError(f"{spec.name}: port {spec.port} on {spec.host} is already in use; nothing was started")
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env} if spec.inherit_env else dict(spec.env)
        proc: Proc
        if spec.forkserver:
            from kvbook.ops.forkserver import spawn

            proc = spawn(spec.forkserver, spec.argv, env, spec.log_path, spec.ready_timeout_s)
        else:
            proc = self._exec(env)
        self.proc = proc
        _register(self)
        deadline = time.monotonic() + spec.ready_timeout_s
        pending = list(spec.ready_paths)
        last = "no answer yet"
        try:
            while pending:
                code = proc.poll()
                if code is not None:
                    raise ServerError(
                        f"{spec.name} exited with {describe_exit(code)} before it was ready; log {spec.log_path}:\n"
                        f"{tail(spec.log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"{spec.name} not ready after {spec.ready_timeout_s:.0f} s ({self.base_url}{pending[0]}: {last}); "
                        f"it was stopped. Log {spec.log_path}:\n{tail(spec.log_path)}"
                    )
                try:
                    resp = requests.get(self.base_url + pending[0], timeout=2)
                    last = f"HTTP {resp.status_code}"
                    if resp.status_code == 200:
                        pending.pop(0)
                        continue
                except requests.ConnectionError:
                    last = "connection refused"
                except requests.Timeout:
                    last = "timed out"
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def _exec(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Run the argv as a child in its own session, output appended to the log."""
        spec = self.spec
        with spec.log_path.open("ab") as log:
            try:
                return subprocess.Popen(
                    list(spec.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise ServerError(f"{spec.name}: cannot run {spec.argv[0]} ({exc.strerror})") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The started process's pid (a process that was never started has none: an error)."""
        if self.proc is None:
            raise ServerError(f"{self.spec.name} was never started")
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(self.spec.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        else:
            _signal_group(proc, signal.SIGKILL)  # children left in its group
        _unregister(self)
        return proc.returncode

    def kill(self) -> None:
        """Kill abruptly (fault injection)."""
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)


def die_with_parent() -> None:
    """In the child: get SIGTERM if the parent dies (a killed Jupyter kernel leaves no server behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(proc: Proc, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def kill_group(proc: Proc, wait_s: float = 5.0) -> None:
    """SIGKILL a child's whole process group, reap the child, and wait (bounded) until no live member is left.

    killpg returns before delivery: without the wait a grandchild can still be alive a moment later."""
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=wait_s)
    deadline = time.monotonic() + wait_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in process group pgid (Linux /proc; False elsewhere)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


_HANDLERS: list[bool] = []


def _install_handlers() -> None:
    """Stop our servers on interpreter exit and on SIGTERM/SIGHUP; done when the first process starts,
    never on import, and never over a handler someone else installed."""
    if _HANDLERS:
        return
    _HANDLERS.append(True)
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def _register(mp: ManagedProcess) -> None:
    _install_handlers()
    with _LIVE_LOCK:
        _LIVE.add(mp)


def _unregister(mp: ManagedProcess) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(mp)


def stop_all() -> None:
    """Stop every process this interpreter started and has not stopped yet."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for mp in live:
        with contextlib.suppress(Exception):
            mp.stop()


def live_processes() -> list[ManagedProcess]:
    with _LIVE_LOCK:
        return list(_LIVE)


def _on_signal(signum: int, frame: object) -> None:
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
