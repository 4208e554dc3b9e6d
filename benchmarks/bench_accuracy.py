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

from kvbook.ops.components import model_path  # noqa: E402
from kvbook.testing.verify import CASES, run_case  # noqa: E402


def synthetic_rows() -> list[dict]:
    """Every preset as a full-size synthetic GGUF: KV + recurrent MiB, kvbook vs llama-fit-params."""
    import yaml

    from kvbook.memory.rules import plan_memory
    from kvbook.model.sources import load_gguf
    from kvbook.ops.fit_params import run_fit_params
    from kvbook.paths import params_dir
    from kvbook.plan.flags import parse_server_args
    from kvbook.testing.synthetic import write_synthetic_gguf

    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbook-syn-") as tmp:
        for preset in sorted(p.stem for p in (params_dir() / "models").glob("*.yaml")):
            meta = yaml.safe_load((params_dir() / "models" / f"{preset}.yaml").read_text())["metadata"]
            path = write_synthetic_gguf(meta, Path(tmp) / f"{preset}.gguf")
            for ctx in (4096, 65536):
                report = run_fit_params(path, ctx, ["-np", "1"])
                mem = plan_memory(load_gguf(path), parse_server_args(["-m", str(path), "-c", str(ctx), "-np", "1"]))
                rows.append({"preset": preset, "ctx": ctx,
                             "kv_rec_mib_predicted": round((mem.kv_bytes + mem.recurrent_bytes) / 2**20, 2),
                             "kv_rec_mib_fit_params": round(report.kv_mib + report.recurrent_mib, 2)})
    return rows


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
    synthetic = synthetic_rows()
    out = ROOT / "benchmarks" / "results" / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundled": rows, "synthetic": synthetic}, indent=1) + "\n")
    print()
    print("| model | flags | caches exact | KV+rec MiB pred / meas | compute MiB pred / meas (err) | start total MiB pred / meas (err) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | `{' '.join(r['args']) or '(defaults)'}` | {'yes' if not r['mismatches'] else 'NO'} | "
              f"{r['kv_mib_predicted']} / {r['kv_mib_measured']} | {r['compute_mib_predicted']} / {r['compute_mib_measured']} "
              f"({r['compute_error_pct']:+.1f}%) | {r['total_mib_predicted']} / {r['total_mib_measured']} ({r['total_error_pct']:+.2f}%) |")
    print("\n| preset (synthetic GGUF) | -c | KV + recurrent MiB, kvbook | llama-fit-params |")
    print("|---|---|---|---|")
    for r in synthetic:
        print(f"| {r['preset']} | {r['ctx']} | {r['kv_rec_mib_predicted']} | {r['kv_rec_mib_fit_params']} |")
    syn_exact = sum(abs(r["kv_rec_mib_predicted"] - r["kv_rec_mib_fit_params"]) < 0.015 for r in synthetic)
    print(f"synthetic: {syn_exact}/{len(synthetic)} equal to llama-fit-params")
    exact = sum(not r["mismatches"] for r in rows)
    errs = [abs(r["compute_error_pct"]) for r in rows]
    terrs = [abs(r["total_error_pct"]) for r in rows]
    print(f"\ncaches exact in {exact}/{len(rows)} cases; compute error median {statistics.median(errs):.1f}% "
          f"max {max(errs):.1f}%; start total error median {statistics.median(terrs):.2f}% max {max(terrs):.2f}%")
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
