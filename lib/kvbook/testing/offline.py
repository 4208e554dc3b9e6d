"""The served stack with no network: llama-server, LiteLLM, smoke checks and a `claude -p` turn run inside a
network namespace that has only loopback, traced for every connect/send, and their logs scanned for any attempt
to reach another host. Used by tests/test_offline_stack.py.

    python -m kvbook.testing.offline OUT_DIR [--claude PATH]     (run it inside the namespace: see netns_prefix)

writes OUT_DIR/result.json and leaves every component's log in OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

# What a component writes when it tried to reach a host that is not this one (Python, glibc, Node/Bun).
OUTSIDE_LOG = re.compile(
    r"Name or service not known|Temporary failure in name resolution|Max retries exceeded|huggingface\.co"
    r"|raw\.githubusercontent\.com|ConnectionError|Network is unreachable|ENOTFOUND|EAI_AGAIN|ENETUNREACH"
    r"|getaddrinfo failed|api\.anthropic\.com|statsig|sentry\.io|registry\.npmjs\.org"
)
# Model names shaped like the ones LiteLLM treats specially (a Hugging Face tokenizer for llama-2/llama-3).
ALIASES = ("tinyllama-2-anthropic", "llama-3.1-8b-local")
CLAUDE_PROMPT = "What is the capital of France? Answer in one word."
# One thread: on a shared 2-core machine two spinning llama.cpp threads crawled (0.2 tokens/s measured under load).
SERVER_ARGS = ("-c", "8192", "-np", "1", "-t", "1", "--jinja", "--temp", "0", "-n", "256")


def netns_prefix() -> tuple[list[str] | None, str]:
    """An argv prefix that runs a command in a new network namespace with only loopback up, or (None, why not)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None:
        return None, "util-linux `unshare` is not installed"
    if ip is None:
        return None, "iproute2 `ip` is not installed (it brings loopback up inside the namespace)"
    why = ""
    for flags in (("-n",) if os.geteuid() == 0 else ()) + ("-rn",):
        try:
            probe = subprocess.run([unshare, flags, "--", ip, "link", "set", "lo", "up"], capture_output=True,
                                   text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"`unshare {flags}` failed: {exc}"
            continue
        if probe.returncode == 0:
            return [unshare, flags, "--", "sh", "-c", f'"{ip}" link set lo up && exec "$@"', "kvbook-netns"], ""
        why = f"`unshare {flags}` refused here (exit {probe.returncode}): {probe.stderr.strip()[:200]}"
    return None, why


def strace_prefix(trace: Path) -> tuple[list[str] | None, str]:
    """An argv prefix that records every connect/send of a command and its children in `trace`, or (None, why)."""
    strace = shutil.which("strace")
    if strace is None:
        return None, "strace is not installed"
    argv = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-e", "signal=none",
            "-o", str(trace)]
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return None, f"strace cannot trace here: {probe.stderr.strip()[:200]}"
    return argv, ""


_INET = re.compile(r"sa_family=AF_INET6?\b.*?(?:sin6?_port=htons\((\d+)\)).*?"
                   r"(?:inet_addr\(\"([\d.]+)\"\)|inet_pton\(AF_INET6,\s*\"([^\"]+)\")")


def outside_attempts(trace_lines: Iterable[str]) -> list[str]:
    """strace lines where a process connected or sent to an address other than loopback, or to a DNS port."""
    found = []
    for line in trace_lines:
        match = _INET.search(line)
        if not match:
            continue
        port, v4, v6 = int(match.group(1)), match.group(2), match.group(3)
        loopback = (v4 or "").startswith("127.") or v4 == "0.0.0.0" or v6 in ("::1", "::") \
            or (v6 or "").startswith("::ffff:127.")
        if not loopback or port == 53:
            found.append(line.strip()[:300])
    return found


def outside_log_lines(paths: Iterable[Path]) -> list[str]:
    """Lines of component logs that show an attempt to reach another host, as 'file: line'."""
    hits = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if OUTSIDE_LOG.search(line):
                hits.append(f"{path.name}: {line.strip()[:300]}")
    return hits


@dataclass(frozen=True)
class RouteAnswer:
    """What one route answered: streamed first byte, the non-streamed text, the tool-call smoke, the token count."""

    route: str
    model: str
    stream_ok: bool
    ttfb_s: float | None
    text: str
    tool_call_passed: bool
    tool_call_reason: str
    input_tokens: int | None
    count_reason: str


def ask_route(target, cfg) -> RouteAnswer:
    """Every question the offline test compares, asked of one route."""
    from kvbook.smoke.checks import check_count_tokens, check_forced_tool, check_stream_text, check_text

    stream = check_stream_text(target, cfg)
    text = check_text(target, cfg)
    tool = check_forced_tool(target, cfg)
    count = check_count_tokens(target, cfg)
    return RouteAnswer(target.route, target.model, stream.passed, stream.timings.ttfb_s,
                       text.details.get("text", "") if text.passed else f"(failed: {text.reason})",
                       tool.passed, tool.reason, count.details.get("input_tokens"), count.reason)


def run_stack(out: Path, claude: Path | None) -> dict:
    """llama-server (SmolLM2) + LiteLLM with the alias routes, every route asked in two rounds (a failed tokenizer
    download is not cached by LiteLLM, so it would show in both), then a `claude -p` turn under an alias."""
    from kvbook.ops.components import model_path
    from kvbook.ops.litellm import alias_routes, default_routes, start_proxy
    from kvbook.ops.llama_server import start_llama_server
    from kvbook.smoke.checks import SmokeConfig, Target

    cfg = SmokeConfig(text_tokens=16, max_tokens=32, timeout_s=180)
    result: dict = {"aliases": list(ALIASES), "rounds": []}
    with start_llama_server(["-m", str(model_path("smollm2-135m")), *SERVER_ARGS], run_dir=out) as server, \
            start_proxy(alias_routes(server.base_url, ALIASES) + default_routes(server.base_url), run_dir=out) as proxy:
        auth = {"x-api-key": proxy.master_key}
        targets = [Target("direct", server.base_url, "local")]
        targets += [Target(r.backend, proxy.base_url, r.model_name, auth) for r in proxy.routes
                    if r.model_name.split("-via-")[0] in ALIASES]
        for _ in range(2):
            result["rounds"].append([asdict(ask_route(t, cfg)) for t in targets])
        if claude is not None:
            result["claude"] = claude_offline_turn(claude, proxy.base_url, proxy.master_key, out)
    return result


def claude_offline_turn(claude: Path, proxy_url: str, key: str, out: Path) -> dict:
    """One `claude -p` turn through LiteLLM under an alias; its stdout, stderr and HOME stay in `out` to be scanned."""
    from kvbook.claude.client import claude_env, run_claude
    from kvbook.claude.e2e import MAX_OUTPUT_TOKENS, TURN_FLAGS, _parse_result

    home, work = out / "claude-home", out / "claude-work"
    work.mkdir(parents=True, exist_ok=True)
    env = claude_env(home, proxy_url, {"ANTHROPIC_API_KEY": key,
                                       "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS)})
    run = run_claude(claude, ["-p", CLAUDE_PROMPT, "--model", ALIASES[1], "--output-format", "json",
                              "--max-turns", "1", *TURN_FLAGS], env=env, cwd=work, timeout_s=300)
    (out / "claude-stdout.log").write_text(run.stdout)
    (out / "claude-stderr.log").write_text(run.stderr)
    doc = _parse_result(run.stdout)
    return {"returncode": run.returncode, "seconds": round(run.seconds, 2), "result": str(doc.get("result"))[:300],
            "stop_reason": doc.get("stop_reason"), "is_error": doc.get("is_error")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--claude", type=Path)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_stack(args.out, args.claude)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
