"""A LiteLLM model_list covering exactly the model IDs Claude Code sends, with stale-slot warnings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kvbook.claude.probe import ProbeReport
from kvbook.errors import BadInput
from kvbook.ops.litellm import ANTHROPIC, Route
from kvbook.yamlio import read_yaml


@dataclass(frozen=True)
class RoutingPlan:
    """LiteLLM routes for the IDs the client really sends, and what a person should know about them."""

    routes: tuple[Route, ...]
    warnings: tuple[str, ...]
    covered: Mapping[str, tuple[str, ...]]  # intent key -> model IDs routed for it


def plan_routes(intent: Mapping[str, str], report: ProbeReport, api_base: str, *, backend: str = ANTHROPIC,
                configured: Iterable[str] = ()) -> RoutingPlan:
    """Routes for each alias in `intent` (alias -> upstream model), covering exactly the IDs the probe saw.

    `configured` are model slots from an existing config (e.g. a blog's `claude-opus-4-7`); each one
    the client never sends is named in a warning, as is any side-call ID left without a route.
    """
    if not intent:
        raise BadInput("the routing intent is empty; give at least one alias -> upstream model, e.g. {'opus': 'local'}")
    probed = sorted({r.requested for r in report.rows})
    by_id: dict[str, str] = {}
    covered: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    for alias, upstream in intent.items():
        if not isinstance(upstream, str) or not upstream:
            raise BadInput(f"routing intent {alias!r}: the upstream model must be a non-empty name")
        ids = report.ids_for(alias)
        if not ids:
            if alias not in probed:
                raise BadInput(f"routing intent names {alias!r}, which the probe did not try; probed: {', '.join(probed)}")
            raise BadInput(f"the probe saw no model ID for {alias!r} (see its note in the probe table)")
        for mid in ids:
            if by_id.get(mid, upstream) != upstream:
                raise BadInput(f"model ID {mid} would go to both {by_id[mid]} and {upstream}; "
                               f"the client sends the same ID for two aliases of the intent")
            by_id[mid] = upstream
        covered[alias] = ids
    routes = tuple(Route(mid, backend, up, api_base) for mid, up in by_id.items())
    sent = {r.model_id for r in report.rows if r.model_id}
    for slot in configured:
        if slot not in sent:
            near = [f"{a} sends {', '.join(covered.get(a) or report.ids_for(a))}" for a in intent]
            warnings.append(f"configured slot {slot} is never sent by Claude Code {report.client_version} "
                            f"({'; '.join(near)})")
    routed_rows = [r for r in report.rows if r.requested in intent]
    side = sorted({i for r in routed_rows for i in r.other_ids if i not in by_id})
    for mid in side:
        warnings.append(f"the client also sends {mid} (side requests in the same runs), which no route covers; "
                        f"add it to the intent or a catch-all route")
    return RoutingPlan(routes=routes, warnings=tuple(warnings), covered=covered)


def configured_slots(config: Path) -> tuple[str, ...]:
    """The model_name entries of an existing LiteLLM config, to check against the probe."""
    doc = read_yaml(config)
    entries = doc.get("model_list") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise BadInput(f"{config}: no model_list found; is it a LiteLLM config?")
    return tuple(str(e["model_name"]) for e in entries if isinstance(e, dict) and "model_name" in e)
