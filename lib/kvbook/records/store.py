"""outputs/results.jsonl: one JSON object per line, appended atomically and serialised across
processes; reading reports a corrupt line by number and keeps the rest. Every check result is a
CheckRecord, written by append_checks and read back by read_checks."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput


@dataclass(frozen=True)
class BadLine:
    """A line of a results file that is not a JSON object."""

    line_no: int
    reason: str


@dataclass(frozen=True)
class CheckRecord:
    """One check's outcome in results.jsonl. `label` names the configuration it belongs to (a comparison's
    contender; the model's name when the run gave none); `extra` holds the run's context (model file and
    sha256, argv, versions, plan and measured memory, client numbers, check details), stored flat."""

    run_id: str
    check: str
    route: str
    passed: bool
    required: bool
    reason: str = ""
    time: str = ""
    label: str = ""
    model_name: str = ""
    repeat: int = 0
    timings: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _FIELDS = ("run_id", "check", "route", "passed", "required", "reason", "time", "label", "model_name", "repeat",
               "timings")

    def to_json(self) -> dict[str, Any]:
        clash = set(self.extra) & set(self._FIELDS)
        if clash:
            raise BadInput(f"record context may not reuse the field names {sorted(clash)}")
        return {**self.extra, **{name: getattr(self, name) for name in self._FIELDS},
                "label": self.label or self.model_name or "unlabelled"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckRecord | None:
        """The record a results line holds, or None when the line is not a check result."""
        if not isinstance(data.get("check"), str) or not isinstance(data.get("passed"), bool):
            return None
        timings = data.get("timings")
        repeat = data.get("repeat")
        return cls(
            run_id=str(data.get("run_id") or ""), check=data["check"], route=str(data.get("route") or ""),
            passed=data["passed"], required=bool(data.get("required")), reason=str(data.get("reason") or ""),
            time=str(data.get("time") or ""), model_name=str(data.get("model_name") or ""),
            label=str(data.get("label") or data.get("model_name") or "unlabelled"),
            repeat=repeat if isinstance(repeat, int) else 0, timings=timings if isinstance(timings, dict) else {},
            extra={k: v for k, v in data.items() if k not in cls._FIELDS},
        )

    def timing(self, key: str) -> float | None:
        value = self.timings.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def append_checks(path: Path, records: Iterable[CheckRecord]) -> int:
    """Append check records to a results file (see append_records)."""
    return append_records(path, [r.to_json() for r in records])


def read_checks(path: Path) -> tuple[list[CheckRecord], list[BadLine]]:
    """Every check record of a results file, and its unreadable lines."""
    rows, bad = read_records(path)
    return [r for r in map(CheckRecord.from_json, rows) if r is not None], bad


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Append records as whole lines under an exclusive lock; one write() per record.

    A crash can lose the record being written but never leaves a partial line behind a later
    one: each line is written with a single O_APPEND write of its full bytes.
    """
    lines = [json.dumps(r, sort_keys=True, default=str, separators=(",", ":")) + "\n" for r in records]
    for line in lines:
        if line.count("\n") != 1:
            raise BadInput("a record serialised to more than one line")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a previous writer killed mid-line would leave no newline: start on a fresh line
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    os.write(fd, b"\n")
        for line in lines:
            data = line.encode()
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return len(lines)


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """All good records and a list of bad lines (1-based numbers); a missing file is empty."""
    good: list[dict[str, Any]] = []
    bad: list[BadLine] = []
    if not path.exists():
        return good, bad
    with path.open("rb") as fh:
        for no, raw in enumerate(fh, start=1):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                bad.append(BadLine(no, f"not JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(value, dict):
                bad.append(BadLine(no, "not a JSON object"))
                continue
            good.append(value)
    return good, bad
