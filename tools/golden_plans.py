"""Golden plans: the `kvbook plan --json` document (plan_summary) of every model preset on every device preset,
and of the bundled GGUFs at a few flag sets, frozen under tests/golden/ so that a rule change that moves a number
shows up as a field-by-field diff in tests/test_golden_plans.py.

    .venv/bin/python tools/golden_plans.py          # rewrite tests/golden/*.json, then review `git diff`
    .venv/bin/python tools/golden_plans.py --check  # exit 1 and print the diff when a plan moved

Only host-independent inputs: no environment variables (LLAMA_ARG_*, HF_*), and the host is pinned (GOLDEN_HOST:
64 GiB of RAM, no GPU, an x86-64 AVX2 CPU for CPU_REPACK) for the plans that read it: a device preset without a
host pool borrows the host's RAM, and a plan on this machine repacks for the host's CPU. A bundled GGUF's
path is written as <model:NAME>, so the files do not depend on where the venv is."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvbook.errors import KvbookError
from kvbook.interface import GiB, Host, Plan
from kvbook.model.sources import preset_ids
from kvbook.plan.devices import THIS_MACHINE, device_ids
from kvbook.plan.weights import X86_AVX2

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden"
REGENERATE = ".venv/bin/python tools/golden_plans.py"

# what the plans see of "this machine": a fixed Host, so no plan reads this machine's RAM, CPU or GPUs
GOLDEN_HOST = Host(platform="linux", ram_bytes=64 * GiB, cpu=X86_AVX2)

BUNDLED = ("smollm2-135m", "gemma3-270m")
# (file stem, flags after -m MODEL, device preset or THIS_MACHINE for GOLDEN_HOST)
BUNDLED_CASES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("c32768-np1", ("-c", "32768", "-np", "1"), THIS_MACHINE),
    ("c8192-np4-q8-fa", ("-c", "8192", "-np", "4", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"), THIS_MACHINE),
    ("c4096-norepack", ("-c", "4096", "-np", "2", "--no-repack"), THIS_MACHINE),
    ("c32768-np1", ("-c", "32768", "-np", "1"), "m1-max-32"),
    ("ngl99-c16384", ("-ngl", "99", "-c", "16384", "-np", "2"), "rtx-4090-host-64"),
    ("ngl10-c16384", ("-ngl", "10", "-c", "16384"), "rtx-4090-host-64"),
    ("ngl99-c8192", ("-ngl", "99", "-c", "8192"), "2x-rtx-3090"),
    ("ngl-all-c8192", ("-c", "8192"), "rpc-2-hosts"),  # + --rpc and -ngl all
)


def plan_request(argv: Sequence[str], device_id: str) -> Plan:
    """The one call into the planner, as `kvbook plan --device DEVICE -- llama-server ARGV` makes it (no
    environment variables, no saved calibrations), on GOLDEN_HOST."""
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import local_request
    from kvbook.plan.api import plan
    from kvbook.plan.devices import resolve_device
    from kvbook.plan.flags import parse_server_args

    flags = parse_server_args(["llama-server", *argv], {})
    device = resolve_device(preset=device_id, endpoints=flags.rpc, host=GOLDEN_HOST)
    return plan(local_request(flags, device, environ={}, host=GOLDEN_HOST, calibrations=False), fit_fallback=FIT_PARAMS)


def document(plan: Plan | str) -> dict[str, Any]:
    """The golden document: the plan's JSON (plan_summary), or {"error": the one-line message} for a request kvbook
    refuses (that is pinned too)."""
    from kvbook.plan.summary import plan_summary

    return {"error": plan} if isinstance(plan, str) else plan_summary(plan)


def _bundled_paths() -> dict[str, str]:
    from kvbook.ops.components import model_path

    return {name: str(model_path(name)) for name in BUNDLED}


def _rpc_flags(device_id: str) -> tuple[str, ...]:
    """--rpc with the endpoints of a preset's RPC devices, in order, and -ngl all (llama-server must be given
    them; kvbook plans a given placement, not --fit's)."""
    from kvbook.plan.devices import endpoint_of, load_device

    rpc = [endpoint_of(p) for p in load_device(device_id, GOLDEN_HOST).pools if p.kind == "rpc"]
    return ("--rpc", ",".join(rpc), "-ngl", "all") if rpc else ()


def requests() -> list[tuple[str, tuple[str, ...], str]]:
    """(golden file name, llama-server argv, device) of every golden plan; <model:NAME> stands for a bundled GGUF."""
    rpc = {d: _rpc_flags(d) for d in device_ids()}
    out = [(f"preset-{m}--{d}", ("-m", m, *rpc[d]), d) for m in preset_ids() for d in device_ids()]
    out += [(f"gguf-{name}--{stem}--{d}", ("-m", f"<model:{name}>", *flags, *rpc.get(d, ())), d)
            for name in BUNDLED for stem, flags, d in BUNDLED_CASES]
    return out


def plans(only: Callable[[str], bool] = lambda name: True) -> dict[str, Plan | str]:
    """{golden file name: its plan now, or the one-line error of a refused request}, on the pinned host."""
    paths = _bundled_paths()
    out: dict[str, Plan | str] = {}
    for name, argv, device in requests():
        if only(name):
            real = [next((paths[m] for m in BUNDLED if a == f"<model:{m}>"), a) for a in argv]
            try:
                out[name] = plan_request(real, device)
            except KvbookError as e:
                out[name] = str(e)
    return out


def serialise(doc: dict[str, Any], paths: dict[str, str] | None = None) -> str:
    """The document as the golden file's bytes, with each bundled GGUF's path written as <model:NAME>."""
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    for name, path in (_bundled_paths() if paths is None else paths).items():
        text = text.replace(json.dumps(path)[1:-1], f"<model:{name}>")
    return text


def generate(only: Callable[[str], bool] = lambda name: True) -> dict[str, str]:
    """{golden file name: its bytes} planned now."""
    paths = _bundled_paths()
    return {name: serialise(document(plan), paths) for name, plan in plans(only).items()}


def diff(golden: Any, now: Any, path: str = "") -> list[str]:
    """Field-by-field differences: one line each, the JSON path with golden and now."""
    if isinstance(golden, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(golden) | set(now), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in now:
                out.append(f"{where}: golden {json.dumps(golden[key])[:120]}, now missing")
            elif key not in golden:
                out.append(f"{where}: golden missing, now {json.dumps(now[key])[:120]}")
            else:
                out += diff(golden[key], now[key], where)
        return out
    if isinstance(golden, list) and isinstance(now, list):
        out = [line for i, (g, n) in enumerate(zip(golden, now)) for line in diff(g, n, f"{path}[{i}]")]
        if len(golden) != len(now):
            out.append(f"{path}: golden {len(golden)} items, now {len(now)}")
        return out
    if golden != now or type(golden) is not type(now):
        return [f"{path}: golden {json.dumps(golden)[:200]}, now {json.dumps(now)[:200]}"]
    return []


def compare(now: dict[str, str], golden_dir: Path = GOLDEN_DIR) -> list[str]:
    """Every difference between the plans of now and the files in golden_dir, grouped by file."""
    out = []
    files = {p.stem: p for p in golden_dir.glob("*.json")}
    for name in sorted(set(files) | set(now)):
        if name not in files:
            out.append(f"{name}.json: no golden file (a new request)")
        elif name not in now:
            out.append(f"{name}.json: golden file of a request that is no longer planned")
        else:
            lines = diff(json.loads(files[name].read_text()), json.loads(now[name]))
            out += [f"{name}.json: {line}" for line in lines]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/golden_plans.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--print", metavar="NAME", help="print one golden plan as planned now (no file written)")
    args = parser.parse_args(argv)
    if args.print:
        now = generate(lambda name: name == args.print)
        if not now:
            print(f"golden_plans: no request named {args.print!r}", file=sys.stderr)
            return 2
        sys.stdout.write(now[args.print])
        return 0
    now = generate()
    if args.check:
        lines = compare(now)
        print("\n".join(lines) if lines else f"{len(now)} golden plans unchanged")
        return 1 if lines else 0
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for stale in GOLDEN_DIR.glob("*.json"):
        if stale.stem not in now:
            stale.unlink()
    for name, text in now.items():
        (GOLDEN_DIR / f"{name}.json").write_text(text)
    print(f"wrote {len(now)} golden plans to {GOLDEN_DIR.relative_to(REPO)}; review `git diff tests/golden`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
