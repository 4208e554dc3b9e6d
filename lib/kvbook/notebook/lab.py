"""JupyterLab as `make lab` opens it: on loopback, over working copies of the notebooks (lab/, git-ignored), with
kvbook's library importable, kernel traffic encrypted, and with every run-time fetch JupyterLab 4.6 makes from the
internet turned off.

Why working copies: JupyterLab saves an open notebook every two minutes and on Ctrl-S, outputs and widget state
included (5.3 MB within minutes for 01-sizing), and keeps a checkpoint beside it; opened in notebooks/, that
rewrote tracked files. In lab/ the tracked notebooks are never written, and a user's runs and edits are kept.

    python -m kvbook.notebook.lab [extra jupyter lab options]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from kvbook.paths import repo_root

OFFLINE_ARGS: tuple[str, ...] = (
    # prevents the news feed fetch (jupyterlab.github.io) that JupyterLab asks the user to allow on first start
    "--LabApp.news_url=None",
    # prevents the PyPI query for a newer JupyterLab on every start
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    # prevents the extension manager's PyPI search and installs
    "--LabApp.extension_manager=readonly",
    # keeps the server (and its kernels) off the network: loopback only
    "--ServerApp.ip=127.0.0.1",
)
# The kernels' environment: kvbook's libraries never fetch by themselves; these stop the ones that might.
KERNEL_ENV: dict[str, str] = {
    # prevents Hugging Face Hub downloads from a notebook cell (kvbook reads local GGUFs only)
    "HF_HUB_OFFLINE": "1",
    # prevents huggingface_hub's usage pings
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # the cross-tool opt-out for any other library's telemetry
    "DO_NOT_TRACK": "1",
}
MANIFEST = ".kvbook-copies.json"  # in the working folder: what each copy was made from


def kernel_args() -> tuple[str, ...]:
    """The server's kernel managers provision CurveZMQ keys, as `kvbook run` does (kvbook.notebook.kernel): the
    kernels' sockets are encrypted and ipykernel stops warning "Kernel is running over TCP without encryption".
    Where pyzmq lacks Curve it stays off (jupyter_client refuses "auto" there)."""
    import zmq

    return ("--KernelManager.transport_encryption=auto",) if zmq.has("curve") else ()


def lab_dir() -> Path:
    """Where `make lab` keeps its working copies: KVBOOK_LAB_DIR, or lab/ in the checkout (git-ignored)."""
    override = os.environ.get("KVBOOK_LAB_DIR")
    return Path(override) if override else repo_root() / "lab"


def _sources(path: Path) -> str:
    """A notebook's cells' sources, hashed (what a user edits; outputs and execution counts left out)."""
    cells = json.loads(path.read_text()).get("cells", [])
    text = json.dumps([(c.get("cell_type"), "".join(c.get("source", ""))) for c in cells])
    return hashlib.sha256(text.encode()).hexdigest()


def working_copies(source: Path, work: Path) -> list[str]:
    """Copy each notebook of `source` into `work`: a missing copy is made; a copy whose cells were not edited is
    renewed when its tracked notebook changed; an edited copy is kept. Returns a line per copy kept over a
    changed original."""
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = work / MANIFEST
    try:
        made = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        made = {}
    notes = []
    for nb in sorted(source.glob("*.ipynb")):
        copy, tracked = work / nb.name, _sources(nb)
        record = made.get(nb.name, {})
        if copy.is_file() and record.get("from") == tracked:
            continue  # the original did not change: the copy stays as the user left it
        if copy.is_file() and _sources(copy) != record.get("copied"):
            notes.append(f"kept your edited {copy}; {nb} changed since it was copied (delete the copy to renew it)")
            continue
        shutil.copyfile(nb, copy)
        made[nb.name] = {"from": tracked, "copied": _sources(copy)}
    manifest_path.write_text(json.dumps(made, indent=1) + "\n")
    return notes


def lab_argv(root_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The `jupyter lab` command line with kvbook's offline and kernel settings."""
    return [sys.executable, "-m", "jupyter", "lab", *OFFLINE_ARGS, *kernel_args(), f"--ServerApp.root_dir={root_dir}",
            *extra]


def lab_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment JupyterLab and its kernels get: kvbook's lib on PYTHONPATH, KERNEL_ENV set."""
    env = dict(os.environ if base is None else base)
    lib = str(repo_root() / "lib")
    env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(KERNEL_ENV)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    work = lab_dir()
    for line in working_copies(repo_root() / "notebooks", work):
        print(f"[make lab] {line}", flush=True)
    print(f"[make lab] working copies of notebooks/ in {work}: runs and edits are saved there, never into "
          "notebooks/", flush=True)
    args = lab_argv(work, list(sys.argv[1:] if argv is None else argv))
    os.execve(args[0], args, lab_env())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
