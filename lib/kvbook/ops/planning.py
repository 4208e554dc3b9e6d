"""Plan any model: kvbook's rules where it has them, llama.cpp's own accounting (llama-fit-params on the
file) for a local GGUF of any other architecture llama.cpp loads, labelled as such."""

from __future__ import annotations

from pathlib import Path

from kvbook.interface import Device, Plan, ServerFlags
from kvbook.model.arch import UnknownArchitecture
from kvbook.model.sources import load_model
from kvbook.plan.planner import make_plan


def plan_any(flags: ServerFlags, device: Device) -> Plan:
    """The plan for `flags` on `device`; an architecture without a kvbook rule is sized by llama-fit-params."""
    try:
        arch = load_model(flags.model)
    except UnknownArchitecture as e:
        path = Path(flags.model).expanduser()
        if e.generic is None or not path.is_file():
            raise
        from kvbook.ops.fit_params import memory_from_fit

        memory = memory_from_fit(path, flags, e.generic)
        plan = make_plan(e.generic, flags, device, memory=memory, accounting="llama-fit-params")
        note = (f"architecture '{e.generic.arch}' has no kvbook rule: caches and compute are llama.cpp's own "
                "accounting (llama-fit-params on this file, MiB to two decimals); the largest context and "
                "alternatives are not searched")
        from dataclasses import replace

        return replace(plan, notes=(note, *plan.notes))
    return make_plan(arch, flags, device)
