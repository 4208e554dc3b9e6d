"""The test session's LiteLLM fork server (kvbook.ops.forkserver) starts proxies that behave as `litellm` started
ones: they answer with the key, log to their file, run in their own process group, stop on SIGTERM with a status,
and do not outlive the process that asked for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from kvbook.ops import forkserver
from kvbook.ops.litellm import default_routes, start_proxy

pytestmark = pytest.mark.slow


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not forkserver._alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_forked_proxy_answers_logs_and_stops(litellm_forkserver: str, tmp_path: Path) -> None:
    assert forkserver.socket_path() == litellm_forkserver
    with start_proxy(default_routes("http://127.0.0.1:9"), run_dir=tmp_path) as proxy:
        assert isinstance(proxy.process.proc, forkserver.ForkedProcess)
        pid = proxy.process.pid
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session and group, as Popen's children
        models = requests.get(proxy.base_url + "/v1/models", headers={"Authorization": f"Bearer {proxy.master_key}"},
                              timeout=10).json()
        assert {m["id"] for m in models["data"]} == {"kvbook-anthropic", "kvbook-openai"}
        assert requests.get(proxy.base_url + "/v1/models", timeout=10).status_code != 200  # no key, no answer
    assert proxy.process.proc.returncode == -signal.SIGTERM and _gone(pid, 1)
    log = next(tmp_path.glob("litellm-*.log")).read_text()
    assert "Uvicorn running on" in log or "Application startup complete" in log, log[-500:]


def test_a_forked_proxy_dies_with_the_process_that_asked(litellm_forkserver: str, tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from kvbook.ops.litellm import default_routes, start_proxy\n"
            f"p = start_proxy(default_routes('http://127.0.0.1:9'), run_dir=Path({str(tmp_path)!r}))\n"
            "print(p.process.pid, flush=True); time.sleep(300)\n")
    asker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(asker.stdout.readline())  # type: ignore[union-attr]
        assert forkserver._alive(pid)
        asker.kill()  # no cleanup at all, as a killed Jupyter kernel
        assert _gone(pid), "a forked proxy outlived the process that asked for it"
    finally:
        asker.kill()
        asker.wait()


def test_a_fork_server_that_cannot_import_litellm_fails_at_once(tmp_path: Path) -> None:
    """A broken LiteLLM install (a stand-in package that fails to import: a fault the real, working install here
    cannot produce) is reported to the first proxy start in one line, not after its ready timeout."""
    fake = tmp_path / "pkgs" / "litellm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('a broken install')\n")
    path = str(tmp_path / "fs.sock")
    server = forkserver.start_server(path, {"PYTHONPATH": f"{tmp_path / 'pkgs'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    try:
        start = time.monotonic()
        with pytest.raises(Exception, match="could not start: importing LiteLLM failed: ImportError.*a broken install"):
            forkserver.spawn(path, ["litellm"], dict(os.environ), tmp_path / "l.log", ready_timeout_s=120)
        assert time.monotonic() - start < 30
        assert server.wait(10) == 1
    finally:
        server.kill()
        server.wait()
