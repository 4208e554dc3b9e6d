"""Fit the per-device compute coefficients (data/compute_coefficients.json 'per_device') used with RPC devices.

    .venv/bin/python tools/calibrate_device_compute.py            # refit on llama-fit-params rows, check on real runs
    .venv/bin/python tools/calibrate_device_compute.py --check    # print the errors only

Fitted on the full-size synthetic models' llama-fit-params rows (benchmarks/bench_fullsize_rpc.py's flag sets,
re-run here: two loopback ggml-rpc-servers, a few seconds); held out: the real llama-server runs of
benchmarks/results/placement.json (tests/test_rpc_placement.py's flag sets on small models, their logged
`sched_reserve` compute buffers). Terms: plan/placement.py compute_terms; the fit is a small grid search that
minimises the largest relative error, then the median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from kvbook.interface import MiB  # noqa: E402
from kvbook.memory.rules import plan_memory  # noqa: E402
from kvbook.model.sources import load_model  # noqa: E402
from kvbook.ops.fit_params import rpc_fit_devices, run_fit_params  # noqa: E402
from kvbook.ops.rpc import start_rpc_server  # noqa: E402
from kvbook.ops.host import detect_host  # noqa: E402
from kvbook.plan.devices import effective_device, host_device, with_rpc  # noqa: E402
from kvbook.plan.flags import parse_server_args  # noqa: E402
from kvbook.plan.placement import CPU, SCHED_MAX_COPIES, compute_terms, device_compute, pipeline_parallel  # noqa: E402
from kvbook.plan.planner import _rpc_layers_n, offload_of  # noqa: E402

DATA = ROOT / "lib" / "kvbook" / "data" / "compute_coefficients.json"


def _terms(path: Path, eps: list[str], flags: list[str], n_outputs: int | None):
    argv = ["-m", str(path), "--rpc", ",".join(eps), *flags, "--fit", "off"]
    server = parse_server_args(argv)
    arch = load_model(str(path))
    host = detect_host()
    device = effective_device(with_rpc(host_device(host), server.rpc, host=host), server)
    memory = plan_memory(arch, server)
    off = offload_of(arch, server, device)
    pp = pipeline_parallel(arch, len(off.devices), _rpc_layers_n(arch, off, server), server.split_mode,
                           server.no_kv_offload, server.cpu_moe_layers != 0)
    n_out = min(memory.shape.n_ubatch, server.batch) if n_outputs is None else n_outputs
    return off, compute_terms(arch, memory, off, copies=SCHED_MAX_COPIES if pp else 1,
                              cpu_moe_layers=server.cpu_moe_layers, no_kv_offload=server.no_kv_offload, n_outputs=n_out)


def fit_rows(tmp: Path) -> list[tuple[str, dict, float]]:
    """(label, terms, measured bytes) for every device of the full-size llama-fit-params runs."""
    from bench_fullsize_rpc import FLAG_SETS

    from kvbook.testing.fullsize import FULL_SIZE, write_full_size

    rows = []
    servers = [start_rpc_server(tmp) for _ in range(2)]
    try:
        eps = [f"{s.spec.host}:{s.spec.port}" for s in servers]
        for name in FULL_SIZE:
            path = write_full_size(name, tmp)
            for flags in FLAG_SETS:
                flags = list(flags)
                ctx = int(flags[flags.index("-c") + 1])
                rest = flags[:flags.index("-c")] + flags[flags.index("-c") + 2:]
                fit = rpc_fit_devices(run_fit_params(path, ctx, ["--rpc", ",".join(eps), *rest]), eps)
                off, terms = _terms(path, eps, flags, None)
                for d in fit:
                    dev = CPU if d.endpoint is None else next(x for x in off.devices if d.endpoint in x)
                    if d.compute_mib >= 1.0 and dev in terms:
                        rows.append((f"{name} {' '.join(flags)} {d.name}", terms[dev], d.compute_mib * MiB))
            path.unlink()
    finally:
        for s in servers:
            s.stop()
    return rows


def server_rows(tmp: Path) -> list[tuple[str, dict, float]]:
    """The same for the real llama-server runs in benchmarks/results/placement.json (n_outputs = slots)."""
    from bench_placement import models
    from test_rpc_placement import CASES

    paths = models(tmp)
    logged = json.loads((ROOT / "benchmarks" / "results" / "placement.json").read_text())
    rows = []
    for model, n, flags in CASES:
        eps = [f"127.0.0.1:{50000 + i}" for i in range(3)][:n]
        n_seq = plan_memory(load_model(str(paths[model])), parse_server_args(
            ["-m", str(paths[model]), "--rpc", ",".join(eps), *flags])).shape.n_seq
        off, terms = _terms(paths[model], eps, list(flags), n_seq)
        names = ["CPU", *off.devices]
        for r in logged:
            if r["model"] == model and r["flags"] == " ".join(flags) and r["bound"] and r["compute_mib"][1] >= 1.0:
                dev = next((x for x in names if x.split("[")[0] == r["device"]), None)
                if dev in terms:
                    rows.append((f"{model} {' '.join(flags)} {r['device']}", terms[dev], r["compute_mib"][1] * MiB))
    return rows


def errors(rows, coef) -> list[float]:
    return [(device_compute({CPU if label.endswith((" CPU", " Host")) else "d": t}, coef).popitem()[1] - m) / m * 100
            for label, t, m in rows]


def fit(rows) -> dict:
    best = None
    grid = {"mask": (1.0,), "embd": (1.0, 1.5, 2.0), "embd_cpu": (1.0, 1.5, 2.0, 2.5, 3.0),
            "act": tuple(x / 10 for x in range(10, 41, 2)), "scores": (0.5, 0.75, 1.0, 1.25), "output_act": (0.0, 0.25, 0.5, 1.0),
            "moe": (0.0, 2.0, 3.0, 4.0, 5.0, 6.0)}
    for values in itertools.product(*grid.values()):
        coef = dict(zip(grid, values))
        e = [abs(x) for x in errors(rows, coef)]
        key = (statistics.median(e) + max(e) / 4, max(e))
        if best is None or key < best[0]:
            best = (key, coef)
    return best[1]


def summary(e: list[float]) -> str:
    a = [abs(x) for x in e]
    return f"{len(a)} devices: median |error| {statistics.median(a):.1f}%, max {max(a):.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    doc = json.loads(DATA.read_text())
    with tempfile.TemporaryDirectory(prefix="kvbook-devcompute-") as tmp:
        train = fit_rows(Path(tmp))
        held = server_rows(Path(tmp))
    coef = doc["per_device"]["coef"] if args.check else fit(train)
    e_train, e_held = errors(train, coef), errors(held, coef)
    for (label, _, m), e in zip(train + held, e_train + e_held):
        print(f"{label}: measured {m / MiB:.2f} MiB, error {e:+.1f}%")
    print("coefficients:", coef)
    for name in ("qwen3.6-35b-a3b", "gpt-oss-120b", "deepseek-v3"):  # leave one full-size model out
        rest, out = [r for r in train if not r[0].startswith(name)], [r for r in train if r[0].startswith(name)]
        print(f"fitted without {name}, on it:", summary(errors(out, fit(rest))))
    print("fit-params (full-size):", summary(e_train))
    print("llama-server RPC runs (held out):", summary(e_held))
    big = [e for (_, _, m), e in zip(held, e_held) if m >= 5 * MiB]
    print("  of them, buffers >= 5 MiB:", summary(big))
    if not args.check:
        doc["per_device"] = {"coef": coef, "calibrated_on": "llama-fit-params rows of 3 full-size synthetic models "
                             "(24 flag sets x 3 devices); held out: 16 real llama-server RPC runs of small models",
                             "fit_median_error_pct": round(statistics.median(map(abs, e_train)), 1),
                             "fit_max_error_pct": round(max(map(abs, e_train)), 1),
                             "held_out_median_error_pct": round(statistics.median(map(abs, e_held)), 1),
                             "held_out_max_error_pct": round(max(map(abs, e_held)), 1),
                             "held_out_max_error_pct_5mib": round(max(abs(e) for (_, _, m), e in zip(held, e_held)
                                                                     if m >= 5 * MiB), 1),
                             "points": len(train), "held_out_points": len(held)}
        DATA.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
