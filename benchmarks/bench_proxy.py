"""Route overhead per model-name shape: direct llama-server vs LiteLLM's anthropic/ and openai/ routes, each alias
shape LiteLLM treats differently (a llama-2/llama-3 name picks a Hugging Face tokenizer, a claude-* or command-r name
others), streamed and not, on the bundled SmolLM2. One interleaved run: every repetition asks every target in an
order that rotates, so drift on this shared machine hits all alike; the overhead is the paired difference to direct
within the same repetition.

    .venv/bin/python benchmarks/bench_proxy.py [--reps 10] [--tokens 64] [--aliases a,b,...]

Prints a Markdown table (docs/serving.md holds a copy) and writes benchmarks/results/proxy.json.
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
from kvbook.ops.litellm import alias_routes, start_proxy  # noqa: E402
from kvbook.ops.llama_server import start_llama_server  # noqa: E402
from kvbook.smoke.checks import SmokeConfig, Target, check_stream_text, check_text  # noqa: E402

ALIASES = ("llama-2-7b", "llama-3.1-8b-local", "claude-sonnet-4-5", "command-r", "qwen3", "gemma")
MODES = ("streamed", "not streamed")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def first_byte(target: Target, mode: str, cfg: SmokeConfig) -> float | None:
    """Seconds to the first byte of the answer (streamed: the first event; not streamed: the whole answer)."""
    result = check_stream_text(target, cfg) if mode == "streamed" else check_text(target, cfg)
    return result.timings.ttfb_s if result.passed else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--aliases", default=",".join(ALIASES))
    args = ap.parse_args()
    aliases = tuple(a for a in args.aliases.split(",") if a)
    cfg = SmokeConfig(text_tokens=args.tokens, timeout_s=300)
    samples: dict[tuple[str, str], list[float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="kvbook-proxy-") as tmp:
        run_dir = Path(tmp)
        with start_llama_server(["-m", str(model_path("smollm2-135m")), "-c", "4096", "-np", "1", "-t", "1", "--jinja"],
                                run_dir=run_dir) as server, \
                start_proxy(alias_routes(server.base_url, aliases), run_dir=run_dir) as proxy:
            auth = {"x-api-key": proxy.master_key}
            targets = [Target("direct", server.base_url, "local")]
            targets += [Target(r.backend, proxy.base_url, r.model_name, auth) for r in proxy.routes]
            for t in targets:  # warm-up, not counted
                first_byte(t, "streamed", cfg)
            for rep in range(args.reps):
                for mode in MODES:
                    shift = rep % len(targets)
                    for t in targets[shift:] + targets[:shift]:
                        samples.setdefault((t.model, mode), []).append(first_byte(t, mode, cfg))
    rows = []
    for (model, mode), values in samples.items():
        direct = samples[("local", mode)]
        ok = [v for v in values if v is not None]
        paired = [v - d for v, d in zip(values, direct) if v is not None and d is not None]
        alias = model.split("-via-")[0] if model != "local" else "-"
        route = "direct" if model == "local" else ("openai/" if "-via-" in model else "anthropic/")
        rows.append({"alias": alias, "route": route, "mode": mode, "n": len(ok), "failed": len(values) - len(ok),
                     "first_byte_ms_q1_med_q3": [round(1000 * v, 1) for v in quartiles(ok)] if ok else None,
                     "overhead_ms_q1_med_q3": [round(1000 * v, 1) for v in quartiles(paired)] if paired else None})
    rows.sort(key=lambda r: (r["mode"], r["route"] != "direct", r["alias"], r["route"]))
    out = ROOT / "benchmarks" / "results" / "proxy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"reps": args.reps, "tokens": args.tokens, "rows": rows}, indent=1) + "\n")
    print(f"{args.reps} interleaved repetitions, {args.tokens}-token answers, SmolLM2-135M Q4_1, CPU; "
          f"first byte = first SSE event (streamed) or the whole answer (not streamed); overhead = route minus "
          f"direct in the same repetition")
    print("| alias | route | mode | first byte ms, median (IQR) | overhead vs direct ms, median (IQR) | failed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fb, ov = r["first_byte_ms_q1_med_q3"], r["overhead_ms_q1_med_q3"]
        fb_s = f"{fb[1]:.0f} ({fb[0]:.0f}-{fb[2]:.0f})" if fb else "-"
        ov_s = f"{ov[1]:+.0f} ({ov[0]:+.0f} to {ov[2]:+.0f})" if ov and r["route"] != "direct" else "-"
        print(f"| {r['alias']} | {r['route']} | {r['mode']} | {fb_s} | {ov_s} | {r['failed']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
