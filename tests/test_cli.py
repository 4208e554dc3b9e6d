"""The command line's small edges: every subcommand's --help says what it does and shows examples that parse, a usage
error names the program once and the --help of the command that was mistyped, `kvbook doctor` prints aligned
columns (a rendering check: tests/test_components.py runs the real doctor), and `kvbook run` starts its kernel
without the "TCP without encryption" warning (the real ipykernel).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.ops.components import Component, doctor_lines


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _walk(sub, (*path, name))


SUBCOMMANDS = list(_walk(cli.build_parser()))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _examples(help_text: str) -> list[str]:
    tail = help_text.split("examples:\n", 1)[1]
    return [line.strip() for line in tail.splitlines() if line.startswith("  ") and line.strip()]


def test_subcommands_are_found() -> None:
    names = {" ".join(path) for path, _ in SUBCOMMANDS}
    assert {"plan", "run", "report", "doctor", "models path", "probe claude-code", "check-log"} <= names


@pytest.mark.parametrize("path", [p for p, _ in SUBCOMMANDS], ids=[" ".join(p) for p, _ in SUBCOMMANDS])
def test_every_subcommand_help_describes_and_shows_examples(capsys, monkeypatch, path) -> None:
    code, out, err = _run(capsys, *path, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: kvbook {' '.join(path)}"), out.splitlines()[0]
    assert "kvbook kvbook" not in out
    parser = dict(SUBCOMMANDS)[path]
    assert parser.description and len(parser.description) > 40, f"kvbook {' '.join(path)}: no description"
    assert parser.description.split(".")[0] in " ".join(out.split())
    examples = _examples(out)
    assert any(f"kvbook {' '.join(path)}" in e for e in examples), examples
    # every option says what it is for
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"kvbook {' '.join(path)} {action.option_strings[0]}: no help text"
    # every example is a command line this CLI accepts (run with every command stubbed out: nothing executes)
    for name in [n for n in dir(cli) if n.startswith("_cmd_")]:
        monkeypatch.setattr(cli, name, lambda args: 0)
    for example in examples:
        argv = shlex.split(example)
        while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
            argv.pop(0)
        assert argv[0] == "kvbook", example
        code, _, err = _run(capsys, *argv[1:])
        assert code == 0, f"example `{example}` is refused: {err}"


def test_top_level_help_points_to_the_commands(capsys) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "kvbook COMMAND --help" in out and "examples:" in out
    for path, _ in SUBCOMMANDS:
        if len(path) == 1:
            assert path[0] in out


@pytest.mark.parametrize("argv,hint", [
    ((), "see kvbook --help"),
    (("bogus",), "see kvbook --help"),
    (("plan", "--bogus"), "see kvbook plan --help"),
    (("run", "--bogus"), "see kvbook run --help"),
    (("doctor", "--bogus"), "see kvbook doctor --help"),
    (("models",), "see kvbook models --help"),
    (("models", "path"), "see kvbook models path --help"),
    (("probe", "claude-code", "--bogus"), "see kvbook probe claude-code --help"),
    (("plan", "--top", "x", "--", "llama-server"), "see kvbook plan --help"),
])
def test_a_usage_error_names_the_program_once(capsys, argv, hint) -> None:
    code, out, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("kvbook: error: ") and lines[0].endswith(f"({hint})"), lines[0]
    assert "kvbook kvbook" not in err and lines[0].count("kvbook") == hint.count("kvbook") + 1, lines[0]


def _rows() -> list[Component]:
    return [
        Component("python", True, "3.11.7", Path("/usr/bin/python3"), ""),
        Component("llama-build", True, "profile x86-64-v4 -DGGML_RPC=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF",
                  Path("/cache/kvbook_build.json"), ""),
        Component("a-component-with-a-long-name", False, None, None, "install it: apt-get install it"),
        Component("gemma3-270m", True, "sha256 ok", Path("/cache/gemma.gguf"), "a note"),
    ]


def test_doctor_columns_are_aligned() -> None:
    lines = doctor_lines(_rows())
    header, rows = lines[0], [ln for ln in lines[1:] if not ln.startswith(" ")]
    assert header.split() == ["status", "component", "path", "version"]
    assert len(rows) == 4
    for column in ("component", "path", "version"):
        start = header.index(column)
        for row in rows:
            assert row[start - 2:start] == "  " and row[start] != " ", (column, row)
    hints = [ln for ln in lines[1:] if ln.startswith(" ")]
    assert [h.strip() for h in hints] == ["install it: apt-get install it", "a note"]
    assert all(h.index(h.strip()) == header.index("component") for h in hints)


def test_kvbook_run_starts_an_encrypted_kernel_without_the_warning(tmp_path) -> None:
    """ipykernel warns "Kernel is running over TCP without encryption" unless its manager provisions CurveZMQ keys;
    `kvbook run` does (kvbook.notebook.kernel), so the warning is gone because the traffic is encrypted."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    probe = nbformat.v4.new_code_cell("from ipykernel.kernelapp import IPKernelApp\n"
                                      "print('curve key:', IPKernelApp.instance().curve_secretkey is not None)")
    nb.cells = [params, probe]
    notebook = tmp_path / "probe.ipynb"
    nbformat.write(nb, str(notebook))
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "kvbook.cli", "run", str(notebook), "--output-dir", str(out_dir),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "without encryption" not in proc.stderr + proc.stdout, proc.stderr
    executed = json.loads((out_dir / "probe.ipynb").read_text())
    text = "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                   for o in executed["cells"][1]["outputs"])
    assert "curve key: True" in text
