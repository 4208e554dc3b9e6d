"""Measure prefill and decode speed at several context depths with the build's own llama-bench."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kvbook.capacity.speed import SpeedPoint
from kvbook.errors import BadInput, ServerError


def measure_speed(model: Path, depths: Sequence[int], *, prompt_tokens: int = 256, gen_tokens: int = 16,
                  repetitions: int = 2, threads: int | None = None, extra: Sequence[str] = (),
                  timeout_s: float = 1800.0) -> list[SpeedPoint]:
    """llama-bench -d D -p P -n N at every depth: prefill tokens/s of a P-token chunk and decode tokens/s,
    each after D tokens of context."""
    from kvbook.ops.components import find_tool

    if not depths or any(d < 0 for d in depths):
        raise BadInput("depths must be a non-empty list of non-negative token counts")
    argv = [str(find_tool("llama-bench")), "-m", str(model), "-d", ",".join(map(str, depths)), "-p", str(prompt_tokens),
            "-n", str(gen_tokens), "-r", str(repetitions), "-o", "json", *(["-t", str(threads)] if threads else []),
            *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir(),
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ServerError(f"llama-bench exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    rows = json.loads(proc.stdout)
    pp = {r["n_depth"]: r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0}
    tg = {r["n_depth"]: r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0}
    return [SpeedPoint(d, pp[d], tg[d]) for d in depths if d in pp and d in tg]
