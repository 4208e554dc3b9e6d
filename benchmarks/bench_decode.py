"""Decode-speed prediction: a bandwidth roofline (active weights + KV at the current context read once
per token) against measured tokens/s on this machine across contexts. Measures the machine's memory
bandwidth first (numpy copy), then llama-server's own decode timing at each filled context.

    .venv/bin/python benchmarks/bench_decode.py

Prints the measured/bound ratio per context last and writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.memory.roofline import decode_bound  # noqa: E402
from kvbook.model.sources import load_gguf  # noqa: E402
from kvbook.ops.components import model_path  # noqa: E402
from kvbook.ops.llama_server import start_llama_server  # noqa: E402

CONTEXTS = (256, 1024, 2048, 4096, 7000)


def memory_bandwidth_gbps(size_mb: int = 512, repeats: int = 5) -> float:
    """Best of a few large array copies: bytes read + written per second."""
    src = np.ones(size_mb * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def main() -> int:
    bandwidth = memory_bandwidth_gbps()
    model = model_path("smollm2-135m")
    arch = load_gguf(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbook-decode-") as tmp:
        with start_llama_server(["-m", str(model), "-c", "8192", "-np", "1"], run_dir=Path(tmp)) as server:
            for ctx in CONTEXTS:
                prompt = " ".join(["word"] * (ctx - 20))
                resp = requests.post(server.base_url + "/completion", json={
                    "prompt": prompt, "n_predict": 64, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                }, timeout=600).json()
                timings = resp["timings"]
                filled = timings["prompt_n"] + timings["predicted_n"] // 2
                bound = decode_bound(arch, filled, bandwidth)
                measured = timings["predicted_per_second"]
                rows.append({"context": filled, "measured_tokens_per_s": measured,
                             "bound_tokens_per_s": bound.tokens_per_s, "ratio": measured / bound.tokens_per_s,
                             "bytes_per_token": bound.bytes_per_token})
    out = ROOT / "benchmarks" / "results" / "decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1) + "\n")
    print(f"memory bandwidth (numpy copy): {bandwidth:.1f} GB/s; model SmolLM2-135M Q4_1, f16 KV, CPU")
    print(f"{'context':>8} {'MB/token':>9} {'bound tok/s':>12} {'measured':>9} {'measured/bound':>15}")
    for r in rows:
        print(f"{r['context']:8d} {r['bytes_per_token'] / 1e6:9.1f} {r['bound_tokens_per_s']:12.0f} "
              f"{r['measured_tokens_per_s']:9.1f} {r['ratio']:15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
