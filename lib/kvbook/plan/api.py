"""The one planning API every front end calls (the CLI, launch, capacity, the notebooks and their widgets):
a PlanRequest (the resolved model, the parsed flags, the devices) in, a Plan or a Solution out. Pure: the model
is resolved in kvbook.model.resolve, the devices are data (this machine's facts come from kvbook.ops.host), and
llama.cpp's own accounting for an architecture without a kvbook rule is injected as a FitFallback
(kvbook.ops.fit_params implements it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from kvbook.errors import BadInput
from kvbook.interface import Device, MemoryPlan, ModelArch, Note, Plan, ServerFlags
from kvbook.memory.rules import draft_memory, with_projector
from kvbook.model.resolve import ResolvedModel
from kvbook.plan import solver
from kvbook.plan.planner import make_plan, max_context


@dataclass(frozen=True)
class PlanRequest:
    """One question for the planner: the model as it loads (projector, draft and LoRA adapters attached), the
    llama-server flags, the devices (RPC servers bound), and the notes resolution left (-hf, projector, draft)."""

    model: ModelArch
    flags: ServerFlags
    device: Device
    notes: tuple[Note, ...] = ()
    source: str = ""  # the file or URL that loads (what a FitFallback sizes)
    has_rule: bool = True  # False: kvbook has no rule for model.arch; plan() needs a FitFallback
    unknown: str = ""  # why there is no rule (the loader's message)

    @classmethod
    def of(cls, resolved: ResolvedModel, flags: ServerFlags, device: Device) -> PlanRequest:
        """The request for a model kvbook.model.resolve.resolve_model found for these flags."""
        return cls(model=resolved.arch, flags=flags, device=device, notes=resolved.notes, source=resolved.source,
                   has_rule=resolved.has_rule, unknown=resolved.unknown)

    def with_flags(self, flags: ServerFlags) -> PlanRequest:
        """The same model and devices with other flags (a slider, a solver's placement); the flags must load the
        same model (their -m, -hf, --mmproj, -md and --lora are not resolved again)."""
        return dataclasses.replace(self, flags=flags)


class FitFallback(Protocol):
    """llama.cpp's own accounting for a model kvbook has no rule for (ops/fit_params.py: llama-fit-params)."""

    def memory(self, source: str, flags: ServerFlags, arch: ModelArch) -> tuple[MemoryPlan, str]:
        """The MemoryPlan of `source` under `flags` (caches and compute as llama.cpp counts them), and how it was
        obtained (for the plan's note)."""
        ...


def plan(request: PlanRequest, *, fit_fallback: FitFallback | None = None, search: bool = True) -> Plan:
    """The plan for one request: kvbook's rules (with the solver's placement as an alternative when it does not
    fit), or, for an architecture without a rule, `fit_fallback`'s accounting (refused without one). `search`
    False: no largest context (max_ctx 0) and no alternatives, for a slider that moves many times a second."""
    arch, flags, device = request.model, request.flags, request.device
    if request.has_rule:
        planned = make_plan(arch, flags, device, search=search)
        if search:
            planned = solver.with_placement_alternative(planned, arch, flags, device)
        return dataclasses.replace(planned, notes=(*request.notes, *planned.notes)) if request.notes else planned
    if fit_fallback is None:
        raise BadInput(f"{request.unknown or arch.source}; this front end has no llama-fit-params fallback")
    memory, how = fit_fallback.memory(request.source, flags, arch)
    memory = dataclasses.replace(memory, projector=with_projector(arch, memory.shape, flags),
                                 draft=draft_memory(arch, memory.shape, flags),
                                 lora_bytes=sum(a.buffer_bytes for a in arch.loras))
    planned = make_plan(arch, flags, device, memory=memory, accounting="llama-fit-params")
    note = Note("accounting.llama-fit-params", f"architecture '{arch.arch}' has no kvbook rule: caches and compute "
                f"are llama.cpp's own accounting ({how}, MiB to two decimals); the largest context and alternatives "
                "are not searched")
    return dataclasses.replace(planned, notes=(*request.notes, note, *planned.notes))


def largest_context(request: PlanRequest) -> int:
    """The largest -c (a multiple of 256, at most the training context) that starts with the request's other
    flags, device by device (the plan's max_ctx without planning the rest); needs kvbook's rules."""
    if not request.has_rule:
        raise BadInput(f"{request.unknown}; the largest context is searched with kvbook's rules only")
    return max_context(request.model, request.flags, request.device)


def solve(request: PlanRequest, objective: str = "max-context", top: int = 5) -> solver.Solution:
    """The solver's ranked placements of the flags the request leaves open, and every rejected option with why
    (kvbook plan --solve); needs kvbook's rules for the model."""
    if not request.has_rule:
        raise BadInput(f"{request.unknown}; the solver needs kvbook's rules for the architecture")
    return solver.solve(request.model, request.flags, request.device, objective, top)
