"""No process kvbook started survives its owner: a killed kernel, an interrupt, a failing test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie still answers kill(0); check its state
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split()[2] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_killed_jupyter_kernel_leaves_no_server(smollm2, tmp_path):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        code = textwrap.dedent(f"""
            from pathlib import Path
            from kvbook.ops.llama_server import start_llama_server
            server = start_llama_server(["-m", {str(smollm2)!r}, "-c", "2048", "-np", "1"], run_dir=Path({str(tmp_path)!r}))
            print("PID", server.process.proc.pid)
        """)
        reply = kc.execute_interactive(code, timeout=120, output_hook=_collect)
        assert reply["content"]["status"] == "ok"
        pid = _collect.pid
        os.kill(pid, 0)  # running
        os.kill(km.provisioner.process.pid, signal.SIGKILL)  # the kernel dies without any cleanup
        assert _gone(pid), "llama-server outlived its killed kernel"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _collect(msg):
    if msg["msg_type"] == "stream" and "PID" in msg["content"]["text"]:
        _collect.pid = int(msg["content"]["text"].split()[1])


def test_interrupted_script_stops_its_servers(smollm2, tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from kvbook.ops.llama_server import start_llama_server
        s = start_llama_server(["-m", {str(smollm2)!r}, "-c", "2048", "-np", "1"], run_dir=Path({str(tmp_path)!r}))
        print(s.process.proc.pid, flush=True)
        time.sleep(600)
    """)
    # A background job of a non-interactive shell (or nohup) inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: give the owner the default disposition, as a terminal would.
    owners = []
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        owners.append(proc)
        pid = int(proc.stdout.readline())
        owners.append(pid)
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt in the sleep
        proc.wait(30)
        assert _gone(pid)
        proc2 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        owners.append(proc2)
        pid2 = int(proc2.stdout.readline())
        owners.append(pid2)
        proc2.terminate()  # SIGTERM to the owner
        proc2.wait(30)
        assert _gone(pid2)
    finally:  # a failure above must not leave an owner or its server running
        for owner in owners:
            try:
                owner.kill() if isinstance(owner, subprocess.Popen) else os.kill(owner, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
