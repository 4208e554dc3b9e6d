"""JupyterLab as `make lab` opens it: on loopback, over notebooks/, with kvbook's library importable, and with every
run-time fetch JupyterLab 4.6 makes from the internet turned off.

    python -m kvbook.notebook.lab [extra jupyter lab options]
"""

from __future__ import annotations

import os
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


def lab_argv(root_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The `jupyter lab` command line with kvbook's offline settings."""
    return [sys.executable, "-m", "jupyter", "lab", *OFFLINE_ARGS, f"--ServerApp.root_dir={root_dir}", *extra]


def lab_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment JupyterLab and its kernels get: kvbook's lib on PYTHONPATH, KERNEL_ENV set."""
    env = dict(os.environ if base is None else base)
    lib = str(repo_root() / "lib")
    env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(KERNEL_ENV)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    root = repo_root() / "notebooks"
    args = lab_argv(root, list(sys.argv[1:] if argv is None else argv))
    os.execve(args[0], args, lab_env())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
