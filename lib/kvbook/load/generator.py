"""Run Claude-Code-shaped sessions at a fixed concurrency against one route, bounded in count and time.

Closed loop, as agents behave: `concurrency` workers each run one session at a time, turn after turn with
no think time, until `sessions` have started or the time budget is spent (a session in flight finishes).
Every request is recorded with its timings and its prompt-cache facts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvbook.capacity.cache import TurnCache
from kvbook.capacity.slo import RequestSample
from kvbook.capacity.workload import AgentShape, Conversation, Workload
from kvbook.errors import BadInput, ServerError
from kvbook.load.client import Streamed, require_loopback, stream_message
from kvbook.smoke.checks import Target

MAX_CONCURRENCY = 64
MAX_SESSIONS = 512


@dataclass(frozen=True)
class ServerFacts:
    """What the accounting needs to know about the server: slots, per-slot context, SWA/recurrent state."""

    slots: int
    ctx_per_slot: int
    swa_or_hybrid: bool = False


@dataclass(frozen=True)
class TurnRecord:
    """One request of a level: who sent it, when, what came back."""

    session: str
    kind: str
    turn: int
    concurrency: int
    sent_s: float  # from the start of the level
    streamed: Streamed
    cache: TurnCache | None  # None when the response carried no usage

    @property
    def sample(self) -> RequestSample:
        s = self.streamed
        return RequestSample(ttft_ms=None if s.ttft_s is None else 1000 * s.ttft_s,
                             itl_ms=None if s.itl_s is None else 1000 * s.itl_s, e2e_ms=1000 * s.e2e_s,
                             output_tokens=s.output_tokens, ok=s.ok, error=s.error)


@dataclass(frozen=True)
class LevelRun:
    concurrency: int
    wall_s: float
    turns: tuple[TurnRecord, ...]
    sessions: int


class _Shared:
    """State the workers share: the session counter, whether the run's common prefix has been processed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_session = 0
        self.prefix_warm = False
        self.records: list[TurnRecord] = []


def run_level(target: Target, shape: AgentShape, workload: Workload, concurrency: int, *, sessions: int,
              facts: ServerFacts, prefix_tokens: int, nonce: str, time_budget_s: float = 120.0,
              timeout_s: float = 300.0, on_turn: Callable[[TurnRecord], None] | None = None,
              label: str = "") -> LevelRun:
    """`concurrency` workers run `sessions` sessions of `workload` turns (or until the budget is spent)."""
    require_loopback(target)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise BadInput(f"concurrency must be 1..{MAX_CONCURRENCY}, got {concurrency}")
    if not 1 <= sessions <= MAX_SESSIONS:
        raise BadInput(f"sessions per level must be 1..{MAX_SESSIONS}, got {sessions}")
    if not 0 < time_budget_s <= 3600:
        raise BadInput(f"a level's time budget must be in (0, 3600] s, got {time_budget_s}")
    shared = _Shared()
    start = time.monotonic()
    deadline = start + time_budget_s
    errors: list[BaseException] = []

    def one_turn(conv: Conversation, prev: TurnRecord | None) -> TurnRecord:
        sent = time.monotonic() - start
        with shared.lock:
            warm = shared.prefix_warm
        # a new connection per request: llama-server closes idle keep-alive connections between sessions
        streamed = stream_message(target, conv.body(), timeout_s=timeout_s)
        cache = None
        if streamed.prompt_n is not None:
            if prev is not None and prev.streamed.prompt_n is not None:
                reusable = prev.streamed.prompt_n + prev.streamed.output_tokens
            else:
                reusable = prefix_tokens if warm else 0
            change = None
            if reusable:
                if shape.attribution:
                    change = "attribution_header"
                elif workload.reminder == "system":
                    change = "reminder_position"
            cache = TurnCache(session=conv.session, turn=conv.turn + 1, kind=conv.kind, prompt_n=streamed.prompt_n,
                              cache_n=streamed.cache_n or 0, reusable_n=min(reusable, streamed.prompt_n),
                              client_change=change, sessions_over_slots=concurrency > facts.slots,
                              swa_or_hybrid=facts.swa_or_hybrid,
                              near_context_end=streamed.prompt_n + workload.max_tokens >= facts.ctx_per_slot)
        if streamed.ok:
            with shared.lock:
                shared.prefix_warm = True
        record = TurnRecord(session=conv.session, kind=conv.kind, turn=conv.turn + 1, concurrency=concurrency,
                            sent_s=sent, streamed=streamed, cache=cache)
        conv.reply(streamed.text)
        with shared.lock:
            shared.records.append(record)
        if on_turn:
            on_turn(record)
        return record

    def run_session(index: int) -> None:
        name = f"{label or 'c'}{concurrency}-s{index}"
        conv = Conversation(shape, workload, model=target.model, nonce=nonce, session=name)
        prev = None
        extra = ""
        for turn in range(workload.turns):
            if workload.subagent_every and turn and turn % workload.subagent_every == 0:
                sub = Conversation(shape, workload, model=target.model, nonce=nonce, session=f"{name}-a{turn}",
                                   kind="subagent")
                sub_prev = None
                for _ in range(workload.subagent_turns):
                    sub.user_turn("Task from the main agent: summarise the findings so far.")
                    sub_prev = one_turn(sub, sub_prev)
                extra = f"Subagent result: {sub_prev.streamed.text[:400] if sub_prev else ''}"
            conv.user_turn(extra)
            extra = ""
            prev = one_turn(conv, prev)
            if not prev.streamed.ok:
                return  # a failed turn ends the session: its history would no longer be what an agent holds

    def worker() -> None:
        while True:
            with shared.lock:
                if shared.next_session >= sessions or time.monotonic() >= deadline:
                    return
                index = shared.next_session
                shared.next_session += 1
            try:
                run_session(index)
            except BaseException as exc:  # reported after join, never lost in a thread
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, name=f"kvbook-agent-{i}", daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    bound = time_budget_s + (workload.turns * (1 + workload.subagent_turns)) * timeout_s + 30
    for t in threads:
        t.join(max(0.0, start + bound - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise ServerError(f"load workers did not finish within {bound:.0f} s")
    if errors:
        raise ServerError(f"a load worker failed: {type(errors[0]).__name__}: {errors[0]}")
    records = sorted(shared.records, key=lambda r: r.sent_s)
    return LevelRun(concurrency=concurrency, wall_s=time.monotonic() - start, turns=tuple(records),
                    sessions=shared.next_session)
