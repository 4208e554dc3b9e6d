"""Claude Code agent files (`.claude/agents/*.md`): each agent's name and the model it asks for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvbook.errors import BadInput


@dataclass(frozen=True)
class AgentFile:
    """An agent definition: a markdown file whose YAML frontmatter names it."""

    name: str
    model: str | None  # frontmatter `model:`; None means it inherits the session's model
    description: str
    path: Path


def _frontmatter(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"agent file {path}: cannot read it ({exc})") from None
    match = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.DOTALL)
    if match is None:
        raise BadInput(f"agent file {path} has no YAML frontmatter; start it with '---', name: and description: lines, then '---'")
    try:
        doc = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise BadInput(f"agent file {path}: frontmatter is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise BadInput(f"agent file {path}: frontmatter must be a mapping of name: value")
    return doc


def load_agents(agents_dir: Path) -> tuple[AgentFile, ...]:
    """Every *.md agent in a folder (sorted by name); each must have frontmatter with name and description."""
    if not agents_dir.is_dir():
        raise BadInput(f"agents folder {agents_dir} does not exist or is not a folder")
    agents = []
    for path in sorted(agents_dir.glob("*.md")):
        doc = _frontmatter(path)
        name, desc = doc.get("name"), doc.get("description")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
            raise BadInput(f"agent file {path}: frontmatter needs name: made of letters, digits, - or _ (got {name!r})")
        if not isinstance(desc, str) or not desc.strip():
            raise BadInput(f"agent file {path}: frontmatter needs a description:")
        model = doc.get("model")
        agents.append(AgentFile(name=name, model=None if model is None else str(model), description=desc, path=path))
    names = [a.name for a in agents]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadInput(f"agents folder {agents_dir}: agent name {dupes[0]} is used by more than one file")
    if not agents:
        raise BadInput(f"agents folder {agents_dir} has no *.md agent files")
    return tuple(agents)
