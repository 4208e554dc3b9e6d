"""Fuzz the llama-server command-line parser (kvbook.plan.flags.parse_server_args) for 10 minutes:
plausible command lines built from every spelling the pinned build knows (values apart, inline
--flag=value, odd numbers, 5000-digit integers), token soups and random text. Each example must end
in success or a KvbookError, within 10 s, with peak RSS at most 256 MiB over the start.

    .venv/bin/python benchmarks/fuzz_flags.py [--minutes 10]

Prints its figures last, writes benchmarks/results/fuzz_flags.json, exits 1 on a finding (the argv
is saved as JSON under /tmp and its path printed).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.testing.fuzzing import bench_main, flags_target  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(bench_main(lambda tmp: flags_target(), ROOT / "benchmarks" / "results" / "fuzz_flags.json"))
