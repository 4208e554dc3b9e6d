"""lib/kvbook's layers hold: every import (module level or inside a function) is read from the source,
and the data flow model -> memory -> plan -> ops/smoke/records -> claude/notebook -> cli runs one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
PKG = LIB / "kvbook"
STAGES = ("model", "memory", "plan", "capacity", "ops", "smoke", "records", "claude", "notebook", "serve", "testing")
LOWER = ("model", "memory", "plan", "capacity")
UPPER = ("ops", "smoke", "notebook", "claude", "load", "serve")
# package -> the packages it may import (besides the shared top-level errors, interface, yamlio)
ALLOWED = {
    "model": set(),
    "memory": {"model"},
    "plan": {"model", "memory"},
    "capacity": {"model", "memory", "plan"},
    "records": set(),
    "ops": {"model", "memory", "plan", "capacity"},
    "smoke": {"model", "memory", "plan", "ops", "records"},
    "claude": {"ops", "smoke", "records"},
    "load": {"model", "memory", "plan", "capacity", "ops", "smoke", "records"},
    "notebook": {"model", "memory", "plan", "capacity", "ops", "smoke", "records", "claude", "load"},
    "serve": {"model", "memory", "plan", "capacity", "ops", "smoke", "records", "claude"},
    "testing": {"model", "memory", "plan", "ops", "smoke", "claude", "notebook"},  # test support drives the real stack (JupyterLab as make lab starts it)
}
SHARED = {"kvbook.errors", "kvbook.interface", "kvbook.paths", "kvbook.yamlio"}


def module_name(path: Path) -> str:
    rel = path.relative_to(LIB).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(path: Path) -> set[str]:
    """Every kvbook module `path` imports at run time, wherever the import statement stands."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kvbook"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kvbook"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (LIB / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PKG.rglob("*.py"))}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_the_library_is_split_into_stage_packages_with_a_docstring_each() -> None:
    flat = sorted(p.name for p in PKG.glob("*.py"))
    # components.py: only `python -m kvbook.components` for older scripts, forwarding to kvbook.ops.components
    assert flat == ["__init__.py", "cli.py", "components.py", "errors.py", "interface.py", "paths.py", "yamlio.py"], flat
    for name in STAGES:
        init = PKG / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{name}/__init__.py needs a one-line docstring"
        assert len(ast.parse(init.read_text()).body) == 1, f"{name}/__init__.py does work beyond its docstring"


def test_no_import_circles(graph) -> None:
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if seen.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def test_nothing_in_the_library_imports_the_cli(graph) -> None:
    offenders = sorted(m for m, deps in graph.items() if "kvbook.cli" in deps and m != "kvbook.cli")
    assert not offenders, offenders


def test_each_stage_imports_only_the_stages_below_it(graph) -> None:
    wrong = defaultdict(set)
    for module, deps in graph.items():
        here = stage(module)
        if here not in ALLOWED:
            continue
        for dep in deps:
            there = stage(dep)
            if dep in SHARED or there == here or dep == "kvbook":
                continue
            if there not in ALLOWED[here]:
                wrong[module].add(dep)
    assert not wrong, {k: sorted(v) for k, v in wrong.items()}
    for module, deps in graph.items():
        if stage(module) in LOWER:
            assert not {stage(d) for d in deps} & {*UPPER, "cli"}, module


def test_testing_is_used_by_tests_benchmarks_and_tools_only(graph) -> None:
    users = sorted(m for m, deps in graph.items() if stage(m) != "testing" and any(stage(d) == "testing" for d in deps))
    assert not users, users


def test_shared_modules_import_no_stage(graph) -> None:
    for module in SHARED:
        assert not {d for d in graph[module] if d not in SHARED}, module


def test_importing_kvbook_and_its_planner_does_no_heavy_work() -> None:
    """`import kvbook` (and the planner's modules) pull neither numpy, plotly, hypothesis nor requests,
    and install no signal handler."""
    code = ("import signal, sys\nbefore = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}\n"
            "import kvbook, kvbook.cli, kvbook.ops.procs, kvbook.plan.planner, kvbook.plan.api, kvbook.ops.host\n"
            "import kvbook.model.sources\n"
            "heavy = sorted(m for m in ('numpy', 'plotly', 'hypothesis', 'requests', 'gguf') if m in sys.modules)\n"
            "moved = [s for s, h in before.items() if signal.getsignal(s) is not h]\n"
            "print(heavy, moved)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] []", out


# ---------------------------------------------------------------- plan/ and memory/ do no I/O

PURE = ("plan", "memory")
# host I/O: processes, files, the environment, the network, the platform
IO_MODULES = {"os", "sys", "subprocess", "shutil", "socket", "ssl", "urllib", "http", "requests", "httpx", "tempfile",
              "glob", "platform", "ctypes", "signal", "multiprocessing", "threading", "asyncio", "selectors", "mmap",
              "pathlib", "io", "fcntl", "resource", "psutil"}
PURE_PATHLIB = {"PurePath", "PurePosixPath", "PureWindowsPath"}  # string manipulation only
IO_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "glob", "rglob", "iterdir", "exists",
            "is_file", "is_dir", "stat", "unlink", "mkdir", "touch", "getenv", "environ", "system", "popen",
            "urlopen", "resolve", "expanduser", "home", "cwd"}
PURE_IO_ALLOWED = "the package's own data through importlib.resources, the params/ presets through kvbook.yamlio"


def _resources_read(node: ast.AST) -> bool:
    """`resources.files(...)...read_text()`: package data shipped with kvbook, the same on every host."""
    while isinstance(node, (ast.Call, ast.Attribute)):
        node = node.func if isinstance(node, ast.Call) else node.value
        if isinstance(node, ast.Attribute) and node.attr == "files" and getattr(node.value, "id", "") == "resources":
            return True
    return False


def io_violations(source: str, name: str = "<source>") -> list[str]:
    """Every host I/O a module's source does or imports (see IO_MODULES, IO_CALLS); reading kvbook's own data
    (PURE_IO_ALLOWED) is not I/O on the host."""
    found = []
    for node in _runtime_nodes(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in IO_MODULES:
            if node.module == "pathlib" and all(a.name in PURE_PATHLIB for a in node.names):
                continue
            found.append(f"{where} from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in IO_CALLS and not _resources_read(node):
                found.append(f"{where} {called}(...)")
        elif isinstance(node, ast.Attribute) and node.attr == "environ":
            found.append(f"{where} .environ")
    return found


def test_the_io_check_catches_a_synthetic_violation() -> None:
    """The check below is real: each kind of host I/O in a made-up module is reported, kvbook's own data is not."""
    bad = ("import subprocess\nimport os.path\nfrom pathlib import Path\nfrom urllib.request import urlopen\n"
           "def f():\n    import socket\n    open('/proc/meminfo').read()\n    x = os.environ.get('HOME')\n"
           "    Path('/proc/cpuinfo').read_text()\n    subprocess.run(['nvidia-smi'])\n")
    found = io_violations(bad)
    for needle in ("import subprocess", "import os.path", "from pathlib import Path", "from urllib.request",
                   "import socket", "open(...)", ".environ", "read_text(...)"):
        assert any(needle in f for f in found), (needle, found)
    good = ("from importlib import resources\nfrom pathlib import PurePath\nimport json\n"
            "def f():\n    return json.loads(resources.files('kvbook').joinpath('data/x.json').read_text())\n")
    assert io_violations(good) == []


def test_plan_and_memory_do_no_io() -> None:
    """plan/ and memory/ are pure: hardware and models arrive as data (ops/host.py, model/resolve.py); what they may
    read is kvbook's own (PURE_IO_ALLOWED)."""
    found = [v for stage_name in PURE for p in sorted((PKG / stage_name).rglob("*.py"))
             for v in io_violations(p.read_text(), str(p.relative_to(LIB)))]
    assert not found, found
