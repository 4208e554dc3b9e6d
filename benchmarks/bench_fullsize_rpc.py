"""Full-size synthetic GGUFs (Qwen3.6-35B-A3B, gpt-oss-120b, DeepSeek-V3) over two loopback ggml-rpc-server
devices: llama-fit-params' per-device rows against kvbook's per-device plan for the same flags.

    .venv/bin/python benchmarks/bench_fullsize_rpc.py

Prints one row per device (model, context, compute MiB, fit / kvbook) and a summary, then what llama-fit-params
chooses (`--fit-target` margins standing in for smaller devices, ops/solver_fit.py fit_choice) against kvbook's
solver on the same budgets (CHOICES; these files cannot be started, so only the choices are shown); writes
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
from kvbook.model.sources import load_model
from kvbook.ops.fit_devices import compare_devices, format_table
from kvbook.ops.rpc import start_rpc_server
from kvbook.ops.solver_fit import Case, fit_choice
from kvbook.ops.host import this_machine
from kvbook.plan.devices import with_rpc
from kvbook.plan.flags import parse_server_args
from kvbook.plan.solver import solve
from kvbook.testing.fullsize import FULL_SIZE, write_full_size

REPO = Path(__file__).resolve().parent.parent
CHOICES = [  # (model, RPC budgets MiB, the user's flags): fit vs the solver (max-context)
    ("qwen3.6-35b-a3b", (8000, 8000), ("-np", "1", "-fa", "on")),
    ("gpt-oss-120b", (20000, 20000), ("-np", "1", "-fa", "on", "-c", "32768")),
    ("deepseek-v3", (20000, 20000), ("-np", "1", "-fa", "on", "-c", "16384")),
]
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


def _choice(path: Path, eps: list[str], budgets: tuple[int, ...], args: tuple[str, ...]) -> tuple[str, ...]:
    """One CHOICES row: fit's flags (or why it gave up) and the solver's best placement (or its first rejection)."""
    arch = load_model(str(path))
    tokens, note = fit_choice(Case(path.stem, path, budgets, args, "max-context"), eps)
    base = ["-m", str(path), "--rpc", ",".join(eps)]
    device = with_rpc(this_machine(), tuple(eps), tuple(b * MiB / 2**30 for b in budgets))
    solution = solve(arch, parse_server_args([*base, *args]), device, "max-context", top=1)
    best = (" ".join(solution.placements[0].argv[len(base):]) if solution.placements
            else f"none: {solution.rejected[0].reason}" if solution.rejected else "none")
    fit = " ".join(tokens) if tokens else note
    short = fit if len(fit) < 160 else fit[:160] + " ..."
    return (path.stem, "/".join(map(str, budgets)), " ".join(args), f"`{short}`".replace("|", "\\|"),
            f"`{best}`".replace("|", "\\|"))


def main() -> int:
    cases, choices = [], []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvbook-fullsize-") as tmp:
        servers = [start_rpc_server(Path(tmp)) for _ in range(2)]
        try:
            eps = [f"{s.spec.host}:{s.spec.port}" for s in servers]
            for name in FULL_SIZE:
                path = write_full_size(name, Path(tmp))
                cases += [compare_devices(path, eps, flags) for flags in FLAG_SETS]
                choices += [_choice(path, eps, budgets, args) for model, budgets, args in CHOICES if model == name]
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
    print("\n| model | budgets MiB | flags | llama-fit-params chose | kvbook's solver chose |\n|---|---|---|---|---|")
    for row in choices:
        print("| " + " | ".join(row) + " |")
    out = REPO / "benchmarks" / "results" / "fullsize_rpc.json"
    out.write_text(json.dumps([{"model": c.model, "flags": " ".join(c.flags), "device": d.fit.name,
                                "fit": [d.fit.model_mib, d.fit.repack_mib, d.fit.context_mib, d.fit.compute_mib],
                                "kvbook": [d.weights_bytes / MiB, d.context_bytes / MiB, d.compute_bytes / MiB,
                                           d.server_compute_bytes / MiB]}
                               for c in cases for d in c.devices], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
