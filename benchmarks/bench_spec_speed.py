"""Speculative decoding's speed on the real llama-server against kvbook's speed model, in one run.

    .venv/bin/python benchmarks/bench_spec_speed.py [--model smollm2-135m] [--rounds 3] [--no-ngram]

1. Synthetic acceptance (--spec-synth-len L, the pinned build's benchmarking switch): the model drafts for itself
   (draft-simple, -md = -m, so a drafted token costs one target token) with N = 1 and 3 and several L. For each N
   the batch cost is fitted on the server whose drafts are all rejected (L = 1) and the others are predicted; a
   second prediction takes the batch cost from llama-bench's (N+1)-token batches instead. Also printed: the
   speculative server's speed at L over its speed at L = 1, which the model says is L (a step costs the same
   whatever is accepted), free of the plain server's noise.
2. n-gram drafts on an agent-like copy turn (ngram-mod, ngram-simple), where acceptance is real: the server's own
   acceptance and mean tokens per step, and the speed-up (no model prediction: n-gram acceptance is not i.i.d.).

Requests alternate between a plain and a speculative server so that load on a shared machine cancels in each ratio;
the load average is printed before and after. Writes benchmarks/results/spec_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from kvbook.capacity.speed import batch_extra_from_rejections
from kvbook.ops.components import model_path
from kvbook.ops.spec_bench import SpecCase, batch_extras, measure_ngram, measure_spec_speed

CASES = [SpecCase(1, 1.0), SpecCase(1, 1.5), SpecCase(1, 2.0), SpecCase(3, 1.0), SpecCase(3, 2.5), SpecCase(3, 4.0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ngram", action="store_true")
    args = parser.parse_args()
    model = model_path(args.model)
    load_before = os.getloadavg()
    print(f"{args.model} drafting for itself, -t 1; load average {load_before[0]:.2f} ({os.cpu_count()} cores)",
          flush=True)
    bench_extra = batch_extras(model, [c.n_draft + 1 for c in CASES], depth=64, threads=1)
    with tempfile.TemporaryDirectory(prefix="kvbook-spec-") as tmp:
        runs = measure_spec_speed(model, model, CASES, Path(tmp), threads=1, n_predict=64, rounds=args.rounds)
        ngram = [] if args.no_ngram else [measure_ngram(model, t, Path(tmp) / "ngram", rounds=args.rounds)
                                          for t in ("ngram-mod", "ngram-simple")]
    fitted = {m.case.n_draft: batch_extra_from_rejections(m.measured_speedup, m.case.n_draft, 1.0)
              for m in runs if m.case.mean_length == 1.0}
    at_one = {m.case.n_draft: m.spec_tps for m in runs if m.case.mean_length == 1.0}
    print(f"batch cost per extra token: fitted on L=1 {', '.join(f'N={n}: {v:.2f}' for n, v in fitted.items())}; "
          f"llama-bench {', '.join(f'b={b}: {v:.2f}' for b, v in bench_extra.items())}")
    head = (f"{'N':>2} {'L set':>5} {'L real':>6} {'p':>5} {'plain t/s':>9} {'spec t/s':>8} {'speed-up':>8} "
            f"{'pred(fit)':>9} {'ratio':>6} {'pred(bench)':>11} {'ratio':>6} {'spec/spec@L1':>12}")
    print(head)
    rows, ratios = [], []
    for m in runs:
        n = m.case.n_draft
        fit_pred = m.predicted_speedup(1.0, fitted[n])
        bench_pred = m.predicted_speedup(1.0, bench_extra[n + 1])
        held_out = m.case.mean_length != 1.0
        if held_out:
            ratios.append(m.measured_speedup / fit_pred)
        print(f"{n:>2} {m.case.mean_length:>5.2f} {m.realized_length:>6.2f} {m.case.acceptance:>5.2f} "
              f"{m.baseline_tps:>9.1f} {m.spec_tps:>8.1f} {m.measured_speedup:>8.3f} {fit_pred:>9.3f} "
              f"{m.measured_speedup / fit_pred:>6.2f} {bench_pred:>11.3f} {m.measured_speedup / bench_pred:>6.2f} "
              f"{m.spec_tps / at_one[n]:>12.2f}" + ("" if held_out else "  (fit)"))
        rows.append({"n_draft": n, "synth_len": m.case.mean_length, "realized_len": m.realized_length,
                     "acceptance": m.case.acceptance, "plain_tps": m.baseline_tps, "spec_tps": m.spec_tps,
                     "speedup": m.measured_speedup, "predicted_fit": fit_pred, "predicted_bench": bench_pred,
                     "spec_over_rejected": m.spec_tps / at_one[n]})
    for g in ngram:
        print(f"{g.spec_type}: agent copy turn, server acceptance {g.acceptance:.2f} of {g.drafted} drafted, mean "
              f"{g.mean_length:.1f} tokens per step; plain {g.baseline_tps:.1f} t/s, speculative {g.spec_tps:.1f} t/s: "
              f"x{g.measured_speedup:.2f}")
    load_after = os.getloadavg()
    worst = max(abs(r - 1) for r in ratios)
    print(f"held-out measured/predicted speed-up (fit): {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(target within 35%); load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    out = Path(__file__).resolve().parent / "results" / "spec_speed.json"
    out.write_text(json.dumps({"model": args.model, "threads": 1, "load_average": [load_before[0], load_after[0]],
                               "batch_extra_fitted": fitted, "batch_extra_llama_bench": bench_extra,
                               "synthetic": rows, "ngram": [g.__dict__ | {"speedup": g.measured_speedup}
                                                            for g in ngram]}, indent=1) + "\n")
    return 0 if worst <= 0.35 else 1


if __name__ == "__main__":
    sys.exit(main())
