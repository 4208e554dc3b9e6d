"""Static checks inside `make test`: ruff over lib, tests, tools and benchmarks (the rule set pinned in
pyproject.toml), and mypy over lib/kvbook (strict for model, memory, plan, capacity and records; default elsewhere); each fails with the
tool's own report. Both tools are pinned in requirements.lock."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STRICT = {"kvbook.model.*", "kvbook.memory.*", "kvbook.plan.*", "kvbook.capacity.*", "kvbook.records.*"}


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The pinned tool from this environment (python -m), run at the repository root."""
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    proc = _run("ruff", "check", "--no-cache", "lib", "tests", "tools", "benchmarks")
    assert proc.returncode == 0, f"ruff check lib tests tools benchmarks:\n{proc.stdout}{proc.stderr}"


def test_mypy_is_clean() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, f"mypy (config: pyproject.toml [tool.mypy]):\n{proc.stdout}{proc.stderr}"


def test_the_settled_stages_stay_strict() -> None:
    """The strict override names model, memory, plan, capacity and records and turns on every flag of --strict."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    strict = [o for o in conf["overrides"] if STRICT <= set(o["module"])]
    assert strict, "pyproject.toml: no mypy override makes kvbook.model/.memory/.plan/.capacity/.records strict"
    flags = ("disallow_any_generics", "disallow_subclassing_any", "disallow_untyped_calls", "disallow_untyped_defs",
             "disallow_incomplete_defs", "check_untyped_defs", "disallow_untyped_decorators", "warn_return_any",
             "no_implicit_reexport", "strict_equality", "extra_checks")
    assert all(strict[0].get(f) is True for f in flags), {f: strict[0].get(f) for f in flags}
    assert conf["warn_unused_ignores"] and conf["warn_redundant_casts"]
