"""Sizing UI responsiveness: handler time per control change (target: p95 < 100 ms per slider change).

    .venv/bin/python benchmarks/bench_widgets.py [--changes 200] [--in-process]

By default the UI is built inside a real ipykernel (started with jupyter_client), so every update
also pays for serialising the widget messages on the kernel's comm channel, as it does in JupyterLab;
`--in-process` measures without a kernel. The scenario is the blog post's (Qwen3.6-35B-A3B, -c 262144,
bf16, -ub 2048, 64 GB M1 Max). The slider walks the whole log range in a scrambled order so each change
is a new context. Prints its figures last and writes benchmarks/results/widgets.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_P95_MS = 100.0
OTHER_CHANGES = 20  # per other control


def measure(changes: int) -> dict:
    """Build the UI, make the changes, return handler times per control (runs wherever it is called)."""
    sys.path.insert(0, str(ROOT / "lib"))
    import numpy as np

    from kvbook.notebook import sizing
    from kvbook.notebook.widgets import build_sizing_ui

    t0 = time.perf_counter()
    ui = build_sizing_ui(sizing.SizingParams(context=262144, cache_type_k="bf16", cache_type_v="bf16", ubatch=2048,
                                             batch=4096, flash_attn="on"))
    build_ms = (time.perf_counter() - t0) * 1000
    steps = round((ui.context.max - ui.context.min) / ui.context.step)  # slider positions - 1
    stride = next(s for s in range(37, steps) if np.gcd(s, steps + 1) == 1)

    def run(label: str, setter, values) -> dict:
        ui.timings.clear()
        wall = []
        for v in values:
            t = time.perf_counter()
            setter(v)
            wall.append((time.perf_counter() - t) * 1000)
        handler = [ms for _, ms in ui.timings]
        assert ui.error is None, ui.error
        return {"control": label, "changes": len(values), "handler_median_ms": float(np.median(handler)),
                "handler_p95_ms": float(np.percentile(handler, 95)), "handler_max_ms": float(np.max(handler)),
                "set_value_median_ms": float(np.median(wall)), "set_value_p95_ms": float(np.percentile(wall, 95))}

    def set_context(v):
        ui.context.value = v

    def set_types(v):
        ui.cache_type_k.value = v
        ui.cache_type_v.value = v

    def set_attr(name):
        return lambda v: setattr(getattr(ui, name), "value", v)

    exps = [ui.context.min + ((i * stride) % (steps + 1)) * ui.context.step for i in range(changes)]
    results = [run("context slider", set_context, [2 ** e for e in exps])]
    cycle = lambda xs: [xs[i % len(xs)] for i in range(OTHER_CHANGES)]  # noqa: E731
    results.append(run("cache types (K and V)", set_types, cycle(["q8_0", "q4_0", "f16", "bf16"])))
    results.append(run("slots", set_attr("slots"), cycle([1, 2, 8, -1])))
    results.append(run("ubatch", set_attr("ubatch"), cycle([512, 1024, 4096, 2048])))
    results.append(run("device", set_attr("device"), cycle(["rtx-4090", "m3-max-128", "this-machine", "m1-max-64"])))
    results.append(run("model", set_attr("model"), cycle(["qwen3.5-27b", "llama-3.1-8b", "gemma-3-27b", "qwen3.6-35b-a3b"])))
    return {"build_ms": build_ms, "controls": results}


def measure_in_kernel(changes: int) -> dict:
    """Run measure() inside a fresh ipykernel; its comm messages are real."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    out: list[str] = []
    try:
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
                f"from bench_widgets import measure\nprint('RESULT ' + json.dumps(measure({changes})))")

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append(f"ERROR {msg['content']['ename']}: {msg['content']['evalue']}\n")

        kc.execute_interactive(code, timeout=600, output_hook=hook)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    text = "".join(out)
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the kernel gave no result:\n{text[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=200, help="slider changes to time")
    ap.add_argument("--in-process", action="store_true", help="no kernel: skip comm message costs")
    args = ap.parse_args()
    data = measure(args.changes) if args.in_process else measure_in_kernel(args.changes)
    slider = data["controls"][0]
    result = {
        "scenario": "qwen3.6-35b-a3b on m1-max-64, -c 262144, bf16 K/V, -ub 2048 -b 4096, -fa on, auto slots",
        "where": "in-process (no kernel)" if args.in_process else "inside an ipykernel (comm messages serialised)",
        "target_p95_ms": TARGET_P95_MS,
        "slider_median_ms": slider["handler_median_ms"],
        "slider_p95_ms": slider["handler_p95_ms"],
        **data,
    }
    out = ROOT / "benchmarks" / "results" / "widgets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"UI built in {data['build_ms']:.0f} ms ({result['where']})")
    for c in data["controls"]:
        print(f"  {c['control']:<22} {c['changes']:>4} changes: handler median {c['handler_median_ms']:6.2f} ms, "
              f"p95 {c['handler_p95_ms']:6.2f} ms, max {c['handler_max_ms']:6.2f} ms")
    ok = slider["handler_p95_ms"] < TARGET_P95_MS
    print(f"context slider: median {slider['handler_median_ms']:.2f} ms, p95 {slider['handler_p95_ms']:.2f} ms over "
          f"{slider['changes']} changes (target p95 < {TARGET_P95_MS:.0f} ms): {'OK' if ok else 'TOO SLOW'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
