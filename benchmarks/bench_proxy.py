"""Proxy overhead: direct llama-server vs LiteLLM anthropic/ vs LiteLLM openai/, per request and per
streamed event, on the bundled SmolLM2 with long streamed outputs. The routes are interleaved (the order
rotates every repetition) so drift on this shared machine hits all three alike.

    .venv/bin/python benchmarks/bench_proxy.py [--reps 20] [--tokens 256]

Prints medians and IQRs last and writes benchmarks/results/proxy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.ops.components import model_path  # noqa: E402
from kvbook.ops.litellm import ROUTE_ANTHROPIC, ROUTE_OPENAI, default_routes, start_proxy  # noqa: E402
from kvbook.ops.llama_server import start_llama_server  # noqa: E402
from kvbook.smoke.checks import SmokeConfig, Target, check_stream_text  # noqa: E402


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    cfg = SmokeConfig(text_tokens=args.tokens, timeout_s=300)
    samples: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="kvbook-proxy-") as tmp:
        run_dir = Path(tmp)
        with start_llama_server(["-m", str(model_path("smollm2-135m")), "-c", "4096", "-np", "1", "--jinja"],
                                run_dir=run_dir) as server, \
                start_proxy(default_routes(server.base_url), run_dir=run_dir) as proxy:
            auth = {"x-api-key": proxy.master_key}
            targets = [Target("direct", server.base_url, "local"),
                       Target("litellm-anthropic", proxy.base_url, ROUTE_ANTHROPIC, auth),
                       Target("litellm-openai", proxy.base_url, ROUTE_OPENAI, auth)]
            for t in targets:  # warm-up, not counted
                check_stream_text(t, cfg)
            for rep in range(args.reps):
                order = targets[rep % 3:] + targets[: rep % 3]
                for t in order:
                    r = check_stream_text(t, cfg)
                    if r.passed:
                        samples.setdefault(t.route, []).append(r.timings)
    result = {"reps": args.reps, "tokens": args.tokens, "routes": {}}
    direct = samples.get("direct", [])
    d_total = statistics.median(x.total_s for x in direct) if direct else None
    for route, timings in samples.items():
        totals = [x.total_s for x in timings]
        ttfb = [x.ttfb_s for x in timings]
        events = [x.events for x in timings]
        rates = [x.tokens_per_s for x in timings if x.tokens_per_s]
        ev_med = statistics.median(events)
        overhead = statistics.median(totals) - d_total if d_total is not None else None
        result["routes"][route] = {
            "n": len(timings),
            "total_s_q1_med_q3": quartiles(totals),
            "ttfb_s_q1_med_q3": quartiles(ttfb),
            "events_median": ev_med,
            "tokens_per_s_median": statistics.median(rates) if rates else None,
            "overhead_s_vs_direct": overhead,
            "overhead_ms_per_event": (1000 * overhead / ev_med) if overhead is not None and ev_med else None,
        }
    out = ROOT / "benchmarks" / "results" / "proxy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.reps} interleaved repetitions, {args.tokens} streamed tokens, SmolLM2-135M Q4_1, CPU")
    print(f"{'route':18} {'total ms (IQR)':>24} {'ttfb ms (IQR)':>22} {'events':>7} {'tok/s':>7} {'overhead ms':>12} {'ms/event':>9}")
    for route, r in result["routes"].items():
        q1, med, q3 = (1000 * v for v in r["total_s_q1_med_q3"])
        t1, tm, t3 = (1000 * v for v in r["ttfb_s_q1_med_q3"])
        ov = r["overhead_s_vs_direct"]
        pe = r["overhead_ms_per_event"]
        print(f"{route:18} {med:9.1f} ({q1:7.1f}-{q3:7.1f}) {tm:7.1f} ({t1:6.1f}-{t3:6.1f}) {r['events_median']:7.0f} "
              f"{(r['tokens_per_s_median'] or 0):7.1f} {1000 * ov if ov is not None else 0:12.1f} {pe or 0:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
