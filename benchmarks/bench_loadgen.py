"""Is the load generator ever the bottleneck? Its own cost per request against llama-server's time per request.

    .venv/bin/python benchmarks/bench_loadgen.py [--concurrency 4] [--scale 1.0]

Runs the same Claude-Code-shaped sessions (the installed client's captured request, full size by default,
3 turns) at one concurrency against (a) kvbook's stand-in server, which streams 24 tokens as fast as it can,
and (b) the pinned llama-server with SmolLM2 (a scaled shape, 2 slots). Prints the generator's CPU time per
request, the stand-in's requests/s (the generator's ceiling) and the ratio of generator CPU per request to
llama-server's median end-to-end time (target: under 0.05). Writes benchmarks/results/loadgen.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvbook.capacity.workload import Workload, run_nonce
from kvbook.load.generator import ServerFacts, run_level
from kvbook.load.standin import StandIn
from kvbook.notebook import capacity as cap
from kvbook.ops.components import model_path
from kvbook.smoke.checks import Target


def _cpu_per_request(target: Target, shape, workload: Workload, c: int, facts: ServerFacts, prefix: int):
    t0 = time.process_time()
    run = run_level(target, shape, workload, c, sessions=2 * c, facts=facts, prefix_tokens=prefix, nonce=run_nonce())
    cpu = (time.process_time() - t0) / len(run.turns)
    return run, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.02, help="prompt scale for the llama-server half")
    args = parser.parse_args()
    full, _, scaled = cap.capture_shapes(args.scale)
    workload = Workload(turns=3, max_tokens=24)
    with StandIn(tokens=24) as s:
        stand_run, stand_cpu = _cpu_per_request(Target("standin", s.base_url, "x"), full, workload, args.concurrency,
                                                ServerFacts(args.concurrency, 10**7), 0)
    stand_rps = len(stand_run.turns) / stand_run.wall_s
    with tempfile.TemporaryDirectory() as tmp, cap.serve(
            model_path("smollm2-135m"), ["-c", "8192", "-np", "2", "-t", "2", "--jinja", "--chat-template-file",
                                         "params/templates/smollm2-chatml-tools.jinja"], Path(tmp)) as served:
        nonce = run_nonce()
        cap.warm_up(served.target, scaled, nonce)
        real_run, real_cpu = _cpu_per_request(served.target, scaled, workload, args.concurrency, served.facts,
                                              cap.prefix_tokens(served, scaled, nonce))
    real_e2e = statistics.median(t.streamed.e2e_s for t in real_run.turns)
    real_rps = len(real_run.turns) / real_run.wall_s
    ratio = real_cpu / real_e2e
    print(f"stand-in, full-size Claude Code shape ({full.client}), concurrency {args.concurrency}: "
          f"{stand_rps:.0f} requests/s, generator CPU {1000 * stand_cpu:.1f} ms/request")
    print(f"llama-server SmolLM2, scale {args.scale}: {real_rps:.2f} requests/s, median end-to-end {1000 * real_e2e:.0f} ms, "
          f"generator CPU {1000 * real_cpu:.1f} ms/request")
    print(f"generator CPU per request / llama-server time per request = {ratio:.4f} (target < 0.05); "
          f"stand-in ceiling / llama-server rate = {stand_rps / real_rps:.0f}x")
    out = Path(__file__).resolve().parent / "results" / "loadgen.json"
    out.write_text(json.dumps({"concurrency": args.concurrency, "standin_rps": stand_rps, "standin_cpu_s": stand_cpu,
                               "llama_rps": real_rps, "llama_e2e_median_s": real_e2e, "llama_cpu_s": real_cpu,
                               "ratio": ratio}, indent=1) + "\n")
    return 0 if ratio < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
