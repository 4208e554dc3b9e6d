"""Ops against the real llama-server and LiteLLM on loopback: launch, route, smoke, record, faults."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import yaml

from kvbook.errors import BadInput, ServerError
from kvbook.ops.litellm import default_routes, start_proxy
from kvbook.ops.llama_server import start_llama_server
from kvbook.records.store import append_records, read_records
from kvbook.smoke.checks import SmokeConfig, Target, check_count_tokens, check_forced_tool, run_suite
from kvbook.smoke.session import run_session

pytestmark = pytest.mark.slow
SMALL = ["-c", "2048", "-np", "1", "--jinja"]


def test_launch_plans_and_measures(smollm2, tmp_path):
    with start_llama_server(["llama-server", "-m", str(smollm2), *SMALL], run_dir=tmp_path) as server:
        assert requests.get(server.base_url + "/health", timeout=5).status_code == 200
        props = requests.get(server.base_url + "/props", timeout=5).json()
        assert props["default_generation_settings"]["n_ctx"] == server.plan.memory.shape.n_ctx_seq
        logged = server.measured()
        assert logged.n_ctx_seq == server.plan.memory.shape.n_ctx_seq
        log = server.log_path
        assert log.parent == tmp_path and "llama_kv_cache: size" in log.read_text()
        pid = server.process.proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_refuses_plan_that_does_not_fit(smollm2, tmp_path):
    from kvbook.plan.devices import custom_budget

    with pytest.raises(BadInput, match="will not fit"):
        start_llama_server(["-m", str(smollm2), *SMALL], run_dir=tmp_path, device=custom_budget(0.01))
    assert not list(tmp_path.glob("*.log")), "nothing may start when the plan refuses"


def test_port_taken_is_refused_before_start(smollm2, tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} .* already in use"):
            start_llama_server(["-m", str(smollm2), *SMALL], run_dir=tmp_path, port=port)
    assert not list(tmp_path.glob("*.log"))


def test_never_healthy_times_out_with_log_tail_and_no_process(gemma3, tmp_path):
    with pytest.raises(ServerError) as err:
        start_llama_server(["-m", str(gemma3), "-c", "4096", "-np", "1"], run_dir=tmp_path, ready_timeout_s=0.05,
                           plan_first=False)
    message = str(err.value)
    assert "not ready after" in message and "Log" in message
    import kvbook.ops.procs as procs

    assert procs.live_processes() == []


def test_non_loopback_needs_explicit_flag(smollm2, tmp_path):
    with pytest.raises(BadInput, match="not loopback"):
        start_llama_server(["-m", str(smollm2)], run_dir=tmp_path, host="0.0.0.0")
    with pytest.raises(BadInput, match="API key"):
        start_llama_server(["-m", str(smollm2)], run_dir=tmp_path, host="0.0.0.0", allow_remote=True)


def test_litellm_routes_and_generates_key(smollm2, tmp_path, monkeypatch):
    monkeypatch.delenv("LITELLM_MASTER_KEY", raising=False)
    with start_llama_server(["-m", str(smollm2), *SMALL], run_dir=tmp_path) as server:
        routes = default_routes(server.base_url, client_ids=("claude-opus-4-8",))
        with start_proxy(routes, run_dir=tmp_path) as proxy:
            assert proxy.master_key.startswith("sk-kvbook-")
            assert oct(proxy.config_path.stat().st_mode & 0o777) == "0o600"
            assert proxy.master_key not in proxy.config_path.read_text()
            body = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            ok = requests.post(proxy.base_url + "/v1/messages", json=body, timeout=60,
                               headers={"x-api-key": proxy.master_key, "anthropic-version": "2023-06-01"})
            assert ok.status_code == 200 and ok.json()["type"] == "message"
            denied = requests.post(proxy.base_url + "/v1/messages", json=body, timeout=60,
                                   headers={"x-api-key": "sk-wrong", "anthropic-version": "2023-06-01"})
            assert denied.status_code in (400, 401, 403)
            # the key never lands in the run folder
            for path in tmp_path.rglob("*"):
                if path.is_file():
                    assert proxy.master_key not in path.read_text(errors="replace"), path


def test_tool_call_failure_is_reported_with_reason(smollm2, tmp_path):
    """The bundled SmolLM2 answers tool_choice any in prose on this build: the suite must say so."""
    with start_llama_server(["-m", str(smollm2), *SMALL], run_dir=tmp_path) as server:
        target = Target("direct", server.base_url, "local")
        forced = check_forced_tool(target, SmokeConfig())
        counted = check_count_tokens(target, SmokeConfig())
    assert counted.passed and counted.details["input_tokens"] > 0
    assert not forced.passed and "plain text" in forced.reason, forced.reason


def test_backend_killed_mid_suite(smollm2, tmp_path):
    results_path = tmp_path / "results.jsonl"
    state = {}

    def kill_backend(repeat: int) -> None:
        if repeat == 1:
            from kvbook.ops.procs import live_processes

            for proc in live_processes():
                if proc.spec.name == "llama-server":
                    proc.kill()
                    state["killed"] = True

    session = run_session(smollm2, SMALL, run_dir=tmp_path, results_path=results_path, run_id="t-kill",
                          routes=("direct", "litellm-anthropic"), repeats=2, between_repeats=kill_backend,
                          smoke=SmokeConfig(max_tokens=12, text_tokens=8))
    assert state.get("killed")
    after = session.results[len(session.results) // 2:]
    # LiteLLM answers count_tokens itself (its own tokenizer), so that one check survives the backend
    backend_bound = [r for r in after if not (r.route == "litellm-anthropic" and r.check == "count_tokens")]
    assert backend_bound and all(not r.passed for r in backend_bound)
    assert all("backend down" in r.reason for r in backend_bound), [r.reason for r in backend_bound]
    records, bad = read_records(results_path)
    assert bad == [] and len(records) == len(session.results)
    # one backend per model: LiteLLM does not retry the dead server (its default 2 retries cost 4-5 s each)
    logs = [p.read_text(errors="replace") for p in tmp_path.rglob("litellm-*.log")]
    assert logs and any("Cannot connect" in text for text in logs)
    assert not any(re.search(r"LiteLLM Retried: [1-9]", text) for text in logs)


def test_litellm_retries_only_where_a_group_has_another_backend(tmp_path):
    from kvbook.ops.litellm import ANTHROPIC, Route, write_config

    one = yaml.safe_load(write_config(default_routes("http://127.0.0.1:1"), tmp_path / "one.yaml").read_text())
    assert one["router_settings"] == {"num_retries": 0}
    group = (Route("g", ANTHROPIC, "local", "http://127.0.0.1:1"), Route("g", ANTHROPIC, "local", "http://127.0.0.1:2"))
    two = yaml.safe_load(write_config(group, tmp_path / "two.yaml", routing_strategy="least-busy").read_text())
    assert two["router_settings"] == {"routing_strategy": "least-busy"}  # LiteLLM's retries may pick the other one


class _NotJson(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>proxy error page</html>")


def test_non_json_answer_fails_with_reason():
    """MOCK: a real llama-server or LiteLLM cannot be made to answer HTML; a stand-in HTTP server does."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NotJson)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        target = Target("direct", f"http://127.0.0.1:{httpd.server_address[1]}", "x")
        results = run_suite(target, SmokeConfig(timeout_s=10))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert results and all(not r.passed for r in results)
    assert any("non-JSON" in r.reason for r in results)


def _writer(path, n, tag):
    for i in range(n):
        append_records(path, [{"writer": tag, "i": i, "pad": "x" * 500}])


def test_records_are_atomic_across_processes_and_crashes(tmp_path):
    path = tmp_path / "results.jsonl"
    procs = [multiprocessing.Process(target=_writer, args=(path, 200, t)) for t in range(3)]
    victim = multiprocessing.Process(target=_writer, args=(path, 100000, "victim"))
    for p in procs + [victim]:
        p.start()
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)
    for p in procs:
        p.join(60)
    victim.join(5)
    records, bad = read_records(path)
    assert bad == []
    for t in range(3):
        assert sorted(r["i"] for r in records if r["writer"] == t) == list(range(200))
    # a torn tail (a writer killed mid-line) is isolated: the next append starts a fresh line
    with path.open("ab") as fh:
        fh.write(b'{"torn": ')
    append_records(path, [{"after": True}])
    records2, bad2 = read_records(path)
    assert len(bad2) == 1 and records2[-1] == {"after": True}


def test_corrupt_line_is_reported_by_number(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n[1,2]\n')
    records, bad = read_records(path)
    assert records == [{"a": 1}, {"b": 2}]
    assert [b.line_no for b in bad] == [2, 4]
