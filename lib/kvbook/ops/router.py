"""Router mode's inputs read from disk (the preset INI, the --models-dir listing) and each child planned;
the rules are plan/router.py's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvbook.errors import BadInput
from kvbook.interface import Device, Plan, ServerFlags
from kvbook.plan import flags as F
from kvbook.plan.router import DRAFT_PREFIXES, RouterModel, child_models, parse_ini, worst_case


def is_router(flags: ServerFlags) -> bool:
    """llama-server starts as a router when it has no model (tools/server/server.cpp is_router_server)."""
    return not (flags.model or flags.hf_repo or flags.model_url)


@cache
def _negatives() -> dict[str, str]:
    """Each switch's spelling -> its negative spelling (--foo -> --no-foo), from the pinned build's --help."""
    out = {}
    for entry in F._options():
        names = entry["names"]
        neg = next((n for n in names if n.startswith(("--no-", "-no-"))), None)
        if neg and not entry["takes_value"]:
            for n in names:
                if not n.startswith(("--no-", "-no-")):
                    out[n] = neg
    return out


def dir_models(folder: str) -> list[tuple[str, tuple[str, ...]]]:
    """--models-dir as common/preset.cpp load_from_models_dir lists it: (name, argv) per model."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"--models-dir {folder}: does not exist or is not a directory (llama-server refuses it)")
    out = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and p.name.endswith(".gguf"))
            mmproj = [p for p in files if "mmproj" in p.name]
            draft = [p for p in files if p.name.startswith(DRAFT_PREFIXES) and p not in mmproj]
            shards = [p for p in files if "-00001-of-" in p.name and p not in mmproj + draft]
            plain = [p for p in files if p not in mmproj + draft + shards]
            model = (shards or plain[-1:])
            if model:
                argv = ["-m", str(model[0])] + (["--mmproj", str(mmproj[-1])] if mmproj else []) + (
                    ["-md", str(draft[0])] if draft else [])
                out.append((entry.name, tuple(argv)))
        elif entry.is_file() and entry.name.endswith(".gguf") and "mmproj" not in entry.name \
                and not entry.name.startswith(DRAFT_PREFIXES):
            out.append((entry.name.replace(".gguf", ""), ("-m", str(entry))))
    return out


def router_models(flags: ServerFlags) -> tuple[RouterModel, ...]:
    """Every model the router may load (preset sections and --models-dir), each as its child's command line."""
    sections = {}
    if flags.models_preset:
        path = Path(flags.models_preset)
        if not path.is_file():
            raise BadInput(f"--models-preset {path}: preset file does not exist (llama-server refuses it)")
        sections = parse_ini(path.read_text(errors="replace"), str(path))
    listed = dir_models(flags.models_dir) if flags.models_dir else []
    models = child_models(sections, listed, flags.argv, F._spellings(), F._env_names(), _negatives())
    if not models:
        raise BadInput("router mode (no -m) with no model in --models-preset or --models-dir: nothing to plan")
    return models


@dataclass(frozen=True)
class RouterPlan:
    """Each child's plan, and the worst case of --models-max of them loaded together (bytes per pool)."""

    models_max: int
    children: tuple[tuple[RouterModel, Plan], ...]
    worst_bytes: Mapping[str, int]
    budgets: Mapping[str, int]

    @property
    def fits(self) -> bool:
        return all(self.worst_bytes[p] <= self.budgets[p] for p in self.worst_bytes)


def plan_router(flags: ServerFlags, device: Device, environ: Mapping[str, str]) -> RouterPlan:
    """Plan each child on `device` as the router spawns it (its own process), and the --models-max worst case."""
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import local_request
    from kvbook.plan.api import plan

    children = []
    for model in router_models(flags):
        try:
            child = F.parse_server_args(model.argv, environ)
            children.append((model, plan(local_request(child, device, environ), fit_fallback=FIT_PARAMS)))
        except BadInput as exc:
            raise BadInput(f"router model '{model.name}': {exc}") from None
    needs = [{u.pool: u.need_bytes for u in p.pools} for _, p in children]
    budgets = {u.pool: u.budget_bytes for u in children[0][1].pools}
    return RouterPlan(models_max=flags.models_max, children=tuple(children), worst_bytes=worst_case(needs, flags.models_max),
                      budgets=budgets)


def format_router(rp: RouterPlan) -> str:
    """The text plan of a router: one line per child, then the worst case per pool."""
    gib = 2**30
    lines = [f"router mode: {len(rp.children)} model(s), each in its own llama-server; --models-max {rp.models_max}"
             f"{' (no limit)' if rp.models_max <= 0 else ''}"]
    for model, p in rp.children:
        need = ", ".join(f"{u.pool} {u.need_bytes / gib:.2f} GiB" for u in p.pools if u.need_bytes)
        lines.append(f"  {model.name:<20} {p.verdict.value:<12} {need}  ({model.source}: {' '.join(model.argv)})")
    n = len(rp.children) if rp.models_max <= 0 else min(rp.models_max, len(rp.children))
    worst = ", ".join(f"{pool} {b / gib:.2f} of {rp.budgets[pool] / gib:.2f} GiB" for pool, b in rp.worst_bytes.items())
    lines.append(f"worst case, the {n} largest loaded together: {worst} -> {'fits' if rp.fits else 'does not fit'}")
    lines.append("note: models in the hub cache (llama-server lists them too) are not planned; start/growth of each "
                 "child as in its own plan (kvbook plan -- llama-server ARGS)")
    return "\n".join(lines)


def router_summary(rp: RouterPlan) -> dict:
    """`kvbook plan --json` for a router: each child's plan summary, and the worst case."""
    from kvbook.plan.summary import plan_summary

    return {"router": {"models_max": rp.models_max, "fits": rp.fits, "worst_case_bytes": dict(rp.worst_bytes),
                       "budget_bytes": dict(rp.budgets),
                       "models": [{"name": m.name, "source": m.source, "argv": list(m.argv), "plan": plan_summary(p)}
                                  for m, p in rp.children]}}
