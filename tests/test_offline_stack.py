"""Local means local: the served stack (real llama-server with SmolLM2, real LiteLLM, the real `claude -p`) runs in a
network namespace that has only loopback, made by this test. Routed answers must equal direct ones, a routed first
byte must come within 3 s of direct (the defect was 23 s: LiteLLM downloading a tokenizer for llama-2/llama-3
names), no component log may show a failed lookup or connection, and the syscall trace may show no connect or send
to any address but loopback. Nothing can leave this machine: the namespace has no other interface."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook.ops.procs import kill_group
from kvbook.testing.offline import ALIASES, netns_prefix, outside_attempts, outside_log_lines, strace_prefix

pytestmark = [pytest.mark.slow, pytest.mark.litellm_command]  # offline as users start it
FIRST_BYTE_MARGIN_S = 3.0  # generous on purpose: the tight figure is benchmarks/bench_proxy.py's


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list[str] | None]:
    """One run of kvbook.testing.offline inside the namespace: (result.json, its folder, strace lines or None)."""
    from kvbook.ops.components import find_claude, find_llama_server

    prefix, why = netns_prefix()
    if prefix is None:
        print(f"\ntest_offline_stack skipped: this host refuses a network namespace: {why}", file=sys.stderr)
        pytest.skip(f"no network namespace on this host: {why}")
    out = tmp_path_factory.mktemp("offline")
    trace = out / "syscalls.strace"
    tracer, no_trace = strace_prefix(trace)
    if tracer is None:
        print(f"\ntest_offline_stack: no syscall trace ({no_trace}); the log scan still runs", file=sys.stderr)
    find_llama_server()  # fails here, with its own message, where the pinned build is missing
    argv = [*prefix, *(tracer or []), sys.executable, "-m", "kvbook.testing.offline", str(out),
            "--claude", str(find_claude())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc)  # on a timeout or Ctrl-C nothing of the stack stays behind
    (out / "driver.log").write_text(output)
    assert proc.returncode == 0, f"offline stack run failed (exit {proc.returncode}):\n{output[-3000:]}"
    lines = trace.read_text(errors="replace").splitlines() if tracer else None
    return json.loads((out / "result.json").read_text()), out, lines


def _no_stop(reason: str) -> str:
    return re.sub(r"\(stop_reason [^)]*\)", "", reason)


def _rounds(result: dict) -> list[dict[str, dict]]:
    return [{f"{a['route']}:{a['model']}": a for a in answers} for answers in result["rounds"]]


def test_every_alias_route_answers_as_direct_does(offline_run):
    result, _, _ = offline_run
    for answers in _rounds(result):
        direct = answers.pop("direct:local")
        assert direct["stream_ok"] and direct["text"] and not direct["text"].startswith("(failed"), direct
        assert {a["model"].split("-via-")[0] for a in answers.values()} == set(ALIASES)
        assert {a["route"] for a in answers.values()} == {"anthropic", "openai"}
        for name, got in answers.items():
            assert got["stream_ok"], (name, got)
            assert got["text"] == direct["text"], f"{name} answered {got['text']!r}, direct {direct['text']!r}"
            # the same tool-call outcome and content; the stop reason may differ: the openai/ route reports
            # end_turn where llama-server stopped at max_tokens (seen with litellm 1.106.2, docs/serving.md)
            assert (got["tool_call_passed"], _no_stop(got["tool_call_reason"])) == \
                (direct["tool_call_passed"], _no_stop(direct["tool_call_reason"])), name


def test_routed_first_byte_within_margin_of_direct(offline_run):
    """Best of the two rounds per route against direct's best: the defect (a tokenizer download retried with 23 s
    of back-off) is in every request, while a loaded shared machine's noise is not."""
    result, _, _ = offline_run
    best: dict[str, float] = {}
    for answers in _rounds(result):
        for name, got in answers.items():
            assert got["ttfb_s"] is not None, (name, got)
            best[name] = min(best.get(name, got["ttfb_s"]), got["ttfb_s"])
    direct = best.pop("direct:local")
    slow = {name: round(t - direct, 2) for name, t in best.items() if t - direct >= FIRST_BYTE_MARGIN_S}
    assert not slow, f"routed first byte later than direct ({direct:.2f} s) by {slow} s"


def test_claude_code_turn_completes_offline(offline_run):
    result, _, _ = offline_run
    turn = result["claude"]
    assert turn["returncode"] == 0 and not turn["is_error"] and turn["result"].strip(), turn
    assert turn["stop_reason"] == "end_turn", turn


def test_no_component_tried_to_reach_another_host(offline_run):
    _, out, trace = offline_run
    logs = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".log", ".jsonl", ".txt")]
    assert any(p.name.startswith("litellm-") for p in logs) and any(p.name.startswith("llama-server") for p in logs), \
        f"component logs missing from {out}: {[p.name for p in logs]}"
    assert outside_log_lines(logs) == []
    if trace is not None:
        assert any("connect(" in line for line in trace), "the syscall trace recorded nothing: it did not trace"
        assert outside_attempts(trace) == []


def test_outside_attempts_are_recognised():
    """The trace parser itself: a DNS query (even to a loopback stub) and a remote connect are caught, loopback not."""
    lines = [
        '12 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = -1',
        '12 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0',
        '13 connect(7, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2606:4700::6810:84e5", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
        '14 connect(9, {sa_family=AF_INET, sin_port=htons(8080), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '14 connect(9, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
        '15 sendto(3, "x", 1, MSG_NOSIGNAL, NULL, 0) = 1',
    ]
    assert [line.split()[0] + line.split()[1][:8] for line in outside_attempts(lines)] == \
        ["12connect(", "12connect(", "13connect("]
