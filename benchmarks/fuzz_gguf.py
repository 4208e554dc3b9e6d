"""Fuzz the GGUF header reader (kvbook.model.ggufio.read_local) for 10 minutes: mutated, truncated and
random headers seeded from the bundled SmolLM2 GGUF, headers built field by field with lying counts,
lengths and types (2^63-byte strings, 2^60-entry arrays, huge n_kv / n_tensors), nested-array bombs
and large but consistent headers at the caps. Each example must end in success or a KvbookError,
within 10 s, with peak RSS at most 256 MiB over the start.

    .venv/bin/python benchmarks/fuzz_gguf.py [--minutes 10]

Prints its figures last, writes benchmarks/results/fuzz_gguf.json, exits 1 on a finding (the input
is saved under /tmp and its path printed).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.ops.components import model_path  # noqa: E402
from kvbook.testing.fuzzing import bench_main, gguf_target  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(bench_main(lambda tmp: gguf_target(model_path("smollm2-135m"), tmp),
                                ROOT / "benchmarks" / "results" / "fuzz_gguf.json"))
