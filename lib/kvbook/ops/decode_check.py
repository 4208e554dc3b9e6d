"""A real one-token decode with a llama-server build, so a build that cannot run here fails at set-up.

A wrong build gets through `--version` and dies only when it computes (SIGILL at the warm-up
decode), so the check loads the bundled SmolLM2 and asks for one token over HTTP.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import ServerError
from kvbook.ops.procs import ManagedProcess, ProcessSpec, free_port, tail

_SYSTEM_INFO = re.compile(r"system_info:.*?\|\s*(.*)$", re.MULTILINE)
_EXIT = re.compile(r"exited with code (-?\d+)")


@dataclass(frozen=True)
class DecodeCheck:
    """What one smoke decode found."""

    server: Path
    ok: bool
    seconds: float
    cause: str  # one line naming the problem; "" when ok
    fix: str  # what to do about it; "" when ok
    cpu_features: str  # what the build reports it uses ("CPU : SSE3 = 1 | AVX2 = 1 | ..."), "" if unknown


def _cause(server: Path, pinned: bool, error: str, log: Path) -> tuple[str, str]:
    """(why the decode failed, the fix for this kind of build), one line each."""
    match = _EXIT.search(error)
    code = int(match.group(1)) if match else None
    fix = ("delete the cached build (`rm -rf ~/.cache/kvbook/wheels`, or $KVBOOK_CACHE/wheels) and rerun "
           "`make setup` to rebuild it for this host; if the rebuilt one fails too, KVBOOK_LLAMA_PROFILE=x86-64-v3 "
           "(or x86-64-v2) builds for an older instruction set" if pinned else
           f"rebuild that llama-server for this host, or unset KVBOOK_LLAMA_SERVER / take {server} off PATH "
           f"to use the pinned build")
    if code in (-4, 132):
        return f"SIGILL: the build uses instructions this CPU cannot run ({server})", fix
    last = next((line.strip() for line in reversed(tail(log, 12).splitlines()) if line.strip()), "")
    first = error.splitlines()[0] if error else "no error text"
    return f"{server} failed a one-token decode: {first}" + (f" (log: {last[:160]})" if last else ""), fix


def _clean_env() -> dict[str, str]:
    """The environment without the user's LLAMA_ARG_* settings and API key: the check runs its own line."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_") and k != "LLAMA_API_KEY"}


def smoke_decode(server: Path, model: Path, *, pinned: bool, timeout_s: float = 90.0) -> DecodeCheck:
    """Start `server` on loopback with `model`, decode one token, stop it; never raises for a bad build."""
    import requests

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvbook-decode-") as tmp:
        log = Path(tmp) / "llama-server.log"
        port = free_port()
        spec = ProcessSpec(
            name=f"llama-server ({server})", host="127.0.0.1", port=port, log_path=log,
            argv=(str(server), "-m", str(model), "-c", "256", "-np", "1", "-t", "2",
                  "--host", "127.0.0.1", "--port", str(port)),
            ready_paths=("/health",), ready_timeout_s=timeout_s, stop_timeout_s=5.0, inherit_env=False,
            env={**_clean_env(), "LLAMA_ARG_LOG_VERBOSITY": "4"},  # -lv 4 logs system_info; older builds ignore it
        )
        proc = ManagedProcess(spec)
        try:
            proc.start()
            try:
                _decode_one(proc.base_url, timeout_s)
            except (ServerError, requests.RequestException, ValueError) as e:
                code = proc.proc.poll() if proc.proc is not None else None
                raise ServerError(f"exited with code {code} while decoding ({e})" if code is not None else str(e)) from None
        except ServerError as e:
            cause, fix = _cause(server, pinned, str(e), log)
            return DecodeCheck(server, False, time.monotonic() - t0, cause, fix, _features(log))
        finally:
            proc.stop()
        return DecodeCheck(server, True, time.monotonic() - t0, "", "", _features(log))


def _decode_one(base_url: str, timeout_s: float) -> None:
    import requests

    resp = requests.post(f"{base_url}/completion", timeout=timeout_s, json={
        "prompt": "The capital of France is", "n_predict": 1, "temperature": 0, "cache_prompt": False})
    body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    predicted = (body.get("timings") or {}).get("predicted_n", body.get("tokens_predicted"))
    if resp.status_code != 200 or predicted != 1:
        raise ServerError(f"/completion answered HTTP {resp.status_code} with {predicted!r} tokens instead of 1: "
                          f"{resp.text[:160]}")


def _features(log: Path) -> str:
    try:
        match = _SYSTEM_INFO.search(log.read_text(errors="replace"))
    except OSError:
        return ""
    return match.group(1).strip(" |").removeprefix("CPU : ") if match else ""
