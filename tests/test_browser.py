"""One real-browser check: JupyterLab in headless Debian Chromium runs the sizing notebook, and a
key press on the context slider changes the live chart.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the playwright Python package; never
`playwright install`. Missing pieces fail the test with the fix, they never skip it.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from kvbook.testing.lab import CHROMIUM, CHROMIUM_ARGS, open_notebook, sizing_lab

# Widget plots only (the static report figures above never change): the breakdown's traces as JSON.
READ_WIDGET_CHART = """() => {
  const plots = [...document.querySelectorAll('.widget-vbox .js-plotly-plot')].filter(p => !p.closest('.kvbook-placement'));
  return JSON.stringify(plots.map(p => (p.data || []).map(t => [t.name, Array.from(t.x || []), Array.from(t.y || [])])));
}"""


@pytest.fixture
def jupyter_lab(tmp_path):
    """JupyterLab serving a copy of the sizing notebook (its summary goes to tmp), always stopped."""
    with sizing_lab(tmp_path) as base:
        yield base, tmp_path / "lab.log"


@pytest.mark.slow
def test_slider_keypress_updates_chart_in_jupyterlab(jupyter_lab):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install -y chromium` "
                    "(never `playwright install`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install playwright (browsers are not needed)")
    base, log = jupyter_lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            open_notebook(page, f"{base}/lab/tree/01-sizing.ipynb")  # the kernel idle, then run every cell
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            slider = page.locator(".widget-hslider", has_text="context (-c)").locator(".noUi-handle").first
            slider.wait_for(state="visible", timeout=120_000)
            page.wait_for_function(f"() => JSON.parse(({READ_WIDGET_CHART})()).length >= 2", timeout=60_000)
            before = page.evaluate(READ_WIDGET_CHART)
            slider.scroll_into_view_if_needed()
            slider.focus()
            t0 = time.perf_counter()
            for _ in range(4):
                page.keyboard.press("ArrowLeft")
            page.wait_for_function(f"(before) => ({READ_WIDGET_CHART})() !== before", arg=before, timeout=20_000)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            after = page.evaluate(READ_WIDGET_CHART)
            print(f"slider key press to changed chart: {elapsed_ms:.0f} ms")
            if os.environ.get("KVBOOK_BROWSER_SCREENSHOT"):  # a picture of the live UI, for review
                page.screenshot(path=os.environ["KVBOOK_BROWSER_SCREENSHOT"], full_page=True)
        except Exception as exc:
            shot = log.parent / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
            except Exception:  # keep the original error
                pass
            raise AssertionError(f"{type(exc).__name__}: {exc}\nscreenshot: {shot}\n"
                                 f"lab log tail:\n{log.read_text()[-2000:]}") from exc
        finally:
            browser.close()
    assert after != before
    # The breakdown's KV bar got shorter: four steps left on the log slider is a smaller context.
    assert _kv_height(after) < _kv_height(before)


def _kv_height(blob: str) -> float:
    return next(t[2][0] for fig in json.loads(blob) for t in fig if t[0] == "KV cache")
