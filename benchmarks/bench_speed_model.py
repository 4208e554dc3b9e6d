"""How well the speed model predicts depths it was not fitted on, on this machine.

    .venv/bin/python benchmarks/bench_speed_model.py [--model smollm2-135m]

Measures llama-bench -d at depths 0, 1024, 2048, 4096, 8192 (-p 256 -n 16 -r 2), fits the affine
time-per-token model on 0, 2048 and 8192, and prints the prediction error at the held-out 1024 and 4096
for prefill and decode (target: within 25%), then what the model predicts for a 6,000-token turn cold and
with 5,500 tokens cached. Writes benchmarks/results/speed_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from kvbook.capacity.speed import fit_speed, held_out_errors
from kvbook.ops.bench import measure_speed
from kvbook.ops.components import model_path

FIT, HELD_OUT = (0, 2048, 8192), (1024, 4096)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    points = measure_speed(model_path(args.model), sorted(FIT + HELD_OUT), threads=os.cpu_count())
    by_depth = {p.depth: p for p in points}
    model = fit_speed([by_depth[d] for d in FIT])
    errors = held_out_errors(model, [by_depth[d] for d in HELD_OUT])
    print(f"{args.model}: fitted on depths {FIT}, checked on {HELD_OUT}")
    print(f"{'depth':>6} {'prefill t/s meas':>17} {'pred':>8} {'err':>7} {'decode t/s meas':>16} {'pred':>8} {'err':>7}")
    for p in points:
        print(f"{p.depth:>6} {p.prefill_tps:>17.1f} {model.prefill.tps(p.depth):>8.1f} "
              f"{100 * (model.prefill.tps(p.depth) - p.prefill_tps) / p.prefill_tps:>6.1f}% {p.decode_tps:>16.1f} "
              f"{model.decode.tps(p.depth):>8.1f} {100 * (model.decode.tps(p.depth) - p.decode_tps) / p.decode_tps:>6.1f}%"
              + ("  (held out)" if p.depth in HELD_OUT else ""))
    med_pp = statistics.median(abs(e[1]) for e in errors)
    med_tg = statistics.median(abs(e[2]) for e in errors)
    cold = model.turn_seconds(6000, 0, 100)
    warm = model.turn_seconds(6000, 5500, 100)
    print(f"held-out median |error|: prefill {med_pp:.1f}%, decode {med_tg:.1f}% (target <= 25%)")
    print(f"a 6,000-token turn with 100 tokens out: cold {sum(cold):.1f} s (prefill {cold[0]:.1f} s), "
          f"5,500 cached {sum(warm):.1f} s (prefill {warm[0]:.1f} s)")
    out = Path(__file__).resolve().parent / "results" / "speed_model.json"
    out.write_text(json.dumps({"model": args.model, "fit_depths": FIT, "held_out": HELD_OUT,
                               "points": [p.__dict__ for p in points],
                               "prefill": model.prefill.__dict__, "decode": model.decode.__dict__,
                               "held_out_errors_pct": errors, "median_abs_error_pct": {"prefill": med_pp, "decode": med_tg},
                               "turn_6000": {"cold_s": cold, "cached_5500_s": warm}}, indent=1) + "\n")
    return 0 if max(med_pp, med_tg) <= 25 else 1


if __name__ == "__main__":
    sys.exit(main())
