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

import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbook.errors import ServerError
from kvbook.interface import MiB, Plan
from kvbook.model.sources import load_model
from kvbook.ops.components import find_llama_server
from kvbook.ops.logparse import parse_log
from kvbook.ops.procs import free_port
from kvbook.ops.host import detect_host, this_machine
from kvbook.plan.devices import with_rpc
from kvbook.plan.flags import parse_server_args
from kvbook.plan.planner import make_plan, place

_FREE = re.compile(r"(?:using device (RPC\d+) \(([^)]*)\).* - (\d+) MiB free|- (RPC\d+)\s*: (\S+) \(\d+ MiB, (\d+) MiB free\))")
_DEV_LINE = re.compile(r"common_params_fit_impl:\s+- (\S+) \(.*?\)\s*:\s+(\d+) layers(?: \(\s*(\d+) overflowing\))?,"
                       r"\s+(-?\d+) MiB used,\s+(-?\d+) MiB free")
_KEEPS = re.compile(r"set ngl_per_device\[(\d+)\]\.\(n_layer, n_part, overflow_type\)=\((\d+), (\d+), (UP|GATE|ATTN)\)")
_CTX = re.compile(r"context size reduced from (\d+) to (\d+)")
_ALLOC = re.compile(r"id=(\d+), n_layer=\s*(\d+), n_part=\s*(\d+), overflow_type=(\d), mem=\s*(-?\d+) MiB")
_TARGET = re.compile(r"common_params_fit_impl: id=(\d+), target=(-?\d+) MiB")
_SURPLUS = re.compile(r"with only dense weights in device memory there is (?:a total surplus|still a total deficit) of (-?\d+)")
_FAILED = re.compile(r"failed to fit params to free device memory: (.*)")
_DONE = "fitting params to free memory took"
_NO_CHANGE = ("no changes needed",)


@dataclass(frozen=True)
class FitCase:
    """One comparison: a model, each RPC device's budget (the MiB fit may use there: free - --fit-target), the flags."""

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
class FitLog:
    """fit's search as llama-server logged it: each layer assignment it tried ((n_layer, n_part, overflow_type) per
    device) with the MiB it measured per device, each device's target, and the surplus with all experts on the CPU."""

    allocations: tuple[tuple[tuple[tuple[int, int, int], ...], tuple[int, ...], bool], ...]  # (layers, MiB, taken)
    targets_mib: tuple[int, ...]
    surplus_cpu_moe_mib: int


@dataclass(frozen=True)
class FitComparison:
    case: FitCase
    real: FitSide
    kvbook: FitSide
    plan: Plan
    logged_mib: tuple[float, ...] = ()  # each RPC device's model + KV + compute buffers logged by the real start
    replay_same: bool | None = None  # kvbook's search over the real fit's own measurements ends where it did
    memory_errors_pct: tuple[float, ...] = ()  # kvbook's MiB vs fit's for every assignment it tried (devices >= 8 MiB)

    @property
    def same_choice(self) -> bool:
        """The same status, context and, per device, layers, partial layers and what the first partial keeps."""
        def strip(s: Any) -> tuple[Any, ...]:
            return (s.status, s.n_ctx, tuple(d[:4] for d in s.devices))

        return strip(self.real) == strip(self.kvbook)


def read_fit_log(log: str, n_devices: int, given_ctx: int, moe: bool = False) -> tuple[FitSide, dict[str, int]]:
    """fit's decision as llama-server logged it, and each device's free MiB as it was read (its first line). Where
    fit stopped after its dense-only pass (step 3) it prints no partial count: for a MoE model that pass gives every
    layer of a device but the last device's output layer experts on the CPU."""
    free: dict[str, int] = {}
    for m in map(_FREE.search, log.splitlines()):
        name, mib = (m[1], m[3]) if m and m[1] else (m[4], m[6]) if m else (None, None)
        if name and mib is not None and name not in free:
            free[name] = int(mib)
    ctx = given_ctx
    for m in map(_CTX.search, log.splitlines()):
        if m:
            ctx = int(m[2])
    failed = next((m[1].strip() for m in map(_FAILED.search, log.splitlines()) if m), "")
    rows: dict[str, tuple[int, int, int]] = {}
    for m in map(_DEV_LINE.search, log.splitlines()):
        if m:
            i, layers = int(m[1].removeprefix("RPC")), int(m[2])
            dense_only = layers - (1 if i == n_devices - 1 else 0) if moe and layers else 0
            rows[m[1]] = (layers, int(m[3]) if m[3] is not None else dense_only, int(m[4]))
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


def read_fit_search(log: str, n_devices: int) -> FitLog:
    """Every test allocation fit logged (`memory for test allocation by device:` and its per-device lines), and
    whether fit took it: its next line sets `ngl_per_device[...]` (not `ngl_per_device_high`)."""
    lines = [ln for ln in log.splitlines() if "common_params_fit_impl:" in ln]
    allocations: list[tuple[tuple[tuple[int, int, int], ...], tuple[int, ...], bool]] = []
    rows: list[tuple[int, int, int, int]] = []
    for i, ln in enumerate(lines):
        m = _ALLOC.search(ln)
        if not m:
            continue
        rows.append((int(m[2]), int(m[3]), int(m[4]), int(m[5])))
        if int(m[1]) == n_devices - 1:
            taken = i + 1 < len(lines) and "set ngl_per_device[" in lines[i + 1]
            allocations.append((tuple(r[:3] for r in rows), tuple(r[3] for r in rows), taken))
            rows = []
    targets = tuple(int(m[2]) for m in map(_TARGET.search, lines) if m)
    surplus = next((int(m[1]) * (1 if "surplus" in m[0] else -1) for m in map(_SURPLUS.search, lines) if m), 0)
    return FitLog(tuple(allocations), targets, surplus)


def replay(search: FitLog, arch_n_layer: int, moe: bool) -> list[tuple[int, int, int]]:
    """kvbook's search (plan/fit.py search_layers) over the real fit's own measurements. fit logs MiB floored, its
    targets too: a device logged at its target's MiB is resolved as fit resolved it (its next line), the others sit
    mid-MiB. Raises KeyError when kvbook's search asks for an assignment the real one never tried."""
    from kvbook.plan.fit import replay_layers

    half, quarter = MiB // 2, MiB // 4
    measured: dict[tuple[tuple[int, int, int], ...], list[int]] = {}
    for layers, mib, taken in search.allocations:
        measured[layers] = [t * MiB + (quarter if taken else 3 * quarter) if m == t else m * MiB + half
                            for m, t in zip(mib, search.targets_mib)]
    return replay_layers(arch_n_layer, moe, [t * MiB + half for t in search.targets_mib],
                         search.surplus_cpu_moe_mib * MiB, measured)


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
            if (decided and not case.load) or "llama_server: listening on" in text:
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
    eps = tuple(endpoints[:len(case.budgets_mib)])
    # a loopback RPC server's CPU backend reports this machine's physical memory as free, to the byte
    # (ggml-cpu.cpp ggml_backend_cpu_device_get_memory: "assume that all of it is free")
    free_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free_now = [free_bytes // MiB] * len(eps)
    margins = [max(f - b, 0) for f, b in zip(free_now, case.budgets_mib)]
    text, logged = run_server_fit(case, eps, margins, run_dir)
    given_ctx = _given_ctx(case.args)
    arch = load_model(str(case.model))
    real, free = read_fit_log(text, len(eps), given_ctx, bool(arch.n_expert))
    if len(free) < len(eps):
        raise ServerError(f"llama-server's log names no free memory for every RPC device ({free}); log in {run_dir}")
    if any(free[f"RPC{i}"] != free_bytes // MiB for i in range(len(eps))):
        raise ServerError(f"the RPC devices reported {free} MiB free, not this machine's {free_bytes // MiB} MiB")
    device = with_rpc(this_machine(), eps, tuple(free_bytes / 2**30 for _ in eps), host=detect_host())
    flags = parse_server_args(["-m", str(case.model), "--rpc", ",".join(eps), *case.args,
                               "--fit-target", ",".join(map(str, margins))])
    plan = make_plan(arch, flags, device)
    fit = plan.fit
    assert fit is not None
    search = read_fit_search(text, len(eps))
    replay_same, errors = None, []
    if search.allocations and len(search.targets_mib) == len(eps):
        from kvbook.plan.fit import layer_use

        try:
            replayed = replay(search, arch.n_layer, bool(arch.n_expert))
            replay_same = tuple(replayed) == tuple(d[1:3] + ({"ATTN": 1, "UP": 2, "GATE": 3}.get(d[3], 4),)
                                                   for d in real.devices)
        except KeyError:
            replay_same = False
        at_ctx = parse_server_args(["-m", str(case.model), "--rpc", ",".join(eps), *_with_ctx(case.args, real.n_ctx)])
        for layers, mib, _ in search.allocations:
            mine = layer_use(arch, at_ctx, plan.device, place, layers)
            errors += [(b / MiB - r) / r * 100 for b, r in zip(mine, mib) if r >= 8]
    used = dict(fit.used)
    rows = tuple((f"RPC{i}", n, p, keeps, int(used.get(name, 0) // MiB))
                 for i, (name, n, p, keeps) in enumerate(fit.layers))
    status = {"not predicted": "failed"}.get(fit.status, fit.status)
    predicted = FitSide(status, plan.flags.ctx, rows, fit.reason)  # the -c fit sets (the user's where it keeps it)
    return FitComparison(case, real, predicted, plan, logged, replay_same, tuple(round(e, 1) for e in errors))


def _with_ctx(args: Sequence[str], ctx: int) -> list[str]:
    """The case's flags with -c set to the context fit settled on (0: as given)."""
    out, i = [], 0
    while i < len(args):
        if args[i] in ("-c", "--ctx-size"):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out + (["-c", str(ctx)] if ctx else [])


def _given_ctx(args: Sequence[str]) -> int:
    """The -c the case sets (0: none)."""
    for flag, value in itertools.pairwise(args):
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

    def errors(r: FitComparison) -> str:
        e = sorted(abs(x) for x in r.memory_errors_pct)
        return f"{e[len(e) // 2]:.1f}% / {e[-1]:.1f}% ({len(e)})" if e else "-"

    rows = [("| case | target MiB | flags | real llama-server --fit | kvbook predicts | same choice | replay of fit's "
             "own MiB | kvbook MiB vs fit's, median / max abs (n) | logged MiB (real start) |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        replay = "-" if r.replay_same is None else "same" if r.replay_same else "**differs**"
        rows.append(f"| {r.case.name} | {'/'.join(map(str, r.case.budgets_mib))} | `{' '.join(r.case.args)}` | "
                    f"{side(r.real)} | {side(r.kvbook)} | {'yes' if r.same_choice else '**no**'} | {replay} | "
                    f"{errors(r)} | {'/'.join(f'{x:.0f}' for x in r.logged_mib) if r.logged_mib else '-'} |")
    return "\n".join(rows)
