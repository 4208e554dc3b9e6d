"""Read a user's YAML file: one clear error line for a missing or malformed file, never a traceback."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput


_PARSED: dict[tuple[str, int, int], Any] = {}  # (path, mtime_ns, size) -> document: presets are read per plan


def read_yaml(path: Path, what: str = "it") -> Any:
    """The parsed document (None for an empty file; a copy the caller may change); BadInput naming the file and the
    problem. A file unchanged since it was last read is not parsed again (the planner reads its presets per plan)."""
    import yaml  # ~20 ms: only when a YAML file is read

    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in _PARSED:
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it: same result
            _PARSED[key] = yaml.load(path.read_text(), Loader=loader)
        return copy.deepcopy(_PARSED[key])
    except OSError as exc:
        raise BadInput(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
