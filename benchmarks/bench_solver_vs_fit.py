"""kvbook's placement solver against llama.cpp's --fit (the pinned llama-fit-params) on the same inputs.

    .venv/bin/python benchmarks/bench_solver_vs_fit.py

Starts three loopback ggml-rpc-server devices; for each case gives llama-fit-params `--fit-target` margins
(reported free - budget) and kvbook the same budgets (`--rpc-gib`), starts each side's chosen flags in a real
llama-server at -lv 4 and prints a Markdown table: each side's flags, the RPC devices' logged model + KV +
compute MiB, whether that is within the budgets, the context and the host-RAM bytes read per token (kvbook's
roofline measure, applied to both). Writes benchmarks/results/solver_vs_fit.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from kvbook.ops.components import model_path
from kvbook.ops.rpc import start_rpc_server
from kvbook.ops.solver_fit import Case, compare, format_table
from kvbook.testing.synthetic import TINY_MOE, tiny_metadata, write_synthetic_gguf

REPO = Path(__file__).resolve().parent.parent
MOE_META = tiny_metadata("qwen3moe", **TINY_MOE)


def cases(tmp: Path) -> list[Case]:
    """The comparison's cases (tests/test_solver_vs_fit.py runs a subset)."""
    gemma, smollm = model_path("gemma3-270m"), model_path("smollm2-135m")
    moe = write_synthetic_gguf(MOE_META, tmp / "moe.gguf")
    return [
        Case("gemma3 2 RPC, -c fixed", gemma, (150, 250), ("-c", "4096", "-np", "1"), "fastest-decode"),
        Case("gemma3 2 RPC, one small", gemma, (100, 700), ("-c", "8192", "-np", "1"), "fastest-decode"),
        Case("smollm2 3 RPC", smollm, (40, 40, 60), ("-c", "4096", "-np", "1"), "fastest-decode"),
        Case("gemma3 2 RPC, -c open", gemma, (200, 400), ("-np", "1"), "max-context"),
        Case("gemma3 2 RPC, -c open, fastest", gemma, (200, 400), ("-np", "1"), "fastest-decode"),
        Case("gemma3 user -ngl 12, -c open", gemma, (200, 400), ("-np", "1", "-ngl", "12"), "max-context"),
        Case("MoE 2 RPC, small", moe, (40, 40), ("-c", "4096", "-np", "1", "-ctk", "f16", "-ctv", "f16"), "fastest-decode"),
        Case("MoE user --cpu-moe", moe, (40, 40), ("-c", "4096", "-np", "1", "--cpu-moe"), "fastest-decode"),
        Case("MoE user --cpu-moe, smaller", moe, (16, 16), ("-c", "4096", "-np", "1", "--cpu-moe"), "fastest-decode"),
    ]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        servers = [start_rpc_server(tmp) for _ in range(3)]
        try:
            endpoints = [f"{s.spec.host}:{s.spec.port}" for s in servers]
            results = []
            for i, case in enumerate(cases(tmp)):
                eps = endpoints[:len(case.budgets_mib)]
                results.append(compare(case, eps, tmp / f"case{i}"))
                print(f"[{i + 1}] {case.name}: fit {'fits' if results[-1].fit.fits else 'no'}, "
                      f"kvbook {'fits' if results[-1].kvbook.fits else 'no'}", file=sys.stderr, flush=True)
        finally:
            for s in servers:
                s.stop()
        table = format_table(results).replace(tmp_name, "<tmp>")
    for ep in endpoints:
        table = table.replace(ep, "<rpc>")
    print(table)
    out = REPO / "benchmarks" / "results" / "solver_vs_fit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{**asdict(r), "case": {**asdict(r.case), "model": r.case.model.name}} for r in results],
                              indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
