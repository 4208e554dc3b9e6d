"""One real-browser check: JupyterLab in headless Debian Chromium runs the sizing notebook, and a
key press on the context slider changes the live chart.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the playwright Python package; never
`playwright install`. Missing pieces fail the test with the fix, they never skip it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kvbook.notebook.lab import lab_argv, lab_env

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# Widget plots only (the static report figures above never change): the breakdown's traces as JSON.
READ_WIDGET_CHART = """() => {
  const plots = [...document.querySelectorAll('.widget-vbox .js-plotly-plot')].filter(p => !p.closest('.kvbook-placement'));
  return JSON.stringify(plots.map(p => (p.data || []).map(t => [t.name, Array.from(t.x || []), Array.from(t.y || [])])));
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline_s: float = 90) -> None:
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}; log tail:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"jupyter lab not ready at {url} after {deadline_s}s ({last}); log tail:\n{log.read_text()[-3000:]}")


@pytest.fixture
def jupyter_lab(tmp_path):
    """JupyterLab serving a copy of the sizing notebook (its summary goes to tmp), always stopped."""
    import nbformat

    nb = nbformat.read(str(ROOT / "notebooks" / "01-sizing.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\noutput_dir = {str(tmp_path / 'out')!r}"
    nbformat.write(nb, str(tmp_path / "01-sizing.ipynb"))
    port = _free_port()
    env = lab_env()  # what `make lab` gives its kernels, with kvbook's offline settings
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[var] = str(tmp_path / "jupyter" / sub)
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            lab_argv(tmp_path, ["--allow-root", "--no-browser", f"--port={port}", "--ServerApp.token=",
                                "--ServerApp.password=", "--LabApp.expose_app_in_browser=True"]),
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/api/status", log)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


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
            page.goto(f"{base}/lab/tree/01-sizing.ipynb", wait_until="domcontentloaded")
            page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=90_000)
            # wait for the kernel, then run every cell
            page.wait_for_function(
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
                " && w.sessionContext.session.kernel.status === 'idle'; }", timeout=90_000)
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
