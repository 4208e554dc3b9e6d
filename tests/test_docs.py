"""The user docs stay true: README.md and docs/*.md link only to files and headings that exist, name only make
targets the Makefile has and kvbook commands the CLI has, and every shell block marked ```sh test runs and exits 0.

Marking a block: open the fence with "```sh test" (GitHub shows it as an ordinary sh block). Keep such blocks cheap
(a plan on presets, a --help): they run here on every `make test`. Commands start with `.venv/bin/`, which runs the
environment this test runs in.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MAKE = re.compile(r"(?<![\w.-])make\s+(?:[A-Z_]+=\S+\s+)*([a-z][\w-]*)")
# a command starts a line or a code span, or follows a path (.venv/bin/kvbook) or $( (prose in a block does not count)
KVBOOK = re.compile(r"(?:^[ \t]*|/|\$\()kvbook ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", re.MULTILINE)
RUNNABLE = "sh test"
BIN = Path(sys.executable).parent


def _prose(text: str) -> str:
    """The text without its fenced blocks (a heading or link inside a code block is not one)."""
    return FENCE.sub("", text)


def _code(text: str) -> list[str]:
    """Every fenced block's body and every inline code span: where commands are written."""
    return [m.group(2) for m in FENCE.finditer(text)] + CODE_SPAN.findall(_prose(text))


def _slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f"{slug}-{n}"


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    return {_slug(h, seen) for h in HEADING.findall(_prose(path.read_text()))}


def _runnable_blocks() -> list[tuple[str, str]]:
    """(where, command) for every command of every ```sh test block; backslash continuations joined."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1).strip() != RUNNABLE:
                continue
            line_no = text[:m.start()].count("\n") + 1
            for command in re.sub(r"\\\n\s*", " ", m.group(2)).splitlines():
                command = command.split(" # ")[0].strip()
                if command and not command.startswith("#"):
                    out.append((f"{doc.relative_to(ROOT)}:{line_no}", command))
    return out


def test_readme_is_a_newcomers_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/ (limit 250)"


def test_every_relative_link_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(_prose(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_links_are_checked_at_all() -> None:
    """The link test above sees links and anchors (a regex that matched nothing would pass it vacuously)."""
    readme = (ROOT / "README.md").read_text()
    targets = LINK.findall(_prose(readme))
    assert "docs/planning.md" in targets and "docs/img/sizing.png" in targets
    assert "time-and-resources" in _anchors(ROOT / "README.md")
    assert _slug("Against llama.cpp's `--fit`, on real runs", {}) == "against-llamacpps---fit-on-real-runs"


def test_make_targets_named_in_the_docs_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))
    named = {(doc.relative_to(ROOT), t) for doc in DOCS for code in _code(doc.read_text()) for t in MAKE.findall(code)}
    assert {"demo", "test", "lab"} <= {t for _, t in named}
    missing = sorted(f"{doc}: make {t}" for doc, t in named if t not in targets)
    assert not missing, "make targets the Makefile lacks:\n" + "\n".join(missing)


def _subcommands(parser) -> dict[str, object]:
    """{name: its parser} for a parser's subcommands."""
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_kvbook_commands_named_in_the_docs_exist() -> None:
    commands = _subcommands(build_parser())
    named = {(doc.relative_to(ROOT), a, b) for doc in DOCS for code in _code(doc.read_text())
             for a, b in KVBOOK.findall(code)}
    assert {"plan", "run", "doctor"} <= {a for _, a, _ in named}
    missing = []
    for doc, first, second in sorted(named):
        if first not in commands:
            missing.append(f"{doc}: kvbook {first}")
            continue
        nested = [a for a in commands[first]._actions if a.__class__.__name__ == "_SubParsersAction"]
        if nested and second and second not in nested[0].choices:
            missing.append(f"{doc}: kvbook {first} {second}")
    assert not missing, "kvbook commands the CLI lacks:\n" + "\n".join(missing)


RUNNABLE_COMMANDS = _runnable_blocks()


def test_there_are_runnable_blocks() -> None:
    assert len(RUNNABLE_COMMANDS) >= 5, RUNNABLE_COMMANDS
    assert any(where.startswith("README.md") for where, _ in RUNNABLE_COMMANDS)


@pytest.mark.parametrize("where,command", RUNNABLE_COMMANDS, ids=[w for w, _ in RUNNABLE_COMMANDS])
def test_runnable_block_exits_0(where: str, command: str) -> None:
    assert command.startswith(".venv/bin/"), f"{where}: a runnable command starts with .venv/bin/: {command}"
    local = command.replace(".venv/bin/", f"{BIN}/")
    proc = subprocess.run(["bash", "-c", local], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{where}: `{command}` printed nothing"
