"""llama-server's own --fit decision in a public log, against kvbook's prediction of it (plan/fit.py).

A log at -lv 4 / -v prints fit's steps (common/fit.cpp common_params_fit_impl, `llama_params_fit_impl` in older
builds): the free memory and target per device, every layer assignment it measured with a dry-run allocation
(`id=0, n_layer=20, n_part=0, overflow_type=4, mem= 4080 MiB`) and the layers it settled on per device. Given the
model and context check-log rebuilt from the same log, kvbook measures the same assignments and runs its own fit
over the device's free memory as fit saw it (target + margin, not the later "using device ... MiB free").
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from kvbook.interface import MiB, ServerFlags
from kvbook.ops.check_log import LogCheck

_TRIAL = re.compile(r"_fit_impl: id=(\d+), n_layer=\s*(\d+), n_part=\s*(\d+), overflow_type=(\d+), mem=\s*(\d+) MiB")
_TARGET = re.compile(r"_fit_impl: id=(\d+), target=(\d+) MiB")
_MARGIN = re.compile(r"free memory target of\s+(\d+) MiB")
_CHOSEN = re.compile(r"_fit_impl:\s+- (\S+) \(.*?\): (\d+) layers")


@dataclass(frozen=True)
class FitTrial:
    """One layer assignment fit measured: its bytes and kvbook's for the same assignment (one device)."""

    n_layer: int
    logged_mib: int
    planned_mib: float


@dataclass(frozen=True)
class FitLogCheck:
    """fit's layer choice on one device in a log beside kvbook's, with every assignment fit measured."""

    device: str
    free_mib: int
    margin_mib: int
    logged_layers: int
    predicted_layers: int | None
    trials: tuple[FitTrial, ...]
    note: str


def fit_log_check(text: str, check: LogCheck) -> FitLogCheck | None:
    """kvbook against fit's own layer search in a log that shows one (one device, dense layers; None otherwise).
    The model's weights are the log's model buffers spread over its shapes (a log has no tensor list)."""
    from kvbook.memory.rules import plan_memory
    from kvbook.plan.fit import predict_fit
    from kvbook.plan.planner import place

    chosen = _CHOSEN.findall(text)
    targets = _TARGET.findall(text)
    margin = _MARGIN.search(text)
    trials = [tuple(int(x) for x in m) for m in _TRIAL.findall(text)]
    if check.plan is None or len(chosen) != 1 or len(targets) != 1 or not margin or not trials:
        return None
    if any(n_part for _, _, n_part, _, _ in trials):  # experts or partial layers: not in the public logs yet
        return None
    plan = check.plan
    logged_weights = sum(r.logged.weights_bytes or 0 for r in check.devices)
    model = dataclasses.replace(plan.model, weights_bytes=logged_weights) if logged_weights else plan.model
    name = chosen[0][0]
    pool = next((p for p in plan.device.pools if p.name == name), None)
    if pool is None:
        return None
    free = int(targets[0][1]) + int(margin.group(1))
    device = dataclasses.replace(plan.device, pools=tuple(
        dataclasses.replace(p, budget_bytes=free * MiB, total_bytes=free * MiB) if p.name == name else p
        for p in plan.device.pools))
    at_estimate = functools.partial(place, compute_at="estimate")
    measured = []
    for _, n_layer, _, _, mem in trials:
        flags = dataclasses.replace(plan.flags, gpu_layers=str(n_layer), fit=False)
        use = {u.pool: u for u in at_estimate(model, flags, plan_memory(model, flags), device)}[name]
        mib = (use.weights_bytes + use.kv_bytes + use.recurrent_bytes + use.compute_bytes) / MiB
        measured.append(FitTrial(n_layer, mem, round(mib, 1)))
    unset: ServerFlags = dataclasses.replace(plan.flags, gpu_layers="auto", fit=True,
                                             fit_target_mib=(int(margin.group(1)),))
    # the prediction kvbook plan makes (compute at the interval's high end, as the verdict); the trials above are
    # at the estimate, which is what fit's dry run is compared with
    adjusted, outcome = predict_fit(model, unset, device, place)
    predicted = int(adjusted.gpu_layers) if adjusted.gpu_layers.isdigit() else None
    return FitLogCheck(device=name, free_mib=free, margin_mib=int(margin.group(1)), logged_layers=int(chosen[0][1]),
                       predicted_layers=predicted, trials=tuple(measured),
                       note=outcome.reason or "; ".join(outcome.changes[:2]))
