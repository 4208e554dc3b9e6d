"""kvbook's prediction of llama-server's --fit (plan/fit.py) against the real thing: the pinned llama-server run
with --fit on over loopback ggml-rpc-server devices, its fit log read back (common/fit.cpp's trace lines at
-lv 4: each device's layers, partial layers and projected MiB, the context it lowered to).

An RPC server reports its host's free RAM, so a smaller device is made with `--fit-target`: margin = reported
free - budget. kvbook gets the same command line (margins included) and, as each device's free memory, the
figure this very run logged (free RAM moves while other processes run). A full-size sparse model cannot be
loaded, so its server is stopped once fit has decided (`load=False`); a small model is started for real and
its logged buffers are read too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import ServerError
from kvbook.interface import MiB, Plan
from kvbook.model.sources import load_model
from kvbook.ops.components import find_llama_server
from kvbook.ops.logparse import parse_log
from kvbook.ops.procs import free_port
from kvbook.plan.devices import this_machine, with_rpc
from kvbook.plan.flags import parse_server_args
from kvbook.plan.planner import make_plan

_FREE = re.compile(r"using device (RPC\d+) \(([^)]*)\).* - (\d+) MiB free")
_DEV_LINE = re.compile(r"common_params_fit_impl:\s+- (\S+) \(.*?\)\s*:\s+(\d+) layers(?: \(\s*(\d+) overflowing\))?,"
                       r"\s+(-?\d+) MiB used,\s+(-?\d+) MiB free")
_KEEPS = re.compile(r"set ngl_per_device\[(\d+)\]\.\(n_layer, n_part, overflow_type\)=\((\d+), (\d+), (UP|GATE|ATTN)\)")
_CTX = re.compile(r"context size reduced from (\d+) to (\d+)")
_FAILED = re.compile(r"failed to fit params to free device memory: (.*)")
_DONE = "fitting params to free memory took"
_NO_CHANGE = ("no changes needed",)


@dataclass(frozen=True)
class FitCase:
    """One comparison: a model, each RPC device's budget (MiB fit may use = free - margin), and the flags."""

    name: str
    model: Path
    budgets_mib: tuple[int, ...]
    args: tuple[str, ...]
    load: bool = True  # start the server for real (False: stop it once fit has decided; full-size sparse files)


@dataclass(frozen=True)
class FitSide:
    """One side's fit result: the status, the context, per device (layers, partial layers, what the first partial
    layer keeps, MiB used as fit projects it)."""

    status: str  # "no change", "adjusted", "failed"
    n_ctx: int
    devices: tuple[tuple[str, int, int, str, int], ...]
    reason: str = ""


@dataclass(frozen=True)
class FitComparison:
    case: FitCase
    real: FitSide
    kvbook: FitSide
    plan: Plan
    logged_mib: tuple[float, ...] = ()  # each RPC device's model + KV + compute buffers logged by the real start

    @property
    def same_choice(self) -> bool:
        """The same status, context and, per device, layers, partial layers and what the first partial keeps."""
        strip = lambda s: (s.status, s.n_ctx, tuple(d[:4] for d in s.devices))  # noqa: E731
        return strip(self.real) == strip(self.kvbook)


def read_fit_log(log: str, n_devices: int, given_ctx: int) -> tuple[FitSide, dict[str, int]]:
    """fit's decision as llama-server logged it, and each device's free MiB as it was read (its first line)."""
    free: dict[str, int] = {}
    for m in map(_FREE.search, log.splitlines()):
        if m and m[1] not in free:
            free[m[1]] = int(m[3])
    ctx = given_ctx
    for m in map(_CTX.search, log.splitlines()):
        if m:
            ctx = int(m[2])
    failed = next((m[1].strip() for m in map(_FAILED.search, log.splitlines()) if m), "")
    rows: dict[str, tuple[int, int, int]] = {}
    for m in map(_DEV_LINE.search, log.splitlines()):
        if m:
            rows[m[1]] = (int(m[2]), int(m[3] or 0), int(m[4]))
    keeps = {int(m[1]): m[4] for m in map(_KEEPS.search, log.splitlines()) if m}
    names = [f"RPC{i}" for i in range(n_devices)]
    devices = tuple((n, *rows[n][:2], keeps.get(i, "MOE"), rows[n][2]) for i, n in enumerate(names) if n in rows)
    if failed:
        status = "failed"
    elif any(s in log for s in _NO_CHANGE) and not devices and ctx == given_ctx:
        status = "no change"
    else:
        status = "adjusted"
    return FitSide(status, ctx, devices, failed), free


def run_server_fit(case: FitCase, endpoints: Sequence[str], margins_mib: Sequence[int], run_dir: Path,
                   timeout_s: float = 240.0) -> tuple[str, tuple[float, ...]]:
    """llama-server's log with --fit on for the case, and (a real start) each RPC device's logged buffers (MiB);
    a full-size sparse model's server is stopped as soon as fit has decided."""
    port = free_port("127.0.0.1")
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"llama-server-fit-{port}.log"
    argv = [str(find_llama_server()), "-m", str(case.model), "--rpc", ",".join(endpoints), *case.args,
            "--fit-target", ",".join(map(str, margins_mib)), "--no-warmup", "-t", "1", "-lv", "4",
            "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            text = log_path.read_text(errors="replace")
            decided = _DONE in text
            if (decided and not case.load) or "server is listening" in text or "main: model loaded" in text:
                break
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise ServerError(f"llama-server did not finish --fit within {timeout_s:g} s; log {log_path}")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group: the server we started above
        proc.wait()
    text = log_path.read_text(errors="replace")
    if not case.load:
        return text, ()
    logged = parse_log(text)
    used = tuple(round(sum(v for k, v in {**logged.model_mib}.items() if k.endswith(f"[{ep}]"))
                       + sum(v for k, v in logged.kv_buffer_mib.items() if k.endswith(f"[{ep}]"))
                       + sum(v for k, v in logged.compute_mib.items() if k.endswith(f"[{ep}]")), 2) for ep in endpoints)
    return text, used


def compare_fit(case: FitCase, endpoints: Sequence[str], run_dir: Path) -> FitComparison:
    """The real server's --fit and kvbook's prediction for one case, on the same free memory and margins."""
    from kvbook.ops.solver_fit import reported_free_mib

    eps = tuple(endpoints[:len(case.budgets_mib)])
    free_now = reported_free_mib(case.model, eps)
    margins = [max(f - b, 0) for f, b in zip(free_now, case.budgets_mib)]
    text, logged = run_server_fit(case, eps, margins, run_dir)
    given_ctx = _given_ctx(case.args)
    real, free = read_fit_log(text, len(eps), given_ctx)
    if len(free) < len(eps):
        raise ServerError(f"llama-server's log names no free memory for every RPC device ({free}); log in {run_dir}")
    arch = load_model(str(case.model))
    device = with_rpc(this_machine(), eps, tuple(free[f"RPC{i}"] * MiB / 2**30 for i in range(len(eps))))
    flags = parse_server_args(["-m", str(case.model), "--rpc", ",".join(eps), *case.args,
                               "--fit-target", ",".join(map(str, margins))])
    plan = make_plan(arch, flags, device)
    fit = plan.fit
    assert fit is not None
    used = dict(fit.used)
    rows = tuple((f"RPC{i}", n, p, keeps, int(used.get(name, 0) // MiB))
                 for i, (name, n, p, keeps) in enumerate(fit.layers))
    status = {"not predicted": "failed"}.get(fit.status, fit.status)
    predicted = FitSide(status, plan.flags.ctx, rows, fit.reason)  # the -c fit sets (the user's where it keeps it)
    return FitComparison(case, real, predicted, plan, logged)


def _given_ctx(args: Sequence[str]) -> int:
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--ctx-size"):
            return int(value)
    return 0


def format_table(results: Sequence[FitComparison]) -> str:
    """Predicted vs real --fit as a Markdown table (docs/fit.md)."""
    def side(s: FitSide) -> str:
        if s.status == "failed":
            return f"fails ({s.reason})" if s.reason else "fails"
        if s.status == "no change":
            return "no change"
        devs = "; ".join(f"{n}: {layers} layers" + (f" ({p} partial{'' if k == 'MOE' else ', first keeps ' + k})" if p else "")
                         + f", {mib} MiB" for n, layers, p, k, mib in s.devices)
        return f"-c {s.n_ctx}; {devs}" if devs else f"-c {s.n_ctx}"

    rows = ["| case | budgets MiB | flags | real llama-server --fit | kvbook predicts | same choice | logged MiB (real start) |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.case.name} | {'/'.join(map(str, r.case.budgets_mib))} | `{' '.join(r.case.args)}` | "
                    f"{side(r.real)} | {side(r.kvbook)} | {'yes' if r.same_choice else '**no**'} | "
                    f"{'/'.join(f'{x:.0f}' for x in r.logged_mib) if r.logged_mib else '-'} |")
    return "\n".join(rows)
