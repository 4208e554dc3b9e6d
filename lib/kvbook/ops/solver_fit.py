"""kvbook's solver against llama.cpp's own `--fit` (the pinned llama-fit-params) on the same inputs, checked
by real llama-server runs over ggml-rpc-server devices.

An RPC server reports its host's free RAM, so a smaller device is emulated the way llama-fit-params allows:
`--fit-target` margin = reported free - budget, per device; kvbook gets the same budgets (`--rpc-gib`).
Each side's chosen flags are then started for real (`-lv 4`) and a side "fits" when every RPC device's
logged model + KV + compute buffers are within its budget.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.interface import MiB
from kvbook.ops.components import find_llama_server
from kvbook.ops.fit_params import _run_holding_exit, find_fit_params
from kvbook.ops.logparse import parse_log
from kvbook.ops.procs import ManagedProcess, ProcessSpec, free_port
from kvbook.ops.host import local_request, this_machine
from kvbook.plan.api import solve
from kvbook.plan.devices import with_rpc
from kvbook.plan.flags import parse_server_args
from kvbook.plan.solver import host_read_bytes

_FREE = re.compile(r"using device RPC\d+ \((\S+)\) .* - (\d+) MiB free")
_CPU_MOE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"  # what --cpu-moe adds (common/arg.cpp), as fit prints it
_EXPS = re.compile(r"^blk\\\.(\d+)\\\.ffn_\S*exps=CPU$")


@dataclass(frozen=True)
class Case:
    """One comparison: a model, RPC budgets (MiB), the flags the user fixed, and the objective."""

    name: str
    model: Path
    budgets_mib: tuple[int, ...]
    args: tuple[str, ...]
    objective: str


@dataclass(frozen=True)
class Side:
    """One side's choice and what the real server allocated for it."""

    argv: tuple[str, ...]  # the placement flags chosen (empty: this side gave up)
    note: str
    n_ctx: int = 0
    host_read_bytes: int | None = None
    used_mib: tuple[float, ...] = ()  # per RPC device, model + KV + compute, from the log
    fits: bool = False


@dataclass(frozen=True)
class Result:
    case: Case
    fit: Side
    kvbook: Side


def reported_free_mib(model: Path, endpoints: Sequence[str]) -> tuple[int, ...]:
    """Each RPC device's free memory as llama.cpp sees it (llama-fit-params' device log lines)."""
    argv = [str(find_fit_params()), "-m", str(model), "--rpc", ",".join(endpoints), "-c", "256", "--fit-print", "on", "-v"]
    _, _, log = _run_holding_exit(argv, 120.0)
    free = {m[1]: int(m[2]) for m in map(_FREE.search, log.splitlines()) if m}
    return tuple(free[ep] for ep in endpoints)


def fit_choice(case: Case, endpoints: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """llama-fit-params' chosen flags for the case (margins standing in for the budgets), or () and why not."""
    free = reported_free_mib(case.model, endpoints)
    margins = ",".join(str(f - b) for f, b in zip(free, case.budgets_mib))
    argv = [str(find_fit_params()), "-m", str(case.model), "--rpc", ",".join(endpoints), *case.args, "--fit-target", margins]
    code, out, log = _run_holding_exit(argv, 120.0)
    if code != 0:
        why = ""
        for _ in range(3):  # its reason is logged by a thread that exit(1) may cut short: ask again for it
            why = next((ln.split("memory: ", 1)[-1] for ln in log.splitlines() if "failed to fit params" in ln), "")
            if why:
                break
            code, out, log = _run_holding_exit(argv, 120.0)
        return (), f"gives up (exit {code}{': ' + why.strip() if why else ''})"
    line = next((ln for ln in out.splitlines() if ln.startswith("-c ")), "")
    return tuple(shlex.split(line)), f"--fit-target {margins}"


def _as_kvbook_flags(tokens: Sequence[str]) -> tuple[str, ...]:
    """fit's `-ot blk\\.0\\.ffn_..._exps=CPU,...` for layers 0..N-1 as --n-cpu-moe N (what it means), so kvbook
    can read the flags; other -ot lists are returned as they are."""
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] == "-ot" and i + 1 < len(tokens) and tokens[i + 1] == _CPU_MOE:
            out.append("--cpu-moe")
            i += 2
            continue
        if tokens[i] == "-ot" and i + 1 < len(tokens):
            layers = [m and int(m[1]) for m in map(_EXPS.match, tokens[i + 1].split(","))]
            if all(x is not None for x in layers) and sorted(x or 0 for x in layers) == list(range(len(layers))):
                out += ["--n-cpu-moe", str(len(layers))]
                i += 2
                continue
        out.append(tokens[i])
        i += 1
    return tuple(out)


def _measure(case: Case, endpoints: Sequence[str], placement: Sequence[str], run_dir: Path) -> tuple[int, tuple[float, ...]]:
    argv = ["-m", str(case.model), "--rpc", ",".join(endpoints), *_without_ctx(case.args, placement), *placement,
            "--fit", "off", "--no-warmup", "-t", "1"]
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port("127.0.0.1")  # started as given: fit's -ot is not a flag kvbook reads
    spec = ProcessSpec(name="llama-server", argv=(str(find_llama_server()), *argv, "--host", "127.0.0.1", "--port",
                                                  str(port), "-lv", "4"),
                       host="127.0.0.1", port=port, log_path=run_dir / f"llama-server-{port}.log", ready_paths=("/health",))
    process = ManagedProcess(spec)
    process.start()
    try:
        logged = parse_log(spec.log_path.read_text(errors="replace"))
    finally:
        process.stop()
    used = []
    for ep in endpoints:
        used.append(round(sum(v for k, v in logged.model_mib.items() if k.endswith(f"[{ep}]"))
                          + sum(v for k, v in logged.kv_buffer_mib.items() if k.endswith(f"[{ep}]"))
                          + sum(v for k, v in logged.compute_mib.items() if k.endswith(f"[{ep}]")), 2))
    return logged.n_ctx or 0, tuple(used)


def _without_ctx(args: Sequence[str], placement: Sequence[str]) -> list[str]:
    """The case's flags minus any the placement sets again (-c, -ngl, -ts, cache types)."""
    again = {a for a in placement if a.startswith("-")}
    out: list[str] = []
    i = 0
    while i < len(args):
        takes = i + 1 < len(args) and not args[i + 1].startswith("-")
        width = 2 if takes else 1
        if args[i] not in again:
            out += args[i:i + width]
        i += width
    return out


def compare(case: Case, endpoints: Sequence[str], run_dir: Path) -> Result:
    """Both sides' choices for one case, each started for real and measured."""
    device = with_rpc(this_machine(), tuple(endpoints), tuple(b * MiB / 2**30 for b in case.budgets_mib))
    base = ["-m", str(case.model), "--rpc", ",".join(endpoints)]
    sides = []
    fit_tokens, fit_note = fit_choice(case, endpoints)
    request = local_request(parse_server_args([*base, *case.args]), device)
    arch = request.model
    solution = solve(request, case.objective, top=1)
    kv_tokens: tuple[str, ...] = ()
    if solution.placements:
        chosen = list(solution.placements[0].argv)
        kv_tokens = tuple(chosen[len(base):])
    kv_note = f"{solution.fitting} of {solution.searched} placements start"
    for label, tokens, note in (("fit", fit_tokens, fit_note), ("kvbook", kv_tokens, kv_note)):
        if not tokens:
            sides.append(Side((), note))
            continue
        n_ctx, used = _measure(case, endpoints, tokens, run_dir / label)
        readable = _as_kvbook_flags(tokens)
        try:
            flags = parse_server_args([*base, *_without_ctx(case.args, readable), *readable])
            reads = host_read_bytes(arch, flags, device)
        except Exception:  # a flag set kvbook cannot read: no host-read figure
            reads = None
        fits = all(u <= b for u, b in zip(used, case.budgets_mib))
        sides.append(Side(tuple(tokens), note, n_ctx, reads, used, fits))
    return Result(case, sides[0], sides[1])


def format_table(results: Sequence[Result]) -> str:
    """The comparison as a Markdown table (docs/solver.md)."""
    rows = ["| case | budgets MiB | objective | --fit chose | real use MiB | fits | kvbook chose | real use MiB | fits | "
            "-c fit / kvbook | host reads/token fit / kvbook |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def cell(s: Side) -> tuple[str, str, str]:
            if not s.argv:
                return (s.note, "-", "-")
            return (" ".join(s.argv).replace("|", "\\|"), "/".join(f"{u:.0f}" for u in s.used_mib),
                    "yes" if s.fits else "**no**")

        def reads(s: Side) -> str:
            return "-" if s.host_read_bytes is None or not s.argv else f"{s.host_read_bytes / MiB:.1f} MiB"

        f, k = cell(r.fit), cell(r.kvbook)
        rows.append(f"| {r.case.name} | {'/'.join(map(str, r.case.budgets_mib))} | {r.case.objective} | `{f[0]}` | {f[1]} | "
                    f"{f[2]} | `{k[0]}` | {k[1]} | {k[2]} | {r.fit.n_ctx or '-'} / {r.kvbook.n_ctx or '-'} | "
                    f"{reads(r.fit)} / {reads(r.kvbook)} |")
    return "\n".join(rows)
