"""Planner throughput: configurations per second of the vectorised sweep (target >= 1,000,000/s),
and the ratio to the exact oracle (`llama-fit-params --fit-print on`) per configuration.

    .venv/bin/python benchmarks/bench_sweep.py [--model qwen3.6-35b-a3b] [--oracle-runs 5]

Prints its figures last and writes benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.memory.sweep import sweep  # noqa: E402
from kvbook.model.sources import load_model  # noqa: E402


def time_sweep(arch, n_ctx: int, repeats: int) -> tuple[int, float]:
    ctx = np.arange(1, n_ctx + 1) * 256
    types = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
    slots = np.arange(1, 9)
    configs = len(ctx) * len(types) * len(slots)
    sweep(arch, ctx[:10], types, slots)  # warm caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = sweep(arch, ctx, types, slots)
        _ = res.total_bytes
        best = min(best, time.perf_counter() - t0)
    return configs, best


def time_oracle(model: str, runs: int) -> float | None:
    """Seconds per configuration for llama-fit-params on a synthetic GGUF of the same preset."""
    try:
        import tempfile

        import yaml

        from kvbook.ops.fit_params import run_fit_params
        from kvbook.testing.synthetic import write_synthetic_gguf
    except ImportError as exc:
        print(f"oracle timing skipped: {exc}", file=sys.stderr)
        return None
    meta = yaml.safe_load((ROOT / "params" / "models" / f"{model}.yaml").read_text())["metadata"]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_gguf(meta, Path(tmp) / "m.gguf")
        times = []
        for i in range(runs):
            t0 = time.perf_counter()
            run_fit_params(path, 4096 * (i + 1))
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3.6-35b-a3b")
    ap.add_argument("--contexts", type=int, default=1024, help="context values in the sweep (x 9 types x 8 slot counts)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--oracle-runs", type=int, default=5)
    args = ap.parse_args()
    arch = load_model(args.model)
    configs, seconds = time_sweep(arch, args.contexts, args.repeats)
    rate = configs / seconds
    oracle = time_oracle(args.model, args.oracle_runs) if args.oracle_runs else None
    result = {
        "model": args.model,
        "configs": configs,
        "seconds_best_of": seconds,
        "configs_per_second": rate,
        "target_configs_per_second": 1_000_000,
        "oracle_seconds_per_config": oracle,
        "speedup_vs_oracle": (oracle * rate) if oracle else None,
        "target_speedup": 10_000,
    }
    out = ROOT / "benchmarks" / "results" / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"sweep: {configs} configurations in {seconds * 1000:.1f} ms = {rate:,.0f} configs/s (target 1,000,000)")
    if oracle:
        print(f"oracle: llama-fit-params {oracle:.3f} s per configuration; sweep is {oracle * rate:,.0f}x faster (target 10,000x)")
    return 0 if rate >= 1_000_000 else 1


if __name__ == "__main__":
    raise SystemExit(main())
