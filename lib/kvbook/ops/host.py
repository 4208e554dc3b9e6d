"""This machine, detected: its RAM (/proc/meminfo, sysctl hw.memsize), its CPU's features (/proc/cpuinfo, the
flags the llama.cpp build is chosen by) and its NVIDIA GPUs (nvidia-smi, as CUDA numbers them). The planner gets
them only as data: a Host record, made into a Device by kvbook.plan.devices.host_device."""

from __future__ import annotations

import os
import platform as _platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from kvbook.interface import CpuFeatures, DetectedGpu, Device, Host, ServerFlags
from kvbook.plan.api import PlanRequest
from kvbook.plan.devices import host_device, with_rpc
from kvbook.plan.weights import APPLE_M

NVIDIA_SMI_ARGS = ("--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits")
NVIDIA_SMI_TIMEOUT_S = 5.0


def host_ram_bytes() -> int:
    """Physical RAM of the machine kvbook runs on (MemTotal, else sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _mac_ram_bytes(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> int:
    """hw.memsize from sysctl (0 when it cannot be read)."""
    try:
        done = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=timeout_s,
                              check=False)
        return int(done.stdout.strip()) if done.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def cpu_features(words: frozenset[str], machine: str) -> CpuFeatures:
    """The repack-relevant features of a CPU whose flags (as /proc/cpuinfo spells them) are `words`; an ARM
    machine that lists none is an Apple M-series CPU (macOS has no /proc/cpuinfo: every M-series CPU has NEON and
    dotprod)."""
    arm = machine.lower() in ("arm64", "aarch64")
    if arm and not words:
        return APPLE_M
    return CpuFeatures(f"this machine ({machine})", avx2="avx2" in words, avx512="avx512f" in words,
                       neon=arm and "asimd" in words, dotprod="asimddp" in words, i8mm="i8mm" in words)


@cache
def this_cpu() -> CpuFeatures:
    """This machine's CPU, from the flags the OS reports (ops/build.py host_cpu_flags)."""
    from kvbook.ops.build import host_cpu_flags

    return cpu_features(host_cpu_flags(), _platform.machine())


def parse_nvidia_smi(text: str) -> tuple[DetectedGpu, ...]:
    """The GPUs of nvidia-smi's `index, name, memory.total, memory.free` CSV (noheader, nounits); ValueError on
    any row that is not four fields with whole MiB figures ([N/A], an error message, a header)."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            raise ValueError(f"not an index,name,total,free row: {line.strip()[:80]!r}")
        index, total, free, name = fields[0], fields[-2], fields[-1], ", ".join(fields[1:-2])
        if not (index.isdigit() and total.isdigit() and free.isdigit()) or int(free) > int(total) or not int(total):
            raise ValueError(f"not an index,name,total,free row: {line.strip()[:80]!r}")
        gpus.append(DetectedGpu(int(index), name, int(total), int(free)))
    if not gpus:
        raise ValueError("no GPU rows")
    return tuple(gpus)


def _visible(gpus: tuple[DetectedGpu, ...], env: Mapping[str, str]) -> tuple[tuple[DetectedGpu, ...], str]:
    """The GPUs CUDA shows llama.cpp, in CUDA's order, and a note: CUDA_VISIBLE_DEVICES as a list of indices
    picks and orders them (empty or -1 hides all); UUID or MIG entries are not mapped (all kept, noted)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return gpus, ""
    if not value.strip():
        return (), "CUDA_VISIBLE_DEVICES is empty: CUDA shows no GPU"
    by_index = {g.index: g for g in gpus}
    picked = []
    for item in (x.strip() for x in value.split(",")):
        if not item.lstrip("-").isdigit():
            return gpus, f"CUDA_VISIBLE_DEVICES={value} is not a list of indices: all nvidia-smi GPUs kept"
        if int(item) not in by_index:
            break  # CUDA stops at the first invalid entry
        picked.append(by_index[int(item)])
    return tuple(picked), f"CUDA_VISIBLE_DEVICES={value} applied"


def detect_nvidia(env: Mapping[str, str] | None = None, timeout_s: float | None = None
                  ) -> tuple[tuple[DetectedGpu, ...], str]:
    """This machine's NVIDIA GPUs as CUDA numbers them, from nvidia-smi when it is on PATH, and a note; no GPUs
    (and a note saying why) when it is absent, fails, times out or prints something else."""
    env = os.environ if env is None else env
    exe = shutil.which("nvidia-smi", path=env.get("PATH"))
    if exe is None:
        return (), ""
    try:
        done = subprocess.run([exe, *NVIDIA_SMI_ARGS], capture_output=True, text=True, errors="replace", check=False,
                              timeout=NVIDIA_SMI_TIMEOUT_S if timeout_s is None else timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        return (), f"nvidia-smi did not answer ({type(exc).__name__}): planned for the CPU only"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[:1] or [f"exit status {done.returncode}"]
        return (), f"nvidia-smi failed ({why[0][:120]}): planned for the CPU only"
    try:
        gpus = parse_nvidia_smi(done.stdout)
    except ValueError as exc:
        return (), f"nvidia-smi printed something kvbook cannot read ({exc}): planned for the CPU only"
    gpus, note = _visible(gpus, env)
    if len({g.name for g in gpus}) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        note = "; ".join(filter(None, (note, "GPUs differ and CUDA numbers them fastest first unless "
                                       "CUDA_DEVICE_ORDER=PCI_BUS_ID, nvidia-smi by PCI bus: CUDA<i> may not be "
                                       "nvidia-smi's GPU i")))
    return gpus, note


def detect_host(env: Mapping[str, str] | None = None, platform: str | None = None) -> Host:
    """This machine: on macOS its RAM (hw.memsize) and CPU, no NVIDIA query (Metal is its GPU); elsewhere its RAM,
    CPU and the NVIDIA GPUs nvidia-smi lists (none, with a note, when it is absent or fails)."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return Host(platform=platform, ram_bytes=_mac_ram_bytes() or host_ram_bytes(), cpu=this_cpu())
    gpus, note = detect_nvidia(env)
    return Host(platform=platform, ram_bytes=host_ram_bytes(), cpu=this_cpu(), gpus=gpus, gpu_note=note)


def this_machine(env: Mapping[str, str] | None = None, platform: str | None = None) -> Device:
    """This machine as a device to plan on (detect_host, then plan/devices.py host_device)."""
    return host_device(detect_host(env, platform))


def local_request(flags: ServerFlags, device: Device | None = None, environ: Mapping[str, str] | None = None,
                  host: Host | None = None, calibrations: bool = True) -> PlanRequest:
    """The planning request for `flags` on `device` (default: this machine) as the front ends build it: the model
    resolved as llama-server would load it (`environ`, default os.environ: HF_TOKEN, the hub endpoint) and the
    --rpc endpoints bound, an undeclared one's budget being this machine's RAM (a loopback ggml-rpc-server), and
    the user's saved compute calibrations (kvbook check-log --save-calibration) attached unless `calibrations` is False."""
    from kvbook.model.resolve import resolve_model
    from kvbook.ops.calibration import with_calibrations

    needs_host = device is None or (flags.rpc and not any(p.kind == "rpc" for p in device.pools))
    host = host or (detect_host() if needs_host else None)
    if device is None:
        assert host is not None  # needs_host
        device = host_device(host)
    device = with_rpc(device, flags.rpc, host=host)
    if calibrations:
        device = with_calibrations(device)
    return PlanRequest.of(resolve_model(flags, os.environ if environ is None else environ), flags, device)
