"""What llama-server's log (-lv 4) says about each task's prompt cache, matched to the requests that caused it.

Per task: its slot, the prompt length (`new prompt ... task.n_tokens`), the first reuse figure (`cached n_tokens`),
how the slot was chosen (LCP similarity, LRU, by id), and whether the server forced full re-processing for
lack of an SWA/hybrid checkpoint, rolled back to an earlier checkpoint, or shifted the context. Requests are matched to tasks in the order they were
sent, by prompt length (the server's count equals cache_read_input_tokens + input_tokens).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvbook.load.generator import TurnRecord

_TASK = re.compile(r"slot\s+\S+: id\s+(\d+) \| task (-?\d+) \| (.*)")
_NEW = re.compile(r"new prompt, n_ctx_slot = (\d+), n_keep = \d+, task\.n_tokens = (\d+)")
_CACHED = re.compile(r"cached n_tokens = (\d+)")


@dataclass(frozen=True)
class TaskLog:
    task: int
    slot: int
    n_tokens: int
    ctx_slot: int
    cached: int | None = None
    selected_by: str | None = None  # "lcp", "lru", "id"
    forced_full: bool = False
    restored_checkpoint: int | None = None  # n_past after rolling back to an SWA/hybrid context checkpoint
    context_shift: bool = False
    previous_task_on_slot: int | None = None


def parse_tasks(log: str) -> list[TaskLog]:
    """Tasks in the order their prompts arrived."""
    tasks: dict[int, TaskLog] = {}
    order: list[int] = []
    pending_select: dict[int, str] = {}  # slot -> how it was chosen, before the task id is known
    last_on_slot: dict[int, int] = {}
    for line in log.splitlines():
        m = _TASK.search(line)
        if not m:
            continue
        slot, task, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if "selected slot by" in rest:
            pending_select[slot] = "lcp" if "LCP" in rest else "lru" if "LRU" in rest else "id"
            continue
        if task < 0:
            continue
        new = _NEW.search(rest)
        if new:
            tasks[task] = TaskLog(task=task, slot=slot, n_tokens=int(new.group(2)), ctx_slot=int(new.group(1)),
                                  selected_by=pending_select.pop(slot, None), previous_task_on_slot=last_on_slot.get(slot))
            last_on_slot[slot] = task
            order.append(task)
            continue
        if task not in tasks:
            continue
        t = tasks[task]
        cached = _CACHED.search(rest)
        if cached and t.cached is None:
            tasks[task] = replace(t, cached=int(cached.group(1)))
        elif "restored context checkpoint" in rest:
            m_past = re.search(r"n_past = (\d+)", rest)
            tasks[task] = replace(t, restored_checkpoint=int(m_past.group(1)) if m_past else 0)
        elif "forcing full prompt re-processing" in rest:
            tasks[task] = replace(t, forced_full=True)
        elif "slot context shift" in rest:
            tasks[task] = replace(t, context_shift=True)
    return [tasks[i] for i in order]


def match_tasks(prompt_lengths: Sequence[int | None], tasks: Sequence[TaskLog]) -> list[TaskLog | None]:
    """For each request (in the order sent) the first unmatched task with the same prompt length."""
    used: set[int] = set()
    out: list[TaskLog | None] = []
    for n in prompt_lengths:
        hit = next((t for t in tasks if t.task not in used and t.n_tokens == n), None) if n is not None else None
        if hit is not None:
            used.add(hit.task)
        out.append(hit)
    return out


def log_cause(task: TaskLog | None, session_tasks: set[int]) -> str | None:
    """The miss cause the log proves for a task, given the ids of the earlier tasks of the same session."""
    if task is None:
        return None
    if task.context_shift:
        return "context_shift"
    if task.forced_full or task.restored_checkpoint is not None:
        return "swa_checkpoint"  # no checkpoint, or only one from before the shared part: reuse rolled back
    if session_tasks and task.previous_task_on_slot is not None and task.previous_task_on_slot not in session_tasks:
        return "slot_evicted"
    return None


def with_log_causes(records: Sequence[TurnRecord], log: str) -> list[TurnRecord]:
    """The records with `cache.log_cause` filled from the server log where a task matches."""
    tasks = match_tasks([r.cache.prompt_n if r.cache else None for r in records], parse_tasks(log))
    seen: dict[str, set[int]] = {}
    out = []
    for record, task in zip(records, tasks):
        mine = seen.setdefault(record.session, set())
        if record.cache is not None and task is not None:
            record = replace(record, cache=replace(record.cache, log_cause=log_cause(task, mine)))
            mine.add(task.task)
        out.append(record)
    return out


# server-context.cpp create_checkpoint and server-task.cpp server_prompt_cache::update, at -lv 4 (trace)
_CHECKPOINT = re.compile(r"created context checkpoint \d+ of \d+ \(pos_min = -?\d+, pos_max = -?\d+, "
                         r"n_tokens = (\d+), size = ([\d.]+) MiB\)")
_CACHE_STATE = re.compile(r"cache state: (\d+) prompts, ([\d.]+) MiB")
_CACHED_PROMPT = re.compile(r"- prompt 0?x?[0-9a-fA-F]+:\s+(\d+) tokens, checkpoints:\s+(\d+),\s+([\d.]+) MiB")


@dataclass(frozen=True)
class CachedPrompt:
    """One prompt in the server's prompt cache, as its update lists it: tokens, checkpoints carried, MiB."""

    n_tokens: int
    checkpoints: int
    mib: float


@dataclass(frozen=True)
class HostGrowthLog:
    """What the server logged about host growth: each checkpoint it created (n_tokens, MiB, three decimals) and
    the prompt cache after each update (the prompts it holds)."""

    checkpoints: tuple[tuple[int, float], ...]
    cache_states: tuple[tuple[CachedPrompt, ...], ...]

    @property
    def cache_mib(self) -> float:
        """The prompt cache's size after its last update."""
        return sum(p.mib for p in self.cache_states[-1]) if self.cache_states else 0.0


def parse_host_growth(log: str) -> HostGrowthLog:
    """Checkpoints and prompt-cache states from a -lv 4 llama-server log."""
    checkpoints: list[tuple[int, float]] = []
    states: list[tuple[CachedPrompt, ...]] = []
    current: list[CachedPrompt] | None = None
    for line in log.splitlines():
        m = _CHECKPOINT.search(line)
        if m:
            checkpoints.append((int(m.group(1)), float(m.group(2))))
            continue
        if _CACHE_STATE.search(line):
            current = []
            states.append(())
            continue
        m = _CACHED_PROMPT.search(line)
        if m and current is not None:
            current.append(CachedPrompt(int(m.group(1)), int(m.group(2)), float(m.group(3))))
            states[-1] = tuple(current)
    return HostGrowthLog(tuple(checkpoints), tuple(states))
