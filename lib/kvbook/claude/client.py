"""The installed `claude -p`, run in a throwaway HOME against a given endpoint, in its own process group."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.errors import BadInput, ServerError
from kvbook.ops.procs import die_with_parent, kill_group

_VERSION_RE = re.compile(r"^(\d+\.\d+\.\d+)\s+\(Claude Code\)\s*$")


# Inherited variables that would change which model the client picks, or where it sends it.
STRIP_ENV = re.compile(r"^(ANTHROPIC_|CLAUDE_|CLAUDECODE$|AWS_BEARER_TOKEN_BEDROCK$|HTTPS?_PROXY$|https?_proxy$)")


# Claude Code's switches against traffic to anything but ANTHROPIC_BASE_URL, each read by the 2.1.197 binary (found in
# its strings); tests/test_offline_stack.py runs a turn with no network and traces every connect.
CLAUDE_OFFLINE_ENV: dict[str, str] = {
    # prevents all non-essential traffic: telemetry, error reports, feedback, feature flags, account notices
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    # prevents usage telemetry (also implied by the switch above; kept for versions that read only this one)
    "DISABLE_TELEMETRY": "1",
    # prevents Sentry error reports
    "DISABLE_ERROR_REPORTING": "1",
    # prevents the update check and download (npm registry / Anthropic's release bucket)
    "DISABLE_AUTOUPDATER": "1",
    # prevents the feature-flag (GrowthBook) fetch
    "DISABLE_GROWTHBOOK": "1",
    # prevents the automatic install of Anthropic's plugin marketplace (a git clone from GitHub)
    "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
}


@dataclass(frozen=True)
class ClaudeRun:
    """One finished `claude` process."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def claude_env(home: Path, base_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every claude run gets: inherited ANTHROPIC_*/CLAUDE_* settings removed (they
    would change the model it picks), a throwaway HOME, a local base URL and a dummy key."""
    env = {k: v for k, v in os.environ.items() if not STRIP_ENV.match(k)}
    env.update({
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-kvbook-dummy",
        "NO_PROXY": "127.0.0.1,localhost",
        **CLAUDE_OFFLINE_ENV,
    })
    env.update(extra or {})
    return env


def run_claude(claude: Path, args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float) -> ClaudeRun:
    """Run claude in its own process group; on timeout the whole group is killed and ServerError raised."""
    argv = (str(claude), *args)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, start_new_session=True, preexec_fn=die_with_parent)
    except OSError as exc:
        raise BadInput(f"cannot run {claude} ({exc.strerror}); point KVBOOK_CLAUDE at Claude Code or run `make setup`") from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise ServerError(f"`claude {' '.join(args[:3])} ...` did not finish within {timeout_s:.0f} s and was killed "
                          f"(pass a larger timeout if the machine is slow)") from None
    except BaseException:
        kill_group(proc)
        raise
    kill_group(proc)  # anything it left in its group
    return ClaudeRun(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                     time.monotonic() - start)


def claude_version(claude: Path, timeout_s: float = 30.0) -> str:
    """The client's version from `claude --version`; anything that is not Claude Code is an error."""
    with tempfile.TemporaryDirectory(prefix="kvbook-claude-") as tmp:
        home = Path(tmp)
        try:
            run = run_claude(claude, ["--version"], env=claude_env(home, "http://127.0.0.1:9"), cwd=home,
                             timeout_s=timeout_s)
        except ServerError:
            raise BadInput(f"{claude} is not Claude Code: `--version` did not answer within {timeout_s:.0f} s") from None
    first = (run.stdout.strip().splitlines() or [""])[0]
    match = _VERSION_RE.match(first)
    if run.returncode != 0 or match is None:
        shown = first[:80] or run.stderr.strip()[:80] or "nothing"
        raise BadInput(f"{claude} is not Claude Code: `--version` exited {run.returncode} and printed {shown!r} "
                       f"(expected 'X.Y.Z (Claude Code)'); point KVBOOK_CLAUDE at the npm-installed claude or run `make setup`")
    return match.group(1)
