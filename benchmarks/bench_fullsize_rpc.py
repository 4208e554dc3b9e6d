"""Full-size synthetic GGUFs (Qwen3.6-35B-A3B, gpt-oss-120b, DeepSeek-V3) over two loopback ggml-rpc-server
devices: llama-fit-params' per-device rows against kvbook's per-device plan for the same flags.

    .venv/bin/python benchmarks/bench_fullsize_rpc.py

Prints one row per device (model, context, compute MiB, fit / kvbook) and a summary; writes
benchmarks/results/fullsize_rpc.json (also the compute terms of every device, for
tools/calibrate_device_compute.py). The GGUFs are sparse (a few MiB on disk) and deleted at the end.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvbook.interface import MiB
from kvbook.ops.fit_devices import compare_devices, format_table
from kvbook.ops.rpc import start_rpc_server
from kvbook.testing.fullsize import FULL_SIZE, write_full_size

REPO = Path(__file__).resolve().parent.parent
FLAG_SETS = [
    ("-c", "32768", "-np", "1", "-ngl", "all", "-fa", "on"),
    ("-c", "32768", "-np", "1", "-ngl", "all", "-fa", "on", "-ub", "2048", "-b", "2048"),
    ("-c", "8192", "-np", "1", "-ngl", "20", "-fa", "on"),
    ("-c", "32768", "-np", "1", "-ngl", "all", "--n-cpu-moe", "20", "-fa", "on"),
    ("-c", "65536", "-np", "1", "-ngl", "all", "-ts", "3,1", "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"),
    ("-c", "16384", "-np", "1", "-ngl", "all", "-fa", "off"),
    ("-c", "32768", "-np", "2", "-ngl", "all", "-fa", "on", "-ub", "256"),
    ("-c", "4096", "-np", "1", "-ngl", "10", "-ts", "1,3", "-fa", "off"),
]


def main() -> int:
    cases = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvbook-fullsize-") as tmp:
        servers = [start_rpc_server(Path(tmp)) for _ in range(2)]
        try:
            eps = [f"{s.spec.host}:{s.spec.port}" for s in servers]
            for name in FULL_SIZE:
                path = write_full_size(name, Path(tmp))
                cases += [compare_devices(path, eps, flags) for flags in FLAG_SETS]
                path.unlink()
        finally:
            for s in servers:
                s.stop()
    print(format_table(cases))
    devices = [d for c in cases for d in c.devices]
    errors = [abs(d.compute_error_pct) for d in devices if d.compute_error_pct is not None]
    print(f"\n{len(cases)} fit-params runs, {len(devices)} device rows in {time.monotonic() - t0:.0f} s: "
          f"weights equal on {sum(d.weights_exact for d in devices)}/{len(devices)}, context (KV + recurrent) "
          f"equal on {sum(d.context_exact for d in devices)}/{len(devices)}; compute |error| median "
          f"{statistics.median(errors):.1f}% max {max(errors):.1f}% (devices >= 1 MiB)")
    out = REPO / "benchmarks" / "results" / "fullsize_rpc.json"
    out.write_text(json.dumps([{"model": c.model, "flags": " ".join(c.flags), "device": d.fit.name,
                                "fit": [d.fit.model_mib, d.fit.repack_mib, d.fit.context_mib, d.fit.compute_mib],
                                "kvbook": [d.weights_bytes / MiB, d.context_bytes / MiB, d.compute_bytes / MiB,
                                           d.server_compute_bytes / MiB]}
                               for c in cases for d in c.devices], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
