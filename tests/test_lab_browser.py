"""`make lab` as a user meets it: the same entry (`python -m kvbook.notebook.lab`) started from this environment, the
URL it prints opened in headless Debian Chromium, the sizing notebook opened with a running kernel that imports this
checkout's kvbook and logs no "TCP without encryption" warning, cells run and JupyterLab's autosave let fire (its
interval cut to 1 s), and the tracked notebooks left as they were: the saves land in the working copy, never in
notebooks/ (`git status` unchanged).

Needs /usr/bin/chromium and the playwright package (see tests/test_browser.py); missing pieces fail, never skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbook.testing.lab import (CHROMIUM, CHROMIUM_ARGS, KERNEL_EXEC, KERNEL_IDLE, LAB_FLAGS, free_port, jupyter_dirs,
                                open_notebook, running_lab)

ROOT = Path(__file__).resolve().parents[1]
AUTOSAVE_S = 1  # JupyterLab's autosave interval in this test (its default: 120 s)

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
    env = jupyter_dirs(os.environ, tmp_path)
    # the working copies in tmp (the default lab/ is git-ignored, checked below); autosave every second
    env["KVBOOK_LAB_DIR"] = str(tmp_path / "lab")
    autosave = tmp_path / "settings" / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings"
    autosave.parent.mkdir(parents=True)
    autosave.write_text(json.dumps({"autosave": True, "autosaveInterval": AUTOSAVE_S}))
    try:
        with running_lab(argv, ROOT, env, log):
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
                    copy = tmp_path / "lab" / "01-sizing.ipynb"
                    fresh = copy.read_bytes()
                    for _ in range(3):  # the title, the parameters, the first code cell
                        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-cell-and-select-next')")
                    page.wait_for_function(f"() => ({KERNEL_IDLE})() && window.jupyterapp.shell.currentWidget"
                                           ".content.widgets.some(c => c.model.executionCount)", timeout=60_000)
                    # past the autosave interval: the run's execution counts and outputs are saved in the copy
                    deadline = time.monotonic() + 10 * AUTOSAVE_S + 10
                    while copy.read_bytes() == fresh and time.monotonic() < deadline:
                        time.sleep(0.5)
                    saved = copy.read_bytes() != fresh
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
    assert "without encryption" not in log.read_text(), "make lab's kernels run unencrypted:\n" + log.read_text()[-2000:]
    assert saved, f"JupyterLab never autosaved the run within {10 * AUTOSAVE_S + 10} s: this test proves nothing"
    assert '"execution_count": 1' in copy.read_text()
    after = _checkout_state()
    assert after[0] == before[0], "running and autosaving a notebook in make lab rewrote a tracked notebook"
    assert after[1] == before[1], f"make lab left files in the checkout:\n{after[1]}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "lab/01-sizing.ipynb"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "lab/ (make lab's working copies) is not git-ignored"


def test_working_copies_renew_untouched_copies_and_keep_edited_ones(tmp_path) -> None:
    """make lab's copies (no browser): made when missing, renewed when the original changed and the copy's cells
    were not edited (outputs alone do not count), kept with a printed line when they were."""
    import nbformat

    from kvbook.notebook.lab import working_copies

    src, work = tmp_path / "notebooks", tmp_path / "lab"
    src.mkdir()

    def write(path: Path, code: str, output: str = "") -> None:
        cell = nbformat.v4.new_code_cell(code)
        if output:
            cell.outputs = [nbformat.v4.new_output("stream", text=output)]
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(path))

    write(src / "a.ipynb", "x = 1")
    write(src / "b.ipynb", "y = 1")
    assert working_copies(src, work) == []
    assert (work / "a.ipynb").read_bytes() == (src / "a.ipynb").read_bytes()
    write(work / "a.ipynb", "x = 1", output="1\n")  # run and saved in JupyterLab: outputs only
    write(work / "b.ipynb", "y = 2")  # edited by the user
    assert working_copies(src, work) == []  # nothing changed upstream: both copies stay as they are
    assert nbformat.read(str(work / "a.ipynb"), as_version=4).cells[0].outputs and "y = 2" in (work / "b.ipynb").read_text()
    write(src / "a.ipynb", "x = 10")
    write(src / "b.ipynb", "y = 10")
    notes = working_copies(src, work)
    assert "x = 10" in (work / "a.ipynb").read_text()  # renewed: only its outputs differed
    assert "y = 2" in (work / "b.ipynb").read_text()  # kept: the user's edit
    assert len(notes) == 1 and "b.ipynb" in notes[0] and "changed" in notes[0]
