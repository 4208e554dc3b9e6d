"""Regenerate the README's two pictures with the headless Debian Chromium the browser tests use:

    .venv/bin/python tools/docs_screenshots.py [sizing|report]

- docs/img/sizing.png: notebooks/01-sizing.ipynb in JupyterLab (started as `make lab` starts it, on a copy of the
  notebook in a temporary folder), every cell run, the live controls and per-device bars in view;
- docs/img/report.png: the top of the HTML report `kvbook run -f params/runs/blog-post-m1max.yaml` writes.

Nothing in the checkout is touched but the two PNGs. Rerun after changing the sizing notebook or the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvbook.testing.lab import CHROMIUM, CHROMIUM_ARGS, open_notebook, sizing_lab

ROOT = Path(__file__).resolve().parents[1]

IMG = ROOT / "docs" / "img"
VIEWPORT = {"width": 1280, "height": 860}
SIZING_VIEWPORT = {"width": 1280, "height": 1350}  # the controls and the charts below them


def sizing_shot(work: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sizing_lab(work) as base, sync_playwright() as pw:
        log = work / "lab.log"
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport=SIZING_VIEWPORT)
        open_notebook(page, f"{base}/lab/tree/01-sizing.ipynb")
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # the interactive sizing panel: its plots are the widget plots outside the placement view
        ready = ("() => [...document.querySelectorAll('.widget-vbox .js-plotly-plot')]"
                 ".some(p => !p.closest('.kvbook-placement') && (p.data || []).length > 0)")
        deadline = time.monotonic() + 420
        while not page.evaluate(ready):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sizing panel after 420 s; lab log: {log}")
            page.wait_for_timeout(2000)
        page.wait_for_timeout(3000)  # the first search finishes and the bars settle
        page.evaluate("() => { const plot = [...document.querySelectorAll('.widget-vbox .js-plotly-plot')]"
                      ".find(p => !p.closest('.kvbook-placement') && (p.data || []).length);"
                      " plot.closest('.jp-Cell').scrollIntoView({block: 'start'}); }")
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the file browser
        page.add_style_tag(content=".Toastify { display: none !important; }")  # JupyterLab's news prompt
        page.wait_for_timeout(500)
        page.screenshot(path=str(out))
        browser.close()


def report_shot(work: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    run_dir = work / "report"
    subprocess.run([str(Path(sys.executable).parent / "kvbook"), "run", "-f", "params/runs/blog-post-m1max.yaml",
                    "--output-dir", str(run_dir), "--quiet", "--no-fail-on-no-fit"], cwd=ROOT, check=True,
                   env={**os.environ, "KVBOOK_OUTPUTS": str(work / "outputs")})
    html = next(run_dir.glob("*.html"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(html.as_uri(), wait_until="load")
        page.wait_for_timeout(1500)
        # the verdict and the first chart (one bar per device) in view, as a reader scrolls to them
        page.evaluate("() => { const fig = document.querySelector('.plotly-graph-div');"
                      " if (fig) fig.scrollIntoView({block: 'center'}); }")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out))
        browser.close()


def main(argv: list[str]) -> int:
    """No argument: both pictures; `sizing` or `report`: that one."""
    shots = {"sizing": sizing_shot, "report": report_shot}
    names = argv or list(shots)
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvbook-shots-") as tmp:
        for name in names:
            shots[name](Path(tmp), IMG / f"{name}.png")
            print(f"{IMG / name}.png: {(IMG / f'{name}.png').stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
