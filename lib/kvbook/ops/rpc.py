"""ggml-rpc-server processes: each one is a llama.cpp device (`--rpc host:port`), on loopback unless the
caller allows another address on purpose."""

from __future__ import annotations

import time
from pathlib import Path

from kvbook.errors import ServerError
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
