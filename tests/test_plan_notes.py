"""Typed plan notes (issue 21 item 5): every note is a Note(code, text) whose code is declared once in
kvbook.interface.NOTE_CODES, and the text plan, `kvbook plan --json` and the sizing notebook's summary show the
same texts. Pure plans, no server."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

from kvbook import cli
from kvbook.interface import NOTE_CODES
from kvbook.notebook import sizing

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"


def _literal_codes() -> dict[str, str]:
    """Each code written as a literal where a Note is made in lib/kvbook (Note("code", ...) or a (code, text) pair
    in fit.py's status table), with the file it is in."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "lib" / "kvbook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Note" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found[node.args[0].value] = path.name
            pair = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)] \
                if isinstance(node, ast.Tuple) and len(node.elts) == 2 else []
            if len(pair) == 2 and pair[0].startswith("fit."):
                found[pair[0]] = path.name
    return found


def test_every_emitted_note_code_is_declared() -> None:
    """The golden plans (every model preset on every device preset, and the bundled GGUFs: tests/golden, kept equal
    to the planner's output by test_golden_plans) carry only declared codes, each of them with a text; so does
    every literal code in the library; and each declared code has a one-line meaning and is made somewhere."""
    emitted: dict[str, str] = {}
    for path in sorted(GOLDEN.glob("*.json")):
        for note in json.loads(path.read_text()).get("notes", []):
            assert set(note) == {"code", "text"} and note["text"], (path.name, note)
            emitted.setdefault(note["code"], path.name)
    assert len(emitted) >= 10, sorted(emitted)  # the goldens do reach the planner's notes
    literal = _literal_codes()
    undeclared = {c: where for c, where in {**literal, **emitted}.items() if c not in NOTE_CODES}
    assert not undeclared, f"note codes missing from kvbook.interface.NOTE_CODES: {undeclared}"
    assert not set(NOTE_CODES) - set(literal), f"declared but never made: {set(NOTE_CODES) - set(literal)}"
    for code, meaning in NOTE_CODES.items():
        assert re.fullmatch(r"[a-z][a-z0-9-]*\.[a-z0-9-]+", code), code
        assert meaning.strip() and "\n" not in meaning, code


def test_the_text_the_json_and_the_notebook_show_the_same_notes(capsys, gemma3) -> None:
    """One request with several notes (-ts with one GPU, -ot on experts of a dense model, a partial offload's spread,
    CPU_REPACK, --fit): the text plan's `note:` lines, the JSON's notes and the notebook's summary.json notes are
    the same texts in the same order, and the JSON's codes are the plan's."""
    device = "rtx-4090-host-64"
    line = ["llama-server", "-m", str(gemma3), "-c", "8192", "-ngl", "10", "-ts", "1", "-ot", "exps=CPU",
            "--no-host"]
    assert cli.main(["plan", "--json", "--device", device, "--", *line]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--device", device, "--", *line]) == 0
    text = [ln.removeprefix("note: ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: ")]
    notebook = sizing.summary(sizing.resolve(sizing.SizingParams(device=device, command_line=shlex.join(line))))
    codes = [n["code"] for n in doc["notes"]]
    assert {"split.no-effect", "moe.no-experts", "repack.host-copy"} <= set(codes), codes
    assert [n["text"] for n in doc["notes"]] == text == [n["text"] for n in notebook["notes"]]
    assert notebook["notes"] == doc["notes"]
