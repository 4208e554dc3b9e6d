"""Qwen3.6-35B-A3B-MTP at full size (a sparse synthetic GGUF of the bundled preset, UD-Q4_K_M-like mix) on the CPU:
kvbook's plan against the pinned llama-fit-params, and what --spec-type draft-mtp adds in kvbook's plan.

The pinned llama-fit-params has no --spec-type (it answers "invalid argument"), so it cannot size MTP: without it
NextN weights are skipped (no load_mtp), the recurrent state has no rollback rows and there is no MTP context.
What it can check is the same command line without speculation; the MTP additions are kvbook's rules
(memory/speculative.py), checked exactly against the real server on tiny models (tests/test_spec_decoding.py).

Run: .venv/bin/python benchmarks/bench_fullsize_mtp.py [-c 32768]   (about 5 s; a 21 GiB sparse file in a temp dir)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from kvbook.errors import ServerError
from kvbook.interface import MiB
from kvbook.memory.compute import estimate_compute
from kvbook.memory.rules import plan_memory
from kvbook.ops.fit_params import run_fit_params
from kvbook.ops.host import detect_host, host_device, local_request
from kvbook.plan.flags import parse_server_args
from kvbook.testing.fullsize import FULL_SIZE, preset_metadata
from kvbook.testing.synthetic import write_synthetic_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", type=int, default=32768)
    args = ap.parse_args()
    mix = FULL_SIZE["qwen3.6-35b-a3b"]
    with tempfile.TemporaryDirectory(prefix="kvbook-mtp-") as tmp:
        path = write_synthetic_gguf(preset_metadata("qwen3.6-35b-a3b-mtp"), Path(tmp) / "q36-mtp.gguf",
                                    mix.weight_type, mix.overrides)
        common = ["-np", "1", "-ngl", "0", "-t", "1"]
        try:
            run_fit_params(path, args.c, [*common, "--spec-type", "draft-mtp"])
            print("llama-fit-params took --spec-type draft-mtp")
        except ServerError as exc:
            print(f"llama-fit-params --spec-type draft-mtp: {str(exc).splitlines()[-1]}")
        report = run_fit_params(path, args.c, common)
        fit_weights = sum(b.model_mib for b in report.breakdown)  # Host and CPU_REPACK rows, whole MiB each
        fit = report.devices[0]
        host = host_device(detect_host())
        rows = []
        for extra in ([], ["--spec-type", "draft-mtp"]):
            flags = parse_server_args(["-m", str(path), "-c", str(args.c), *common, *extra])
            arch = local_request(flags, host).model
            mem = plan_memory(arch, flags)
            cells = [c.cells for c in mem.caches if c.kind.value != "recurrent"]
            fit_rows = estimate_compute(arch, dataclasses.replace(mem.shape, n_outputs_max=mem.shape.n_ubatch), cells)
            rows.append((" ".join(extra) or "(none)", mem, fit_rows.bytes))
        (_, base, base_fit_compute), (_, mtp, _) = rows
        print(f"full size, -c {args.c} -np 1 -ngl 0 (CPU)        llama-fit-params   kvbook")
        print(f"  weights MiB (no MTP)              {fit_weights:>10} {base.weights_bytes / MiB:>12.2f}")
        print(f"  KV + recurrent MiB (no MTP)       {fit.context_mib:>10} {(base.kv_bytes + base.recurrent_bytes) / MiB:>12.2f}")
        print(f"  compute MiB, fit's 512 output rows{report.memory.compute_mib['CPU']:>10.2f} "
              f"{base_fit_compute / MiB:>12.2f}")
        print("with --spec-type draft-mtp (kvbook only):")
        print(f"  NextN weights          +{(mtp.weights_bytes - base.weights_bytes) / MiB:.2f} MiB")
        print(f"  recurrent state        {base.recurrent_bytes / MiB:.2f} -> {mtp.recurrent_bytes / MiB:.2f} MiB "
              f"(1 + {flags.spec_draft_n_max} rows per slot)")
        d = mtp.draft
        assert d is not None
        print(f"  MTP context            KV {d.kv_bytes / MiB:.2f} MiB, logits {d.output_bytes / MiB:.2f} MiB, "
              f"compute {d.compute.bytes / MiB:.2f} MiB (estimate)")


if __name__ == "__main__":
    main()
