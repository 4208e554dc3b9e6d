"""Read a user's YAML file: one clear error line for a missing or malformed file, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvbook.errors import BadInput


def read_yaml(path: Path, what: str = "it") -> Any:
    """The parsed document (None for an empty file); BadInput naming the file and the problem."""
    import yaml  # ~20 ms: only when a YAML file is read

    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BadInput(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
