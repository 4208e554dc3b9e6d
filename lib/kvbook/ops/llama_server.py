"""Launch llama-server from typed flags: plan first, loopback by default, log at -lv 4 in the run
folder, and read back what it really allocated."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import BadInput
from kvbook.interface import Device, Plan, ServerFlags, Verdict
from kvbook.ops.logparse import LoggedMemory, parse_draft_log, parse_log
from kvbook.ops.procs import ManagedProcess, ProcessSpec, check_host, free_port
from kvbook.ops.rpc import check_rpc_endpoints
from kvbook.plan.flags import parse_server_args

# Flags kvbook sets itself when it launches a server.
_OWNED = {"--host", "--port", "-lv", "--verbosity", "--log-verbosity", "--log-file", "-v", "--verbose"}


def launch_args(flags: ServerFlags, host: str, port: int, api_key: str | None = None) -> list[str]:
    """The user's llama-server flags with host, port and verbosity set by kvbook."""
    args = list(flags.argv)
    if args and not args[0].startswith("-"):
        args = args[1:]
    out: list[str] = []
    skip = False
    for i, token in enumerate(args):
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in _OWNED:
            skip = "=" not in token and name not in ("-v", "--verbose")
            continue
        out.append(token)
    out += ["--host", host, "--port", str(port), "-lv", "4"]
    if api_key:
        out += ["--api-key", api_key]
    return out


@dataclass
class LlamaServer:
    """A running llama-server with its plan and log."""

    process: ManagedProcess
    flags: ServerFlags
    plan: Plan | None

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def log_path(self) -> Path:
        return self.process.spec.log_path

    def measured(self) -> LoggedMemory:
        """What the server logged about its allocations."""
        return parse_log(self.log_path.read_text(errors="replace"))

    def measured_draft(self) -> LoggedMemory | None:
        """What the server logged about the draft model's context (-md), or None."""
        return parse_draft_log(self.log_path.read_text(errors="replace"))

    def stop(self) -> int | None:
        return self.process.stop()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_llama_server(
    server_args: list[str] | ServerFlags,
    *,
    binary: Path | None = None,
    run_dir: Path,
    device: Device | None = None,
    force: bool = False,
    host: str = "127.0.0.1",
    port: int | None = None,
    allow_remote: bool = False,
    api_key: str | None = None,
    ready_timeout_s: float = 120.0,
    plan_first: bool = True,
) -> LlamaServer:
    """Plan, refuse when it will not fit (unless force), start, wait for /health."""
    from kvbook.ops.components import find_llama_server
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import local_request
    from kvbook.plan.api import plan as make_plan

    flags = server_args if isinstance(server_args, ServerFlags) else parse_server_args(server_args, os.environ)
    check_host(host, allow_remote)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise BadInput(f"llama-server on {host} would be reachable from the network: give it an API key")
    plan = None
    from kvbook.ops.router import is_router

    if plan_first and is_router(flags):
        raise BadInput("router mode (no -m, models from --models-preset/--models-dir): kvbook plans it (kvbook plan) "
                       "but starts one model per llama-server; give -m MODEL")
    if plan_first:
        plan = make_plan(local_request(flags, device), fit_fallback=FIT_PARAMS)
        if plan.verdict is Verdict.DOES_NOT_FIT and not force:
            need = max(u.need_bytes for u in plan.pools) / 2**30
            raise BadInput(
                f"the plan says this will not fit ({need:.2f} GiB needed on {plan.device.name}); "
                f"largest context that fits: {plan.max_ctx}. Use force=True (--force) to launch anyway"
            )
    binary = binary or find_llama_server()
    check_rpc_endpoints(flags.rpc)
    crowded = thread_oversubscription(flags.argv)
    if crowded:
        print(f"kvbook: {crowded}", file=sys.stderr, flush=True)
    port = port or free_port(host)
    spec = ProcessSpec(
        name="llama-server",
        argv=(str(binary), *launch_args(flags, host, port, api_key)),
        host=host,
        port=port,
        log_path=run_dir / f"llama-server-{port}.log",
        ready_paths=("/health",),
        ready_timeout_s=ready_timeout_s,
    )
    process = ManagedProcess(spec)
    process.start()
    return LlamaServer(process=process, flags=flags, plan=plan)


def _threads(argv: list[str] | tuple[str, ...]) -> int | None:
    """The -t/--threads value of a llama-server argv, or None when unset (or unreadable)."""
    for i, token in enumerate(argv):
        name, _, inline = token.partition("=")
        if name in ("-t", "--threads"):
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            n = int(value) if value.lstrip("-").isdigit() else 0
            return n if n > 0 else None  # -t -1 / 0: llama.cpp's default, one per core
    return None


def running_llama_servers() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every llama-server process on this machine (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if argv and Path(argv[0]).name == "llama-server":
            found.append((int(entry.name), argv))
    return found


def thread_oversubscription(argv: list[str] | tuple[str, ...], cores: int | None = None,
                            others: list[tuple[int, list[str]]] | None = None) -> str | None:
    """A warning when this server plus those already running (`others`, default: every llama-server on this
    machine) want more CPU threads than there are cores.

    llama.cpp's worker threads spin while they wait; oversubscribed, two servers on this 2-core machine
    decoded at 0.4 tokens/s instead of ~150 (measured)."""
    import os

    cores = cores or os.cpu_count() or 1
    others = running_llama_servers() if others is None else others
    if not others:
        return None
    want = (_threads(argv) or cores) + sum(_threads(a) or cores for _, a in others)
    if want <= cores:
        return None
    pids = ", ".join(str(pid) for pid, _ in others[:3])
    return (f"warning: {len(others)} other llama-server(s) already running (pid {pids}); together they want {want} CPU "
            f"threads on {cores} cores, and oversubscribed llama.cpp threads spin and crawl: give each server -t "
            f"so the sum stays <= {cores}")
