"""ggml-rpc-server processes: each one is a llama.cpp device (`--rpc host:port`), on loopback unless the
caller allows another address on purpose."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput, ServerError
from kvbook.ops.procs import ManagedProcess, ProcessSpec, check_host, free_port, port_in_use, tail


def start_rpc_server(run_dir: Path, *, host: str = "127.0.0.1", port: int | None = None, threads: int = 1,
                     binary: Path | None = None, allow_remote: bool = False, ready_timeout_s: float = 30.0) -> ManagedProcess:
    """Start one ggml-rpc-server from the same build as llama-server and wait until it accepts connections;
    stopped like every other kvbook process (its own group, on exit and on SIGTERM)."""
    from kvbook.ops.components import find_tool

    check_host(host, allow_remote)
    port = port or free_port(host)
    exe = binary or find_tool("ggml-rpc-server")
    spec = ProcessSpec(name=f"ggml-rpc-server {host}:{port}", argv=(str(exe), "-H", host, "-p", str(port), "-t", str(threads)),
                       host=host, port=port, log_path=run_dir / f"rpc-{port}.log", ready_paths=())
    proc = ManagedProcess(spec)
    proc.start()
    deadline = time.monotonic() + ready_timeout_s
    while not port_in_use(host, port):
        if not proc.alive() or time.monotonic() > deadline:
            code = proc.stop()
            raise ServerError(f"{spec.name} did not accept connections (exit {code}); log {spec.log_path}:\n"
                              f"{tail(spec.log_path)}")
        time.sleep(0.05)
    return proc


def check_rpc_endpoints(endpoints: Sequence[str], timeout_s: float = 2.0) -> None:
    """Before llama-server starts: each --rpc host:port must accept a connection, else one line (llama-server
    itself aborts with 'Failed to connect to ...' and a backtrace while it reads its arguments)."""
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        except (OSError, ValueError) as exc:
            why = exc.strerror or type(exc).__name__ if isinstance(exc, OSError) else str(exc)
            raise ServerError(f"--rpc {ep}: cannot connect ({why}); start ggml-rpc-server there or fix the endpoint "
                              "(the plan used the declared budgets; llama-server would abort at start)") from None


@dataclass(frozen=True)
class RpcHost:
    """One ggml-rpc-server kvbook starts on this machine: its bind address, port (0: a free one), threads."""

    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 1


def parse_rpc_hosts(entries: Sequence[Any]) -> tuple[RpcHost, ...]:
    """Params-file entries ("host:port", "host", or {host, port, threads}) -> RpcHost, one clear line on bad input."""
    out = []
    for i, entry in enumerate(entries):
        where = f"rpc_servers[{i}]"
        if isinstance(entry, str):
            host, _, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "0")
            entry = {"host": host, "port": port_text}
        if not isinstance(entry, dict) or set(entry) - {"host", "port", "threads"}:
            raise BadInput(f"{where}: give 'host:port' or a mapping of host, port, threads")
        try:
            port, threads = int(entry.get("port", 0)), int(entry.get("threads", 1))
        except (TypeError, ValueError):
            raise BadInput(f"{where}: port and threads must be whole numbers") from None
        host = str(entry.get("host", "127.0.0.1")).strip("[]")
        if not host or not 0 <= port <= 65535 or not 1 <= threads <= 256:
            raise BadInput(f"{where}: needs a host, a port 0..65535 (0: any free one) and 1..256 threads")
        out.append(RpcHost(host, port, threads))
    return tuple(out)


@contextlib.contextmanager
def rpc_servers(hosts: Sequence[RpcHost], run_dir: Path, *, allow_remote: bool = False) -> Iterator[list[str]]:
    """Start every RPC server (this machine only), yield their host:port endpoints, stop them all on exit."""
    for h in hosts:
        check_host(h.host, allow_remote)
        if h.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"kvbook: warning: ggml-rpc-server on {h.host} has no authentication; anyone who can reach "
                  f"{h.host}:{h.port or '<port>'} can use this machine's memory and CPU", file=sys.stderr, flush=True)
    started: list[ManagedProcess] = []
    try:
        for h in hosts:
            started.append(start_rpc_server(run_dir, host=h.host, port=h.port or None, threads=h.threads,
                                            allow_remote=allow_remote))
        yield [f"{p.spec.host}:{p.spec.port}" for p in started]
    finally:
        for p in reversed(started):
            p.stop()
