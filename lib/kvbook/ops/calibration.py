"""A user's own log kept as a compute calibration: `kvbook check-log LOG --save-calibration` stores the logged /
estimated compute ratio of its backend and model family in kvbook's cache (compute_calibrations.jsonl); later
plans on that backend for that family use it (kvbook.memory.backends), labelled with the log it came from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kvbook.errors import BadInput
from kvbook.interface import ComputeCalibration, Device
from kvbook.memory.backends import GPU_BACKENDS
from kvbook.ops.check_log import LogCheck
from kvbook.paths import cache_dir

FILE = "compute_calibrations.jsonl"


def calibrations_path() -> Path:
    return cache_dir() / FILE


def calibration_of(check: LogCheck, source: str) -> ComputeCalibration:
    """The ratios of one checked log: the GPU devices' logged compute over kvbook's estimate, and the host side's."""
    if check.refused or check.plan is None:
        raise BadInput(f"this log cannot calibrate anything: {check.refused or 'it was not planned'}")
    gpu = [r for r in check.devices if r.backend in GPU_BACKENDS and not r.name.endswith("_Host")
           and r.logged.compute_bytes and r.planned.compute_bytes]
    host = [r for r in check.devices if (r.name == "CPU" or r.name.endswith("_Host"))
            and r.logged.compute_bytes and r.planned.compute_bytes]
    if not gpu:
        raise BadInput("this log has no GPU compute buffer to calibrate (the CPU backend is calibrated already)")
    dev_ratio = sum(r.logged.compute_bytes or 0 for r in gpu) / sum(r.planned.compute_bytes or 0 for r in gpu)
    host_ratio = (sum(r.logged.compute_bytes or 0 for r in host) / sum(r.planned.compute_bytes or 0 for r in host)
                  if host else 1.0)
    return ComputeCalibration(backend=gpu[0].backend, arch=check.plan.model.arch, device_ratio=round(dev_ratio, 4),
                              host_ratio=round(host_ratio, 4), source=source, build=check.build)


def save_calibration(check: LogCheck, source: str) -> Path:
    """Append this log's calibration (replacing an earlier one from the same source); the file's path."""
    new = calibration_of(check, source)
    path = calibrations_path()
    kept = [c for c in load_calibrations() if c.source != source]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(c)) + "\n" for c in (*kept, new)))
    tmp.replace(path)
    return path


def load_calibrations() -> tuple[ComputeCalibration, ...]:
    """Every saved calibration (none when the file does not exist); a damaged file is one clear error."""
    path = calibrations_path()
    if not path.is_file():
        return ()
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(ComputeCalibration(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise BadInput(f"{path}:{n}: not a kvbook compute calibration ({e}); delete the line or the file") from None
    return tuple(out)


def with_calibrations(device: Device) -> Device:
    """The device with the user's saved compute calibrations attached (plans then use them where they match)."""
    saved = load_calibrations()
    return dataclasses.replace(device, calibrations=saved) if saved else device
