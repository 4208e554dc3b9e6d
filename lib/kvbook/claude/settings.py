"""Claude Code wired to a served stack: the settings.json `env` block (merged into an existing file, mode 0600),
the same as shell exports, and the model IDs the installed client sends (the probe, cached per client version)."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvbook.claude.client import CLAUDE_OFFLINE_ENV
from kvbook.claude.probe import ProbeReport, ProbeRow
from kvbook.errors import BadInput

# The aliases a served model may take, and the variable that pins each one to the ID the probe saw it send (read
# by the 2.1.197 binary): a later client that would send another ID keeps sending the routed one.
SLOT_ENV = {"opus": "ANTHROPIC_DEFAULT_OPUS_MODEL", "sonnet": "ANTHROPIC_DEFAULT_SONNET_MODEL",
            "haiku": "ANTHROPIC_DEFAULT_HAIKU_MODEL"}
SLOTS = (*SLOT_ENV, "default")
# Claude Code 2.1.197 raises CLAUDE_CODE_AUTO_COMPACT_WINDOW to at least this many tokens (`Math.max(1e5, value)`
# in its source): a smaller per-slot context cannot be matched, only warned about.
AUTO_COMPACT_FLOOR = 100_000


def max_output_tokens(n_ctx_seq: int) -> int:
    """CLAUDE_CODE_MAX_OUTPUT_TOKENS for a slot: an eighth of it (at most 32000), so a prompt and the up to 4
    continuations Claude Code sends after max_tokens stay inside the slot (1024 for an 8192-token slot: e2e.py)."""
    return max(256, min(32_000, n_ctx_seq // 8))


def claude_env_block(base_url: str, key: str, n_ctx_seq: int, slot_ids: Mapping[str, str]) -> dict[str, str]:
    """The `env` of a settings.json for the served stack: where to send, the LiteLLM key, each slot pinned to the
    probed ID, the attribution header off (prefix-cache reuse), compaction and output sized to the slot."""
    env = {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_AUTH_TOKEN": key, "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
           "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(n_ctx_seq),
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output_tokens(n_ctx_seq)), **CLAUDE_OFFLINE_ENV}
    env.update({SLOT_ENV[slot]: mid for slot, mid in slot_ids.items() if slot in SLOT_ENV})
    return env


def read_settings(path: Path) -> dict:
    """An existing settings.json as a dict ({} when absent); one line when it cannot be merged into."""
    if path.is_dir():
        raise BadInput(f"{path} is a folder; give the path of a settings.json file, nothing was written")
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not readable as JSON ({exc}); fix or move it, nothing was written") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("env", {}), dict):
        raise BadInput(f"{path}: expected a JSON object whose 'env' is an object; nothing was written")
    return doc


def merge_settings(path: Path, env: Mapping[str, str]) -> Path:
    """Write `env` into the settings.json at `path`, keeping every other key (and other env entries); the file
    is replaced atomically with mode 0600 (it holds the key). A file that is not a JSON object is left untouched."""
    doc = read_settings(path)
    doc["env"] = {**doc.get("env", {}), **env}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".settings-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def shell_exports(env: Mapping[str, str]) -> str:
    """`export NAME=value` lines for a POSIX shell (eval "$(kvbook serve ... --print-env)")."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def _report_from(doc: dict) -> ProbeReport:
    rows = tuple(ProbeRow(**{**r, "other_ids": tuple(r.get("other_ids", ())), "body_keys": tuple(r.get("body_keys", ()))})
                 for r in doc["rows"])
    return ProbeReport(client_version=doc["client_version"], claude_path=doc["claude_path"], rows=rows,
                       stripped_env=tuple(doc.get("stripped_env", ())), seconds=float(doc.get("seconds", 0)))


def probed_slot_ids(slots: Sequence[str], cache: Path, claude: Path | None = None,
                    timeout_s: float = 90.0) -> tuple[dict[str, str], str, bool]:
    """{alias: model ID the installed Claude Code sends for it}, its version, and whether the probe ran now (else
    it came from `cache`, kept per client path and version: the IDs change with the client, not between runs)."""
    from kvbook.claude.client import claude_version
    from kvbook.claude.probe import probe_claude_code
    from kvbook.ops.components import find_claude

    unknown = [s for s in slots if s not in SLOTS]
    if unknown:
        raise BadInput(f"unknown Claude Code slot {unknown[0]!r}; slots: {', '.join(SLOTS)}")
    claude = claude or find_claude()
    version = claude_version(claude)
    report, ran = None, False
    if cache.is_file():
        try:
            doc = json.loads(cache.read_text())
            if doc.get("client_version") == version and doc.get("claude_path") == str(claude):
                report = _report_from(doc)
        except (OSError, ValueError, KeyError, TypeError):
            report = None
    if report is None or any(not report.ids_for(s) for s in slots):
        aliases = tuple(dict.fromkeys((*SLOT_ENV, *slots)))  # every pinnable slot: another params file reuses it
        report = probe_claude_code(None, claude, timeout_s=timeout_s, aliases=aliases, opusplan=False)
        ran = True
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(report.to_dict(), indent=1))
    ids = {}
    for s in slots:
        found = report.ids_for(s)
        if not found:
            raise BadInput(f"Claude Code {version} sent no model ID for {s!r} when probed; see `kvbook probe claude-code`")
        ids[s] = found[0]
    return ids, version, ran
