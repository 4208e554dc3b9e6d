"""`make lab` as a user meets it: the same entry (`python -m kvbook.notebook.lab`) started from this environment, the
URL it prints opened in headless Debian Chromium, the sizing notebook opened with a running kernel that imports this
checkout's kvbook, and the tracked notebooks left as they were (nothing saved into the checkout).

Needs /usr/bin/chromium and the playwright package (see tests/test_browser.py); missing pieces fail, never skip.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbook.testing.lab import CHROMIUM, CHROMIUM_ARGS, LAB_FLAGS, free_port, jupyter_dirs, open_notebook, running_lab

ROOT = Path(__file__).resolve().parents[1]

# Runs code in the open notebook's kernel without touching the notebook document (no cell added, nothing to save).
KERNEL_EXEC = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, silent: false, store_history: false});
  let text = '';
  future.onIOPub = (msg) => { if (msg.header.msg_type === 'stream') text += msg.content.text; };
  await future.done;
  return text;
}"""


def _checkout_state() -> tuple[dict[str, str], str]:
    """The tracked notebooks' sha256, and what git sees as changed or new (not ignored) in the checkout."""
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    return digests, status


@pytest.mark.slow
def test_make_lab_opens_a_notebook_with_a_running_kernel(tmp_path) -> None:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install -y chromium` "
                    "(never `playwright install`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install playwright (browsers are not needed)")
    before = _checkout_state()
    checkpoints = ROOT / "notebooks" / ".ipynb_checkpoints"
    had_checkpoints = checkpoints.exists()
    port = free_port()
    # The Makefile's recipe is `$(VENV)/bin/python -m kvbook.notebook.lab`; only the port, a token-less login and
    # headless flags are added, and Jupyter's config/runtime folders are kept out of the user's home.
    recipe = re.search(r"^lab:.*\n(?:\t.*\n)*?\t\$\(VENV\)/bin/python (-m kvbook\.notebook\.lab)\s*$",
                       (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "make lab no longer runs `$(VENV)/bin/python -m kvbook.notebook.lab`; update this test"
    argv = [sys.executable, *recipe.group(1).split(), *LAB_FLAGS, f"--port={port}"]
    log = tmp_path / "lab.log"
    try:
        with running_lab(argv, ROOT, jupyter_dirs(os.environ, tmp_path), log):
            printed = re.findall(r"http://127\.0\.0\.1:\d+/lab\S*", log.read_text())
            assert printed, f"make lab printed no URL to open:\n{log.read_text()[-2000:]}"
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                try:
                    open_notebook(page, printed[0].split("?")[0].rstrip("/") + "/tree/01-sizing.ipynb", 90_000)
                    title = page.evaluate("() => window.jupyterapp.shell.currentWidget.title.label")
                    kvbook_file = page.evaluate(KERNEL_EXEC, "import kvbook; print(kvbook.__file__)")
                    status = page.locator(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus").count()
                except Exception as exc:
                    page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                    raise AssertionError(f"{type(exc).__name__}: {exc}\nscreenshot: {tmp_path / 'failure.png'}\n"
                                         f"lab log tail:\n{log.read_text()[-2000:]}") from exc
                finally:
                    browser.close()
    finally:
        if not had_checkpoints:  # JupyterLab's checkpoint copy (git-ignored): not left behind by a test
            shutil.rmtree(checkpoints, ignore_errors=True)
    assert title == "01-sizing.ipynb"
    assert Path(kvbook_file.strip()).resolve() == (ROOT / "lib" / "kvbook" / "__init__.py").resolve(), kvbook_file
    assert status >= 1  # the notebook toolbar shows its kernel
    time.sleep(0.5)
    after = _checkout_state()
    assert after[0] == before[0], "opening a notebook in make lab rewrote a tracked notebook"
    assert after[1] == before[1], f"make lab left files in the checkout:\n{after[1]}"
