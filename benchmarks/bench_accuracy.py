"""Accuracy: predicted vs measured for every verification case (KV and recurrent exact; compute and
start totals as % error), for the bundled models against the real llama-server, and for synthetic
models of large architectures against llama-fit-params (context = KV + recurrent).

    .venv/bin/python benchmarks/bench_accuracy.py

Prints a markdown table last and writes benchmarks/results/accuracy.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.components import model_path  # noqa: E402
from kvbook.verify import CASES, run_case  # noqa: E402


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbook-acc-") as tmp:
        for name, cases in CASES.items():
            path = model_path(name)
            for args in cases:
                result = run_case(name, path, args, Path(tmp))
                rows.append({**asdict(result), "compute_error_pct": round(result.compute_error_pct, 1),
                             "total_error_pct": round(result.total_error_pct, 2)})
                print(f"{name:13} {' '.join(args) or '(defaults)':55} exact={'yes' if not result.mismatches else 'NO'} "
                      f"compute {result.compute_error_pct:+.1f}% total {result.total_error_pct:+.2f}%", flush=True)
    out = ROOT / "benchmarks" / "results" / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print()
    print("| model | flags | caches exact | KV+rec MiB pred / meas | compute MiB pred / meas (err) | start total MiB pred / meas (err) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | `{' '.join(r['args']) or '(defaults)'}` | {'yes' if not r['mismatches'] else 'NO'} | "
              f"{r['kv_mib_predicted']} / {r['kv_mib_measured']} | {r['compute_mib_predicted']} / {r['compute_mib_measured']} "
              f"({r['compute_error_pct']:+.1f}%) | {r['total_mib_predicted']} / {r['total_mib_measured']} ({r['total_error_pct']:+.2f}%) |")
    exact = sum(not r["mismatches"] for r in rows)
    errs = [abs(r["compute_error_pct"]) for r in rows]
    terrs = [abs(r["total_error_pct"]) for r in rows]
    print(f"\ncaches exact in {exact}/{len(rows)} cases; compute error median {statistics.median(errs):.1f}% "
          f"max {max(errs):.1f}%; start total error median {statistics.median(terrs):.2f}% max {max(terrs):.2f}%")
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
