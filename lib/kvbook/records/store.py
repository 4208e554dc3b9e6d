"""outputs/results.jsonl: one JSON object per line, appended atomically and serialised across
processes; reading reports a corrupt line by number and keeps the rest."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput


@dataclass(frozen=True)
class BadLine:
    """A line of a results file that is not a JSON object."""

    line_no: int
    reason: str


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
