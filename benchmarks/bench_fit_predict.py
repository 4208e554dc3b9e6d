"""kvbook's prediction of llama-server's --fit (plan/fit.py) against the pinned llama-server itself.

    .venv/bin/python benchmarks/bench_fit_predict.py

Starts three loopback ggml-rpc-server devices; for each case gives llama-server `--fit-target` margins (reported
free - budget) with --fit on (the default), reads fit's decision from its -lv 4 log (layers and partial layers per
device, what the first partial layer keeps, the MiB fit projects, the context), starts small models for real
(their logged buffers per device) and stops full-size sparse ones once fit has decided; kvbook predicts from the
same command line and the free memory that run logged. Prints a Markdown table (docs/fit.md) and writes
benchmarks/results/fit_predict.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from kvbook.ops.components import model_path
from kvbook.ops.fit_check import FitCase, compare_fit, format_table
from kvbook.ops.rpc import start_rpc_server
from kvbook.testing.synthetic import TINY_MOE, tiny_metadata, write_synthetic_gguf

REPO = Path(__file__).resolve().parent.parent
MOE_META = tiny_metadata("qwen3moe", **{**TINY_MOE,  # twice the tiny shape: fit has layers to move
    "embedding_length": 512, "attention.head_count": 8, "attention.key_length": 64, "attention.value_length": 64,
    "block_count": 8, "feed_forward_length": 1024, "expert_count": 16, "expert_feed_forward_length": 256})


def cases(tmp: Path, full_size: bool = False) -> list[FitCase]:
    """The comparison's cases (tests/test_fit_predict.py runs some). Budgets are what fit may use on each device
    (free - --fit-target); 24564 - 1024 MiB is an RTX 4090 preset's (nvidia-smi total, the default margin)."""
    gemma, smollm = model_path("gemma3-270m"), model_path("smollm2-135m")
    moe = write_synthetic_gguf(MOE_META, tmp / "moe.gguf")
    out = [
        FitCase("gemma3 2 RPC, -c open", gemma, (200, 400), ("-np", "1")),
        FitCase("gemma3 2 RPC, -c set", gemma, (150, 250), ("-c", "8192", "-np", "1")),
        FitCase("smollm2 2 RPC, -c set", smollm, (40, 60), ("-c", "4096", "-np", "1")),
        FitCase("smollm2 2 RPC, -c open", smollm, (60, 80), ("-np", "1")),
        FitCase("MoE 2 RPC, experts move", moe, (30, 30), ("-c", "4096", "-np", "1")),
        FitCase("MoE 1 RPC, experts move", moe, (40,), ("-c", "8192", "-np", "1")),
        FitCase("MoE 2 RPC, -ngl set", moe, (20, 20), ("-np", "1", "-ngl", "99")),
        FitCase("gemma3 1 RPC, -c open", gemma, (300,), ("-np", "1")),
    ]
    if full_size:
        from kvbook.testing.fullsize import write_full_size

        qwen = write_full_size("qwen3.6-35b-a3b", tmp)
        oss = write_full_size("gpt-oss-120b", tmp)
        out += [
            FitCase("Qwen3.6-35B-A3B at an RTX 4090's target (issue case)", qwen, (24564 - 1024,),
                    ("-c", "262144", "-fa", "on"), load=False),
            FitCase("gpt-oss-120b at an RTX 4090's target, no -c (issue case)", oss, (24564 - 1024,), (), load=False),
            FitCase("Qwen3.6-35B-A3B 1 RPC", qwen, (12000,), ("-c", "262144", "-fa", "on"), load=False),
            FitCase("Qwen3.6-35B-A3B 1 RPC, -c open", qwen, (23000,), ("-np", "1", "-fa", "on"), load=False),
            FitCase("Qwen3.6-35B-A3B 2 RPC", qwen, (6000, 8000), ("-c", "65536", "-np", "1", "-fa", "on"), load=False),
            FitCase("gpt-oss-120b 1 RPC, no -c", oss, (12000,), ("-fa", "on"), load=False),
            FitCase("gpt-oss-120b 2 RPC, no -c", oss, (8000, 8000), ("-np", "1"), load=False),
        ]
    return out


def main() -> int:
    full = "--full-size" in sys.argv or "--only-full" in sys.argv
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        servers = [start_rpc_server(tmp) for _ in range(3)]
        try:
            endpoints = [f"{s.spec.host}:{s.spec.port}" for s in servers]
            results = []
            for i, case in enumerate(cases(tmp, full)):
                if "--only-full" in sys.argv and case.load:
                    continue
                t0 = time.monotonic()
                r = compare_fit(case, endpoints, tmp / f"case{i}")
                results.append(r)
                print(f"[{i + 1}] {case.name}: {'same' if r.same_choice else 'DIFFERENT'} "
                      f"({time.monotonic() - t0:.1f} s)\n    real   {r.real}\n    kvbook {r.kvbook}",
                      file=sys.stderr, flush=True)
        finally:
            for s in servers:
                s.stop()
        table = format_table(results).replace(tmp_name, "<tmp>")
    print(table)
    print(f"\n{sum(r.same_choice for r in results)} of {len(results)} cases: the same choice as the real --fit")
    out = REPO / "benchmarks" / "results" / "fit_predict.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"case": r.case.name, "budgets_mib": r.case.budgets_mib, "args": r.case.args,
                                "real": r.real.__dict__, "kvbook": r.kvbook.__dict__, "same_choice": r.same_choice,
                                "logged_mib": r.logged_mib} for r in results], indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
