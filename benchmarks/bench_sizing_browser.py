"""The sizing panel in a real browser: JupyterLab (as `make lab` starts it) in headless Debian Chromium runs a
working copy of 01-sizing, then every control of the one panel is changed the way a user changes it (key presses on
the slider, typed values, picked options) and the time from the change to the per-device chart's new data in the
page is measured. Target: p95 under 150 ms for every control.

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
READ = """() => { const p = document.querySelector('.kvbook-sizing .js-plotly-plot');
  return p ? JSON.stringify((p.data || []).map(t => [Array.from(t.x || []), Array.from(t.y || [])])) : ''; }"""


def say(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="changes per control")
    ap.add_argument("--screenshot", default="", help="save a picture of the panel once drawn (PNG path)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from kvbook.testing.lab import CHROMIUM, CHROMIUM_ARGS, open_notebook, sizing_lab

    times: dict[str, list[float]] = {}  # change -> new bars in the page
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

                status = panel.locator(".widget-html").first

                def settle() -> None:
                    """Until the background searches of the last change have landed."""
                    page.wait_for_function("() => { const s = document.querySelector('.kvbook-sizing .widget-html');"
                                           " return s && !s.innerText.includes('searching'); }", timeout=60_000)

                def timed(name: str, act) -> None:
                    settle()
                    before = page.evaluate(READ)
                    t0 = time.perf_counter()
                    act()
                    try:
                        page.wait_for_function(f"(b) => ({READ})() !== b", arg=before, timeout=10_000)
                    except Exception:  # a change that leaves the bars as they were: not timed
                        say(f"{name}: the bars did not change ({status.inner_text()[:160]!r})")
                        return
                    times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
                    settle()
                    searches.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
                    say(f"{name}: bars {times[name][-1]:.0f} ms, searches landed {searches[name][-1]:.0f} ms")

                def select(label: str, values: list[str]):
                    box = panel.get_by_label(label, exact=True)
                    for i in range(args.rounds):
                        timed(label, lambda v=values[i % len(values)]: box.select_option(label=v))

                def type_in(label: str, values: list[str]):
                    box = panel.get_by_label(label, exact=True)
                    for i in range(args.rounds):
                        def act(v=values[i % len(values)]):
                            box.fill(v)
                            box.press("Enter")
                        timed(label, act)

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
                select("device", ["2x-rtx-3090"])
                type_in("-ts", ["3,1", "1,1"])
                for i in range(args.rounds):
                    button = panel.locator(".widget-toggle-buttons button", has_text="off" if i % 2 == 0 else "on")
                    timed("flash attention (-fa)", lambda b=button: b.first.click())
                browser.close()
        except Exception:
            say(f"failed; lab log tail:\n{log.read_text()[-1500:]}")
            raise

    def p95(xs: list[float]) -> float:
        return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]

    rows = {name: {"n": len(xs), "median_ms": round(statistics.median(xs), 1), "p95_ms": round(p95(xs), 1),
                   "searches_median_ms": round(statistics.median(searches[name]), 1)}
            for name, xs in times.items()}
    every = [x for xs in times.values() for x in xs]
    if every:
        rows["every control"] = {"n": len(every), "median_ms": round(statistics.median(every), 1),
                                 "p95_ms": round(p95(every), 1), "searches_median_ms": round(statistics.median(
                                     [x for xs in searches.values() for x in xs]), 1)}
    out = ROOT / "benchmarks" / "results" / "sizing_browser.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import os

    out.write_text(json.dumps({"target_p95_ms": TARGET_P95_MS, "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
                               "controls": rows}, indent=1) + "\n")
    for name, r in rows.items():
        mark = "ok" if r["p95_ms"] < TARGET_P95_MS else "OVER"
        print(f"{name:24s} n={r['n']:3d}  median {r['median_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  {mark}"
              f"   (searches landed: median {r['searches_median_ms']:.0f} ms)")
    return 0 if rows and all(r["p95_ms"] < TARGET_P95_MS for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
