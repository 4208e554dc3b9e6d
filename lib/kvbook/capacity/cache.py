"""Prefix-cache accounting: per turn cache_n / prompt_n, and for every miss its cause and the setting that fixes it.

A turn could reuse `reusable_n` tokens: its session's previous prompt plus the reply (or, for a first turn,
the system prompt and tools another session already sent). It is a miss when the server reused clearly
less. The cause is the first that applies: something the client changed near the start (the attribution
header, a reminder before the history), then what the server log says for that task (context shift, full
re-processing for lack of an SWA/hybrid checkpoint, a slot taken by another session), then what the set-up
makes likely (more sessions than slots; an SWA/recurrent model), else unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CAUSES = {
    "attribution_header": "set CLAUDE_CODE_ATTRIBUTION_HEADER=0 (settings.json \"env\"): the per-request billing "
                          "block at the top of the system prompt changes every request",
    "reminder_position": "keep the per-turn <system-reminder> in the newest user message; a changing reminder "
                         "before the history invalidates everything after it",
    "context_shift": "give each slot more context (-c = slots x per-slot context) or compact earlier in Claude Code "
                     "(CLAUDE_AUTOCOMPACT_PCT_OVERRIDE): the prompt outgrew the slot and was shifted/truncated",
    "swa_checkpoint": "keep context checkpoints (--ctx-checkpoints N, default 32; or --swa-full): an SWA/hybrid model "
                      "cannot reuse a prefix without one",
    "slot_evicted": "more slots (-np, sized with kvbook plan), -kvu, or a host prompt cache (--cache-ram MiB): another "
                    "session took this session's slot",
    "unknown": "look at this task in the server log at -lv 4",
}


@dataclass(frozen=True)
class TurnCache:
    """One request's prompt-cache facts, from the client, the response usage and (optionally) the server log."""

    session: str
    turn: int  # 1-based within the conversation
    kind: str  # "main" or "subagent"
    prompt_n: int  # cache_read_input_tokens + input_tokens
    cache_n: int  # cache_read_input_tokens
    reusable_n: int  # what an intact cache could have reused
    client_change: str | None = None  # "attribution_header" or "reminder_position" when the client changed the prefix
    log_cause: str | None = None  # "context_shift", "swa_checkpoint" or "slot_evicted" from the server log
    sessions_over_slots: bool = False  # more sessions were live than the server has slots
    swa_or_hybrid: bool = False  # the model keeps SWA or recurrent state (checkpoints needed for reuse)
    near_context_end: bool = False  # prompt + max_tokens reached the slot's context

    @property
    def hit_ratio(self) -> float:
        return self.cache_n / self.prompt_n if self.prompt_n else 0.0

    @property
    def missed(self) -> bool:
        return self.reusable_n > 0 and self.cache_n < self.reusable_n - max(16, 0.05 * self.reusable_n)


def miss_cause(t: TurnCache) -> str | None:
    """None for a hit (or a turn with nothing to reuse), else one key of CAUSES."""
    if not t.missed:
        return None
    if t.client_change:
        return t.client_change
    if t.log_cause:
        return t.log_cause
    if t.near_context_end:
        return "context_shift"
    if t.sessions_over_slots:
        return "slot_evicted"
    if t.swa_or_hybrid:
        return "swa_checkpoint"
    return "unknown"


def cache_summary(turns: Sequence[TurnCache]) -> dict[str, object]:
    """The summary.json `cache` block: turns, median hit ratio, misses counted by cause, fixes for those seen."""
    ratios = sorted(t.hit_ratio for t in turns)
    causes: dict[str, int] = {}
    for t in turns:
        cause = miss_cause(t)
        if cause:
            causes[cause] = causes.get(cause, 0) + 1
    median = None
    if ratios:
        mid = len(ratios) // 2
        median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return {"turns": len(turns), "hit_ratio_median": None if median is None else round(median, 4),
            "misses": sum(causes.values()), "misses_by_cause": causes,
            "fixes": {c: CAUSES[c] for c in causes}}
