"""Claude-Code-shaped sessions as request bodies: the recorded system prompt, tools and fields, a history
that grows turn by turn, a system reminder per turn, optional subagent branches, unique content per run.

Pure: the generator in kvbook.load sends these bodies and feeds the replies back. Uniqueness: a run nonce
follows the billing block (so no run reuses another run's cache, while the sessions of one run still share
the system prompt and tools, as real sessions do); each session's user content comes from its own seed.
"""

from __future__ import annotations

import copy
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvbook.errors import BadInput

BILLING_PREFIX = "x-anthropic-billing-header"
REMINDER_POSITIONS = ("append", "system", "none")
# Request fields the generator sets itself or that a load test must not send.
_OWN_FIELDS = ("model", "messages", "system", "tools", "max_tokens", "stream", "_headers")
_WORDS = ("alpha bravo cache delta engine filter graph handler index join kernel layer module node offset parser "
          "query router schema token update vector worker yield buffer commit deploy branch socket thread lock "
          "queue batch slot prompt tensor metric proxy config budget memory device").split()


@dataclass(frozen=True)
class AgentShape:
    """What a real client's request looks like, reduced to what shapes the load."""

    system: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...]
    context_messages: tuple[dict[str, Any], ...]  # messages the client sends before the user's text (agent list)
    reminder: str  # the client's first-turn <system-reminder> text
    fields: Mapping[str, Any] = field(default_factory=dict)  # metadata, thinking, ... as recorded
    client: str = ""

    @property
    def attribution(self) -> bool:
        return any(str(b.get("text", "")).startswith(BILLING_PREFIX) for b in self.system)


def _texts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]


def shape_from_capture(body: Mapping[str, Any], client: str = "") -> AgentShape:
    """An AgentShape from one recorded first request (kvbook.claude.e2e.capture_request)."""
    system = body.get("system")
    if isinstance(system, str):
        system = [{"type": "text", "text": system}]
    if not isinstance(system, list) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadInput("a captured request needs a system prompt and messages")
    messages = body["messages"]
    first = _texts(messages[0].get("content"))
    reminder = next((b["text"] for b in first if b.get("text", "").lstrip().startswith("<system-reminder>")), "")
    fields = {k: copy.deepcopy(v) for k, v in body.items() if k not in _OWN_FIELDS}
    return AgentShape(system=tuple(copy.deepcopy(system)), tools=tuple(copy.deepcopy(body.get("tools") or [])),
                      context_messages=tuple(copy.deepcopy(m) for m in messages[1:] if m.get("role") != "assistant"),
                      reminder=reminder, fields=fields, client=client)


def scale_shape(shape: AgentShape, fraction: float) -> AgentShape:
    """A smaller shape for small machines: the first ceil(fraction * n) tools whole, each long system
    text cut to that fraction at a word boundary. 1.0 is the shape as recorded."""
    if not 0 < fraction <= 1:
        raise BadInput(f"prompt scale must be in (0, 1], got {fraction}")
    if fraction == 1:
        return shape
    n_tools = max(1, -(-len(shape.tools) * fraction // 1)) if shape.tools else 0

    def cut(block: dict[str, Any]) -> dict[str, Any]:
        text = str(block.get("text", ""))
        if len(text) < 400 or text.startswith(BILLING_PREFIX):
            return block
        keep = text[: int(len(text) * fraction)].rsplit(" ", 1)[0]
        return {**block, "text": keep}

    return AgentShape(system=tuple(cut(b) for b in shape.system), tools=shape.tools[: int(n_tools)],
                      context_messages=tuple({**m, "content": m["content"][: int(len(m["content"]) * fraction)]}
                                             if isinstance(m.get("content"), str) else m for m in shape.context_messages),
                      reminder=shape.reminder, fields=shape.fields, client=shape.client)


def without_attribution(shape: AgentShape) -> AgentShape:
    """The same shape with the billing block dropped (what CLAUDE_CODE_ATTRIBUTION_HEADER=0 sends)."""
    return AgentShape(system=tuple(b for b in shape.system if not str(b.get("text", "")).startswith(BILLING_PREFIX)),
                      tools=shape.tools, context_messages=shape.context_messages, reminder=shape.reminder,
                      fields=shape.fields, client=shape.client)


@dataclass(frozen=True)
class Workload:
    """How each session behaves: turns, new content per turn, reply length, reminder position, subagents."""

    turns: int = 3
    turn_words: int = 60  # new user/tool-output words per turn (history grows by this plus the reply)
    max_tokens: int = 24
    reminder: str = "append"  # append: in the newest user message (Claude Code); system: end of the system prompt
    subagent_every: int = 0  # every k-th main turn starts a subagent branch first (0: never)
    subagent_turns: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.turns <= 200:
            raise BadInput(f"turns per session must be 1..200, got {self.turns}")
        if not 0 <= self.turn_words <= 20000:
            raise BadInput(f"turn_words must be 0..20000, got {self.turn_words}")
        if not 1 <= self.max_tokens <= 8192:
            raise BadInput(f"max_tokens must be 1..8192, got {self.max_tokens}")
        if self.reminder not in REMINDER_POSITIONS:
            raise BadInput(f"reminder must be one of {', '.join(REMINDER_POSITIONS)}, got {self.reminder!r}")
        if self.subagent_every < 0 or not 1 <= self.subagent_turns <= 20:
            raise BadInput("subagent_every must be >= 0 and subagent_turns 1..20")


def run_nonce() -> str:
    return secrets.token_hex(6)


class Conversation:
    """One session's (or subagent's) growing request; `body(turn)` then `reply(text)` per turn."""

    def __init__(self, shape: AgentShape, workload: Workload, *, model: str, nonce: str, session: str,
                 kind: str = "main"):
        self.shape, self.workload, self.model, self.kind = shape, workload, model, kind
        self.session = session
        self.rng = random.Random(f"{nonce}/{session}")
        self.nonce = nonce
        self.messages: list[dict[str, Any]] = []
        self.turn = 0
        self.billing_changes = 0

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(n))

    def _reminder(self) -> str:
        return (f"<system-reminder>\nTurn {self.turn + 1} of session {self.session}: the todo list has "
                f"{self.rng.randint(1, 9)} open items.\n</system-reminder>\n\n")

    def _system(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for b in self.shape.system:
            text = str(b.get("text", ""))
            if text.startswith(BILLING_PREFIX):
                # the real client sends a new value per request (measured); so does the generator
                blocks.append({**b, "text": f"{text.rstrip(';')}.{self.rng.getrandbits(24):06x};"})
                self.billing_changes += 1
                blocks.append({"type": "text", "text": f"Run {self.nonce}."})
            else:
                blocks.append(copy.deepcopy(b))
        if not self.shape.attribution:
            blocks.insert(0, {"type": "text", "text": f"Run {self.nonce}."})
        if self.workload.reminder == "system" and blocks:
            blocks.append({"type": "text", "text": self._reminder()})
        return blocks

    def user_turn(self, extra: str = "") -> None:
        """Append the next user message: a reminder (Claude Code's position) and new unique content."""
        content: list[dict[str, Any]] = []
        if self.turn == 0 and self.shape.reminder:
            content.append({"type": "text", "text": self.shape.reminder})
        elif self.workload.reminder == "append":
            content.append({"type": "text", "text": self._reminder()})
        text = f"[{self.kind} {self.session} turn {self.turn + 1}] {self._words(self.workload.turn_words)}"
        content.append({"type": "text", "text": f"{extra}\n{text}".strip()})
        self.messages.append({"role": "user", "content": content})
        if self.turn == 0:
            self.messages.extend(copy.deepcopy(m) for m in self.shape.context_messages)

    def body(self) -> dict[str, Any]:
        """The request for the current turn (call user_turn first)."""
        return {**copy.deepcopy(dict(self.shape.fields)), "model": self.model, "system": self._system(),
                "tools": copy.deepcopy(list(self.shape.tools)), "messages": copy.deepcopy(self.messages),
                "max_tokens": self.workload.max_tokens, "stream": True}

    def reply(self, text: str) -> None:
        """The assistant's answer, verbatim (changing it would make the next turn miss the cache)."""
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text or "ok"}]})
        self.turn += 1


def shared_prefix_body(shape: AgentShape, model: str, nonce: str) -> dict[str, Any]:
    """A body holding only what every session of a run sends first (system, tools, the first reminder): its
    token count is what a new session can reuse from an earlier one."""
    conv = Conversation(shape, Workload(), model=model, nonce=nonce, session="prefix")
    body = conv.body()
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": shape.reminder or "."}]}]
    return body
