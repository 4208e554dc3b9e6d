"""Parse a real llama-server command line into ServerFlags, and render ServerFlags back to argv.

Every spelling llama-server knows is in data/llama_server_flags.json (generated from the pinned
build's --help by tools/gen_server_flags.py). A flag that changes memory and is not modelled is
an error naming it; flags that do not change memory are accepted and listed in `ignored`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from pathlib import PurePath
from typing import Any

from kvbook.errors import BadInput
from kvbook.interface import FlashAttn, ServerFlags
from kvbook.memory.rules import CACHE_TYPE_LAYOUT

CACHE_TYPES = tuple(CACHE_TYPE_LAYOUT)  # every -ctk/-ctv value the pinned server accepts

# Flags that change what llama-server allocates but that kvbook does not model (yet).
UNMODELLED = {
    "-ot": "tensor placement overrides",
    "-cmoe": "expert placement on the CPU",
    "-ncmoe": "expert placement on the CPU",
    "-ncffn": "FFN placement on the CPU",
    "-ts": "multi-GPU tensor split",
    "-sm": "multi-GPU split mode",
    "-mg": "multi-GPU main device",
    "--lora": "LoRA adapters",
    "--lora-scaled": "LoRA adapters",
    "--control-vector": "control vectors",
    "--control-vector-scaled": "control vectors",
    "--override-kv": "metadata overrides that can change the architecture",
    "--spec-draft-model": "a draft model for speculative decoding",
    "--spec-type": "speculative decoding state",
    "--spec-draft-ngl": "a draft model for speculative decoding",
    "--spec-draft-override-tensor": "a draft model for speculative decoding",
    "-mm": "a multimodal projector",
    "-mmu": "a multimodal projector",
    "-hf": "a model downloaded at start (pass the GGUF path or URL instead)",
    "-hff": "a model downloaded at start (pass the GGUF path or URL instead)",
    "-mu": "a model downloaded at start (pass the GGUF URL as -m instead)",
    "-dr": "a model pulled from a registry at start (pass the GGUF path instead)",
    "--embedding": "embedding outputs",
    "--rerank": "reranking outputs",
    "--pooling": "pooled outputs",
    "--models-dir": "router mode (several models)",
    "--models-preset": "router mode (several models)",
}


@cache
def _spellings() -> dict[str, tuple[str, bool]]:
    """Every llama-server spelling -> (canonical first spelling, takes a value)."""
    raw = resources.files("kvbook").joinpath("data/llama_server_flags.json").read_text()
    table: dict[str, tuple[str, bool]] = {}
    for entry in json.loads(raw)["options"]:
        names = entry["names"]
        for name in names:
            table[name] = (names[0], bool(entry["takes_value"]))
    return table


def _int(flag: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadInput(f"{flag} expects a whole number, got '{value}'") from None
    if number < minimum:
        raise BadInput(f"{flag} must be >= {minimum}, got {number}")
    return number


def _choice(flag: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise BadInput(f"{flag}: unknown value '{value}'; choose one of {', '.join(choices)}")
    return value


def _fa(flag: str, value: str) -> FlashAttn:
    aliases = {"on": "on", "off": "off", "auto": "auto", "enabled": "on", "disabled": "off", "1": "on", "0": "off"}
    return FlashAttn(_choice(flag, value.lower(), list(aliases)) and aliases[value.lower()])


def _bool_value(flag: str, value: str) -> bool:
    return _choice(flag, value.lower(), ["on", "off", "1", "0", "true", "false"]) in ("on", "1", "true")


def _ngl(flag: str, value: str) -> str:
    if value in ("auto", "all"):
        return value
    return str(_int(flag, value, -1))


# canonical spelling -> (field, converter); converters get (flag as typed, value)
_VALUED: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "-m": ("model", lambda f, v: v),
    "-c": ("ctx", lambda f, v: _int(f, v, 0)),
    "-np": ("parallel", lambda f, v: _int(f, v, -1)),
    "-ctk": ("type_k", lambda f, v: _choice(f, v, CACHE_TYPES)),
    "-ctv": ("type_v", lambda f, v: _choice(f, v, CACHE_TYPES)),
    "-fa": ("flash_attn", _fa),
    "-b": ("batch", lambda f, v: _int(f, v, 1)),
    "-ub": ("ubatch", lambda f, v: _int(f, v, 1)),
    "-cram": ("cache_ram_mib", lambda f, v: _int(f, v, -1)),
    "-ctxcp": ("ctx_checkpoints", lambda f, v: _int(f, v, 0)),
    "-ngl": ("gpu_layers", _ngl),
    "-fit": ("fit", _bool_value),
    "--host": ("host", lambda f, v: v),
    "--port": ("port", lambda f, v: _int(f, v, 0)),
}

# canonical spelling -> {spelling: (field, value)} for boolean switches
_SWITCHES: dict[str, dict[str, tuple[str, Any]]] = {
    "-kvu": {"-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True),
             "-no-kvu": ("kv_unified", False), "--no-kv-unified": ("kv_unified", False)},
    "--swa-full": {"--swa-full": ("swa_full", True)},
    "-kvo": {"-kvo": ("no_kv_offload", False), "--kv-offload": ("no_kv_offload", False),
             "-nkvo": ("no_kv_offload", True), "--no-kv-offload": ("no_kv_offload", True)},
}


def parse_server_args(argv: Sequence[str]) -> ServerFlags:
    """A llama-server command line (with or without the program name) as ServerFlags."""
    args = list(argv)
    if args and not args[0].startswith("-") and PurePath(args[0]).name.startswith("llama-server"):
        args = args[1:]
    table = _spellings()
    values: dict[str, Any] = {}
    ignored: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-") or token == "-":
            raise BadInput(f"unexpected argument '{token}': llama-server takes no positional arguments")
        flag, inline = (token.split("=", 1) + [None])[:2] if token.startswith("--") and "=" in token else (token, None)
        if flag not in table:
            raise BadInput(f"unknown llama-server flag '{flag}' (not in the pinned build's --help)")
        canonical, takes_value = table[flag]
        value: str | None = None
        if takes_value:
            if inline is not None:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise BadInput(f"{flag} needs a value")
        elif inline is not None:
            raise BadInput(f"{flag} takes no value, got '{inline}'")
        i += 1
        if canonical in UNMODELLED and not (canonical == "--spec-type" and value == "none"):
            raise BadInput(f"{flag} changes memory ({UNMODELLED[canonical]}) and kvbook does not model it yet")
        if canonical == "--kv-unified-per-slot":
            values["kv_unified_per_slot"] = _int(flag, value or "", 1)
        elif canonical in _VALUED:
            field, convert = _VALUED[canonical]
            values[field] = convert(flag, value or "")
        elif canonical in _SWITCHES:
            field, setting = _SWITCHES[canonical][flag]
            values[field] = setting
        else:
            ignored.append(flag)
    if "model" not in values:
        raise BadInput("the llama-server command line has no -m MODEL")
    per_slot = values.pop("kv_unified_per_slot", None)
    if per_slot is not None and values.get("ctx", 0) == 0:
        values["ctx"] = (values.get("parallel", -1) if values.get("parallel", -1) > 0 else 4) * per_slot
    return ServerFlags(argv=tuple(argv), ignored=tuple(ignored), **values)


_RENDERED = (("-c", "ctx"), ("-np", "parallel"), ("-ctk", "type_k"), ("-ctv", "type_v"), ("-b", "batch"),
             ("-ub", "ubatch"), ("-cram", "cache_ram_mib"), ("-ctxcp", "ctx_checkpoints"), ("-ngl", "gpu_layers"))


def _render_field(flags: ServerFlags, field: str) -> list[str]:
    """The argv tokens that set one field to its value in `flags` ([] for the server's default)."""
    default = ServerFlags(model=flags.model)
    value = getattr(flags, field)
    if field == "model":
        return ["-m", flags.model]
    if value == getattr(default, field):
        return []
    for flag, name in _RENDERED:
        if name == field:
            return [flag, str(value)]
    if field == "flash_attn":
        return ["-fa", value.value]
    if field == "kv_unified":
        return ["-kvu" if value else "-no-kvu"]
    if field == "swa_full":
        return ["--swa-full"]
    if field == "no_kv_offload":
        return ["-nkvo"]
    if field == "fit":
        return ["--fit", "off"]
    return []


def render_args(flags: ServerFlags) -> list[str]:
    """ServerFlags as a llama-server argv (memory flags that differ from defaults)."""
    fields = ["model", *(name for _, name in _RENDERED), "flash_attn", "kv_unified", "swa_full", "no_kv_offload", "fit"]
    return [token for field in fields for token in _render_field(flags, field)]


def _canonical_of_field() -> dict[str, str]:
    out = {field: canonical for canonical, (field, _) in _VALUED.items()}
    out.update({field: canonical for canonical, spellings in _SWITCHES.items() for field, _ in spellings.values()})
    return out


def edit_argv(argv: Sequence[str], flags: ServerFlags, fields: Sequence[str]) -> tuple[str, ...]:
    """The user's own command line with only `fields` changed to their values in `flags`: every other
    flag, memory-relevant or not (--port, --jinja, sampling...), is kept as typed."""
    args = list(argv)
    head = [args.pop(0)] if args and not args[0].startswith("-") else []
    table, owner = _spellings(), _canonical_of_field()
    drop = {owner[f] for f in fields if f in owner}
    kept: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        flag = token.split("=", 1)[0] if token.startswith("--") and "=" in token else token
        canonical, takes_value = table.get(flag, (flag, False))
        width = 2 if takes_value and "=" not in token else 1
        if canonical not in drop:
            kept += args[i:i + width]
        i += width
    return tuple(head + kept + [t for f in fields for t in _render_field(flags, f)])


def replace(flags: ServerFlags, **changes: Any) -> ServerFlags:
    """ServerFlags with some settings changed; argv is the user's with just those flags edited."""
    updated = dataclasses.replace(flags, **changes)
    source = flags.argv or render_args(flags)
    return dataclasses.replace(updated, argv=edit_argv(source, updated, list(changes)))
