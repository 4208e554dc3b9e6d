"""Router mode (llama-server without a model, with --models-preset FILE and/or --models-dir DIR): the models the
router may load, each as the command line of the child llama-server it spawns, and the worst case of
--models-max of them loaded together. Pure: the INI text and the directory listing arrive as data
(ops/router.py reads them).

As the pinned build does it (tools/server/server-models.cpp server_models::load_models, common/preset.cpp):
- a preset INI has sections [NAME] of `key = value` lines; a key is any spelling of an option without its
  leading dashes, or its LLAMA_ARG_* variable; a switch takes true/false (a negative spelling inverts it);
  `version` and the preset-only keys (load-on-startup, stop-timeout, dedup-cache-models) set no option;
  keys before any section form the preset `default`; [*] applies under every preset (`cascade`);
- --models-dir: each DIR/NAME.gguf is a model NAME; each subdirectory NAME with a GGUF is a model NAME (the first
  shard of a split one), with an `mmproj` file as its projector and an `mtp-`/`dspark-`/`dflash-` file as its
  draft (load_from_models_dir); a preset of the same name is merged over it;
- the router's own command line is laid over every preset (server_models: `preset.merge(base_preset)`), less the
  options it keeps to itself (unset_reserved_args: the model, projector, alias, -hf, the --models-* options, API
  keys and TLS files) and --log-file; host and port are the router's to pick;
- each model runs in its own child llama-server process, at most --models-max at once (0: no limit): the worst
  case is the --models-max models that need most, together on the same devices.
Models in the hub cache (common_list_cached_models) are loadable too; kvbook plans only the preset and directory
ones (a note says so).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvbook.errors import BadInput

DEFAULT_NAME = "default"  # common/preset.h COMMON_PRESET_DEFAULT_NAME
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models", "version")
DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")  # common/preset.cpp draft_prefixes
# the router's own options a child never gets (server-models.cpp unset_reserved_args, and --log-file)
RESERVED = ("-m", "-mm", "-a", "-hf", "--models-dir", "--models-max", "--models-preset", "--models-autoload",
            "--api-key", "--api-key-file", "--ssl-key-file", "--ssl-cert-file", "--log-file", "--host", "--port")
_LINE = re.compile(r"^[ \t]*(?:\[[ \t]*(?P<section>[^\]]*?)[ \t]*\]|(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*"
                   r"(?P<value>[^;#\r\n]*?)|)[ \t]*(?:[;#].*)?$")


@dataclass(frozen=True)
class RouterModel:
    """One model the router may load: its name and the child llama-server's command line (without host/port)."""

    name: str
    argv: tuple[str, ...]
    source: str  # "preset", "models-dir" or both


def parse_ini(text: str, source: str) -> dict[str, dict[str, str]]:
    """Sections of a preset INI as common/preset.cpp parse_ini_from_file reads it (a line it cannot read: an error)."""
    out: dict[str, dict[str, str]] = {}
    section = DEFAULT_NAME
    for n, line in enumerate(text.splitlines(), 1):
        m = _LINE.match(line)
        if m is None:
            raise BadInput(f"{source}:{n}: llama-server cannot read this line (failed to parse server config file)")
        if m["section"] is not None:
            section = m["section"]
            out.setdefault(section, {})
        elif m["key"] is not None:
            out.setdefault(section, {})[m["key"]] = m["value"]
    return out


def _option_tokens(key: str, value: str, section: str, spellings: Mapping[str, tuple[str, bool]],
                   env_names: Mapping[str, str], negatives: Mapping[str, str]) -> list[str]:
    """The argv tokens one `key = value` line stands for (common_preset::to_args)."""
    flag = next((f for f in (f"--{key}", f"-{key}") if f in spellings), env_names.get(key))
    if flag is None:
        raise BadInput(f"option '{key}' not recognized in preset '{section}' (llama-server refuses the preset file)")
    if spellings[flag][1]:
        return [flag, value]
    truthy = value.strip().lower() in ("1", "true", "on", "enabled", "yes")
    if truthy:
        return [flag]
    return [negatives[flag]] if flag in negatives else []


def child_models(sections: Mapping[str, Mapping[str, str]], dir_models: Sequence[tuple[str, tuple[str, ...]]],
                 router_argv: Sequence[str], spellings: Mapping[str, tuple[str, bool]],
                 env_names: Mapping[str, str], negatives: Mapping[str, str]) -> tuple[RouterModel, ...]:
    """Every model the router lists from the preset sections and the --models-dir models ((name, argv) each), in
    name order, each with the [*] section under it and the router's own options over it."""
    def tokens(section: str, options: Mapping[str, str]) -> list[str]:
        return [t for k, v in options.items() if k not in PRESET_ONLY
                for t in _option_tokens(k, v, section, spellings, env_names, negatives)]

    glob = tokens("*", sections.get("*", {}))
    own = _router_own(router_argv, spellings)
    merged: dict[str, tuple[list[str], set[str]]] = {n: (list(a), {"models-dir"}) for n, a in dir_models}
    for name, options in sections.items():
        if name == "*" or (name == DEFAULT_NAME and not options):
            continue
        base, sources = merged.get(name, ([], set()))
        merged[name] = (base + tokens(name, options), sources | {"preset"})
    return tuple(RouterModel(name=n, argv=tuple(glob + a + own), source=" and ".join(sorted(s)))
                 for n, (a, s) in sorted(merged.items()))


def _router_own(argv: Sequence[str], spellings: Mapping[str, tuple[str, bool]]) -> list[str]:
    """The router's command line less the options it keeps to itself (RESERVED)."""
    args = list(argv[1:] if argv and not argv[0].startswith("-") else argv)
    out, i = [], 0
    while i < len(args):
        flag = args[i].replace("_", "-") if args[i].startswith("--") else args[i]
        canonical, takes = spellings.get(flag, (flag, False))
        width = 2 if takes else 1
        if canonical not in RESERVED and not any(spellings.get(r, ("",))[0] == canonical for r in RESERVED):
            out += args[i:i + width]
        i += width
    return out


def worst_case(needs: Sequence[Mapping[str, int]], models_max: int) -> dict[str, int]:
    """Per pool, the sum of the --models-max largest needs (0: every model): an upper bound on any set of
    models loaded together (the set that is worst may differ from pool to pool)."""
    pools = {p for need in needs for p in need}
    n = len(needs) if models_max <= 0 else min(models_max, len(needs))
    return {p: sum(sorted((need.get(p, 0) for need in needs), reverse=True)[:n]) for p in sorted(pools)}
