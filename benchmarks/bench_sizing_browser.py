"""The sizing panel in a real browser: JupyterLab (as `make lab` starts it) in headless Debian Chromium runs a
working copy of 01-sizing, then every control of the one panel is changed the way a user changes it (key presses on
the slider, typed values committed with Enter, picked options) and the time from the page's input event to the
per-device chart's new data in the page is measured. Target: p95 under 150 ms for every control.

Each change is also split where its time goes, from timestamps taken in the page (performance.now()): the input
event to the first comm message the page sends (the widget's own work), from there to the first plotly update
that comes back (the server, the kernel's handler and the way back), and from there to the bars' new data in
the page (plotly redrawing); the kernel's handler time is read from the kernel (`ui.timings`).

    .venv/bin/python benchmarks/bench_sizing_browser.py [--rounds 5]

Writes benchmarks/results/sizing_browser.json and prints per control median and p95 last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
TARGET_P95_MS = 150.0
PANEL = ".kvbook-sizing"
# Timestamps in the page for one change: the first input event, the first comm message sent, the first plotly
# update received after it, and (set by BARS_CHANGED) when the bars' data changed.
PROBE = """() => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  window.__kv = {};
  for (const ev of ['keydown', 'mousedown', 'input', 'change']) {
    document.addEventListener(ev, () => { if (window.__kv.input === undefined) window.__kv.input = performance.now(); }, true);
  }
  kernel.anyMessage.connect((_, m) => {
    if (m.msg.header.msg_type !== 'comm_msg') return;
    const now = performance.now(), k = window.__kv;
    if (m.direction === 'send') { if (k.input !== undefined && k.sent === undefined) k.sent = now; return; }
    const state = (m.msg.content.data || {}).state || {};
    if (k.sent !== undefined && k.plotly === undefined && state._py2js_update) k.plotly = now;
  });
}"""
READ = """() => { const p = document.querySelector('.kvbook-sizing .js-plotly-plot');
  return p ? JSON.stringify((p.data || []).map(t => [Array.from(t.x || []), Array.from(t.y || [])])) : ''; }"""


def say(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="changes per control")
    ap.add_argument("--screenshot", default="", help="save a picture of the panel once drawn (PNG path)")
    args = ap.parse_args()
    import os

    load_at_start = os.getloadavg()[0]
    from playwright.sync_api import sync_playwright

    from kvbook.testing.lab import CHROMIUM, CHROMIUM_ARGS, KERNEL_EXEC, open_notebook, sizing_lab

    times: dict[str, list[float]] = {}  # change -> new bars in the page
    # per change, where the time went (ms): input -> sent, sent -> plotly update back, -> bars drawn, kernel handler
    parts: dict[str, list[dict[str, float]]] = {}
    searches: dict[str, list[float]] = {}  # change -> the background searches shown
    with tempfile.TemporaryDirectory() as tmp_name, sizing_lab(Path(tmp_name), "\ndevice = 'rtx-4090'") as base:
        log = Path(tmp_name) / "lab.log"
        try:
            say("jupyter lab ready")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1600, "height": 1200})
                page.on("console", lambda m: say(f"console {m.type}: {m.text[:300]}") if m.type in ("error", "warning") else None)
                open_notebook(page, f"{base}/lab/tree/01-sizing.ipynb")
                say("kernel idle: running every cell")
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                page.wait_for_function(f"() => ({READ})() !== ''", timeout=180_000)
                page.wait_for_timeout(3000)  # the first background searches
                say("panel drawn")
                if args.screenshot:
                    page.screenshot(path=args.screenshot, full_page=True)
                errors = page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
                if errors:
                    say("kernel stderr: " + " | ".join(e[-400:] for e in errors))
                panel = page.locator(PANEL)
                page.evaluate(PROBE)

                status = panel.locator(".widget-html").first

                def settle() -> None:
                    """Until the background searches of the last change have landed."""
                    page.wait_for_function("() => { const s = document.querySelector('.kvbook-sizing .widget-html');"
                                           " return s && !s.innerText.includes('searching'); }", timeout=60_000)

                def timed(name: str, act, prepare=None) -> None:
                    settle()
                    if prepare is not None:  # typing into a box: the change is made by its Enter
                        prepare()
                    before = page.evaluate(READ)
                    page.evaluate("() => { window.__kv = {}; }")
                    t0 = time.perf_counter()
                    act()
                    try:
                        page.wait_for_function(f"(b) => {{ if (({READ})() === b) return false;"
                                               " window.__kv.bars = performance.now(); return true; }",
                                               arg=before, timeout=10_000, polling=5)
                    except Exception:  # a change that leaves the bars as they were: not timed
                        say(f"{name}: the bars did not change ({status.inner_text()[:160]!r})")
                        return
                    wall = (time.perf_counter() - t0) * 1000
                    settle()
                    searches.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
                    k = page.evaluate("() => window.__kv")
                    # from the page's own input event when it saw one (Playwright's actionability checks before
                    # the event are the benchmark's, not the panel's), else from the call
                    took = k["bars"] - k["input"] if "input" in k else wall
                    times.setdefault(name, []).append(took)
                    split = {"to_send": k.get("sent", k["bars"]) - k.get("input", k["bars"]),
                             "round_trip": k.get("plotly", k["bars"]) - k.get("sent", k["bars"]),
                             "redraw": k["bars"] - k.get("plotly", k["bars"]),
                             "handler": float(page.evaluate(KERNEL_EXEC, "print(ui.timings[-1][1] if ui.timings else -1)")), "call": wall}
                    parts.setdefault(name, []).append(split)
                    say(f"{name}: bars {took:.0f} ms (send {split['to_send']:.0f}, round trip {split['round_trip']:.0f}"
                        f" of which handler {split['handler']:.0f}, redraw {split['redraw']:.0f}), searches landed"
                        f" {searches[name][-1]:.0f} ms")

                def select(label: str, values: list[str]):
                    box = panel.get_by_label(label, exact=True)
                    for i in range(args.rounds):
                        timed(label, lambda v=values[i % len(values)]: box.select_option(label=v))

                def type_in(label: str, values: list[str]):
                    box = panel.get_by_label(label, exact=True)
                    for i in range(args.rounds):
                        timed(label, lambda: box.press("Enter"), lambda v=values[i % len(values)]: box.fill(v))

                def untimed(label: str, value: str):
                    """Set a dropdown without timing it (a state the next timed control needs)."""
                    settle()
                    panel.get_by_label(label, exact=True).select_option(label=value)
                    page.wait_for_timeout(300)

                handle = panel.locator(".widget-hslider", has_text="context (-c)").locator(".noUi-handle").first
                for i in range(args.rounds * 2):
                    def press(k=("ArrowLeft" if i % 2 else "ArrowRight")):
                        handle.focus()
                        page.keyboard.press(k)
                    timed("context (-c)", press)
                type_in("exact -c", ["200000", "65536", "131072"])
                select("K cache (-ctk)", ["q8_0", "f16"])
                select("V cache (-ctv)", ["q8_0", "f16"])
                select("slots (-np)", ["1", "auto (4, unified)"])
                select("ubatch (-ub)", ["1024", "512"])
                select("-ngl", ["20", "10", "auto (default: fit what the device holds)"])
                type_in("--n-cpu-moe (-1: all)", ["10", "0"])
                select("device", ["2x-rtx-3090", "rtx-4090"])
                untimed("device", "2x-rtx-3090")
                type_in("-ts", ["3,1", "1,1"])
                untimed("K cache (-ctk)", "f16")  # quantized V needs flash attention: -fa off would be refused
                untimed("V cache (-ctv)", "f16")
                for i in range(args.rounds):
                    button = panel.locator(".widget-toggle-buttons button", has_text="off" if i % 2 == 0 else "on")
                    timed("flash attention (-fa)", lambda b=button: b.first.click())
                browser.close()
        except Exception:
            say(f"failed; lab log tail:\n{log.read_text()[-1500:]}")
            raise

    def p95(xs: list[float]) -> float:
        return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]

    def split_medians(splits: list[dict[str, float]]) -> dict[str, float]:
        return {f"{part}_median_ms": round(statistics.median(s[part] for s in splits), 1)
                for part in ("to_send", "round_trip", "handler", "redraw")} | {
                    "from_call_median_ms": round(statistics.median(s["call"] for s in splits), 1),
                    "from_call_p95_ms": round(p95([s["call"] for s in splits]), 1)}

    rows = {name: {"n": len(xs), "median_ms": round(statistics.median(xs), 1), "p95_ms": round(p95(xs), 1),
                   "searches_median_ms": round(statistics.median(searches[name]), 1), **split_medians(parts[name])}
            for name, xs in times.items()}
    every = [x for xs in times.values() for x in xs]
    if every:
        rows["every control"] = {"n": len(every), "median_ms": round(statistics.median(every), 1),
                                 "p95_ms": round(p95(every), 1), "searches_median_ms": round(statistics.median(
                                     [x for xs in searches.values() for x in xs]), 1),
                                 **split_medians([s for ss in parts.values() for s in ss])}
    out = ROOT / "benchmarks" / "results" / "sizing_browser.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target_p95_ms": TARGET_P95_MS, "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
                               "load_at_start": load_at_start, "controls": rows}, indent=1) + "\n")
    for name, r in rows.items():
        mark = "ok" if r["p95_ms"] < TARGET_P95_MS else "OVER"
        print(f"{name:24s} n={r['n']:3d}  median {r['median_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  {mark}"
              f"   (medians: send {r['to_send_median_ms']:.0f}, round trip {r['round_trip_median_ms']:.0f} of which "
              f"handler {r['handler_median_ms']:.0f}, redraw {r['redraw_median_ms']:.0f}; searches landed "
              f"{r['searches_median_ms']:.0f} ms; from Playwright's call: median {r['from_call_median_ms']:.0f},"
              f" p95 {r['from_call_p95_ms']:.0f})")
    print(f"load average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f}")
    return 0 if rows and all(r["p95_ms"] < TARGET_P95_MS for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
