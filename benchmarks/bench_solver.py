"""Time of one whole placement search (`kvbook plan --solve`'s solver call) for a model and a device set.

    .venv/bin/python benchmarks/bench_solver.py [--runs 21]

In-process, after one warm-up call (the model already loaded): the median and slowest of `--runs` calls of
`kvbook.plan.solver.solve` per case, the number of placements searched and the ratio to the 50 ms target
(issue "Placement", Deliver 7). Writes benchmarks/results/solver.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kvbook.model.sources import load_model
from kvbook.ops.components import model_path
from kvbook.ops.host import this_machine
from kvbook.plan.devices import load_device, with_rpc
from kvbook.plan.flags import parse_server_args
from kvbook.plan.solver import solve

REPO = Path(__file__).resolve().parent.parent
TARGET_MS = 50.0


def cases() -> list[tuple[str, str, list[str], object, str]]:
    gemma = str(model_path("gemma3-270m"))
    rpc = "127.0.0.1:50052,127.0.0.1:50053,127.0.0.1:50054"
    return [
        ("Gemma 3 270M GGUF, CPU + 3 RPC (0.15/0.25/0.5 GiB), -c open", gemma, ["--rpc", rpc, "-np", "1"],
         with_rpc(this_machine(), tuple(rpc.split(",")), (0.15, 0.25, 0.5)), "max-context"),
        ("Qwen3.6-35B-A3B preset, RTX 4090 + 64 GB host, -c open", "qwen3.6-35b-a3b", ["-np", "1", "-fa", "on"],
         load_device("rtx-4090-host-64"), "max-context"),
        ("gpt-oss-120b preset, RTX 4090 + 64 GB host, -c 65536", "gpt-oss-120b", ["-np", "1", "-c", "65536"],
         load_device("rtx-4090-host-64"), "fastest-decode"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    rows = []
    for name, model, flags_argv, device, objective in cases():
        arch = load_model(model)
        flags = parse_server_args(["llama-server", "-m", model, *flags_argv])
        solution = solve(arch, flags, device, objective)  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            solve(arch, flags, device, objective)
            times.append((time.perf_counter() - t0) * 1000)
        median = statistics.median(times)
        rows.append({"case": name, "objective": objective, "searched": solution.searched, "fitting": solution.fitting,
                     "median_ms": round(median, 1), "max_ms": round(max(times), 1),
                     "ratio_to_target": round(median / TARGET_MS, 2), "runs": args.runs})
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  objective       searched  median ms  max ms  / {TARGET_MS:g} ms")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['objective']:<14}  {r['searched']:>8}  {r['median_ms']:>9}  {r['max_ms']:>6}  "
              f"{r['ratio_to_target']:>5}")
    out = REPO / "benchmarks" / "results" / "solver.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
