"""JupyterLab in headless Debian Chromium, for the browser tests, the sizing benchmark and the docs screenshots: one
way to start a throwaway JupyterLab (Jupyter's config, runtime and workspace folders kept out of the user's home)
and to wait for a notebook's kernel. Never `playwright install`: Debian's chromium is the browser."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# a token-less, headless JupyterLab whose app object the page can reach (window.jupyterapp)
LAB_FLAGS = ("--allow-root", "--no-browser", "--ServerApp.token=", "--ServerApp.password=",
             "--LabApp.expose_app_in_browser=True")
# true once the open notebook's kernel is idle
KERNEL_IDLE = ("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
               " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
               " && w.sessionContext.session.kernel.status === 'idle'; }")

# Runs code in the open notebook's kernel without touching the notebook document (no cell added, nothing to save);
# resolves to what it printed.
KERNEL_EXEC = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, silent: false, store_history: false});
  let text = '';
  future.onIOPub = (msg) => { if (msg.header.msg_type === 'stream') text += msg.content.text; };
  await future.done;
  return text;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, deadline_s: float = 90) -> None:
    """Until `url` answers 200, or fail with the log's tail when the process exits or the deadline passes."""
    end = time.monotonic() + deadline_s
    last: OSError | None = None
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


def jupyter_dirs(env: Mapping[str, str], folder: Path) -> dict[str, str]:
    """`env` with Jupyter's config, runtime, workspace and user-settings folders under `folder` (nothing written to
    ~/.jupyter)."""
    out = {k: v for k, v in env.items() if not k.startswith("JUPYTER")}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTERLAB_SETTINGS_DIR", "settings")):
        out[var] = str(folder / sub)
    return out


@contextlib.contextmanager
def running_lab(argv: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path) -> Iterator[str]:
    """Start `argv` (a JupyterLab command line ending in its --port=N), wait for it, yield its base URL; always stopped."""
    port = next(a.split("=", 1)[1] for a in argv if a.startswith("--port="))
    with log.open("w") as out:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/api/status", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def sizing_lab(work: Path, extra_params: str = "") -> Iterator[str]:
    """JupyterLab over a copy of notebooks/01-sizing.ipynb in `work` (its output_dir there too, plus
    `extra_params` appended to its parameters cell), started as `make lab` starts it; yields the base URL."""
    import nbformat

    from kvbook.notebook.lab import lab_argv, lab_env
    from kvbook.paths import repo_root

    nb = nbformat.read(str(repo_root() / "notebooks" / "01-sizing.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"{extra_params}\noutput_dir = {str(work / 'out')!r}"
    nbformat.write(nb, str(work / "01-sizing.ipynb"))
    argv = lab_argv(work, [*LAB_FLAGS, f"--port={free_port()}"])
    with running_lab(argv, work, jupyter_dirs(lab_env(), work / "jupyter"), work / "lab.log") as base:
        yield base


def open_notebook(page: Any, url: str, timeout_ms: int = 120_000) -> None:
    """Open a notebook's URL in a Playwright page and wait until its kernel is idle."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function(KERNEL_IDLE, timeout=timeout_ms)
