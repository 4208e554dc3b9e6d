"""Concurrency and load with the real parts: two `kvbook run`s at once get their own ports and
folders; 4 smoke clients for 60 s through LiteLLM lose no record and leave results.jsonl valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from kvbook.ops.litellm import ROUTE_ANTHROPIC, default_routes, start_proxy
from kvbook.ops.llama_server import running_llama_servers, start_llama_server
from kvbook.paths import repo_root
from kvbook.records.store import read_records
from kvbook.smoke.checks import Target
from kvbook.smoke.loadgen import run_load

pytestmark = pytest.mark.slow
TEMPLATE = str(repo_root() / "params" / "templates" / "smollm2-chatml-tools.jinja")


def test_four_clients_for_thirty_seconds_through_litellm(smollm2, tmp_path):
    results = tmp_path / "results.jsonl"
    # 4 slots so the clients really run side by side; each slot 2048 tokens
    args = ["-m", str(smollm2), "-c", "8192", "-np", "4", "--jinja", "--chat-template-file", TEMPLATE, "-n", "256"]
    with start_llama_server(args, run_dir=tmp_path) as server:
        with start_proxy(default_routes(server.base_url), run_dir=tmp_path) as proxy:
            assert urlparse(proxy.base_url).hostname == "127.0.0.1" == urlparse(server.base_url).hostname
            target = Target("litellm-anthropic", proxy.base_url, ROUTE_ANTHROPIC, {"x-api-key": proxy.master_key})
            load = run_load(target, results, clients=4, duration_s=30, run_id="load-test")
    records, bad = read_records(results)
    assert bad == [], bad
    assert load.written == load.requests == len(records), load
    assert load.client_errors == 0, load.failures
    assert load.duration_s < 30 + 60 + 5, load  # bounded: the deadline plus at most one request timeout
    for client, n in enumerate(load.per_client):
        seqs = sorted(r["seq"] for r in records if r["client"] == client)
        assert n >= 3 and seqs == list(range(1, n + 1)), (client, n, seqs)  # every client progressed, none lost
    transport = [r for r in records if r["check"] in ("stream_text", "count_tokens") and not r["passed"]]
    assert transport == [], transport[:3]  # under load the proxy and the server still answer every request
    assert all(proxy.master_key not in line for line in results.read_text().splitlines())


def _small(tmp_path: Path, source: str, **changes) -> Path:
    doc = yaml.safe_load((repo_root() / "params" / "runs" / source).read_text())
    doc.update(changes)
    path = tmp_path / source
    path.write_text(yaml.safe_dump(doc))
    return path


def test_two_runs_at_once_get_their_own_ports_and_folders(tmp_path):
    """A smoke run and a (small) real comparison of both bundled models, started together."""
    outputs = tmp_path / "outputs"
    env = {**os.environ, "KVBOOK_OUTPUTS": str(outputs)}
    # one thread each: two servers with default threads on 2 cores spin and crawl (0.4 tokens/s measured)
    smoke = _small(tmp_path, "smoke-default.yaml", label="smoke-beside-compare", max_tokens=48,
                   server_args=["-c", "2048", "-np", "1", "-t", "1", "--jinja", "--chat-template-file", TEMPLATE],
                   routes=["direct", "litellm-anthropic"])
    compare_args = yaml.safe_load((repo_root() / "params" / "runs" / "compare-bundled.yaml").read_text())["server_args"]
    # the comparison on the direct route only: the smoke run is the one that goes through LiteLLM
    compare = _small(tmp_path, "compare-bundled.yaml", repeats=2, routes=["direct"], max_tokens=48,
                     server_args=[*compare_args, "-t", "1"])
    users = {pid for pid, _ in running_llama_servers()}  # the user's own llama-servers, running before this test
    procs = [subprocess.Popen([sys.executable, "-m", "kvbook.cli", "run", "-f", str(path), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              stdin=subprocess.DEVNULL) for path in (smoke, compare)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-600:] for _, err in outs]
    warned = [line for _, err in outs for line in err.splitlines() if "oversubscribed" in line]
    # the two runs' servers (-t 1 each) fit the 2 cores together: a warning may only come from a server of the user's
    assert all(any(f"pid {p}" in w or f", {p}" in w for p in users) for w in warned), (users, warned)
    summaries = {json.loads(p.read_text())["kind"]: (p.parent, json.loads(p.read_text()))
                 for p in outputs.glob("*/summary.json")}
    assert sorted(summaries) == ["compare", "smoke"]
    (smoke_dir, smoke_sum), (compare_dir, compare_sum) = summaries["smoke"], summaries["compare"]
    assert smoke_dir != compare_dir and smoke_sum["run_id"] != compare_sum["run_id"]
    # three llama-servers and the smoke run's LiteLLM, each on its own port
    ports = [int(p.stem.rsplit("-", 1)[1]) for p in outputs.glob("*/llama-server-*.log")]
    ports += [int(p.stem.rsplit("-", 1)[1]) for p in outputs.glob("*/litellm-*.log")]
    assert len(ports) == 4 and len(set(ports)) == 4, ports
    records, bad = read_records(outputs / "results.jsonl")
    assert bad == []
    assert {r["label"] for r in records} == {"smoke-beside-compare", "compare-bundled/smollm2-135m",
                                             "compare-bundled/gemma3-270m"}
    # the comparison itself: both models, spreads, differences with intervals, a plain verdict
    assert compare_sum["contenders"] == ["compare-bundled/smollm2-135m", "compare-bundled/gemma3-270m"]
    for stats in compare_sum["stats"]:
        assert stats["repeats"] == 2 and stats["first_text_ms"]["n"] == 2 and stats["required"]["total"] == 12
    assert {d["metric"] for d in compare_sum["differences"]} >= {"tool-call pass rate", "tokens/s (median)"}
    assert compare_sum["verdict"].startswith("Verdict: ")
    assert isinstance(compare_sum["required_failures"], list)  # what `kvbook run` gates on
    assert (compare_dir / "03-compare.html").exists()


def test_a_second_server_with_default_threads_is_warned_about(smollm2, llama_server, tmp_path):
    """Also with a user's own llama-server running (started here, unrelated to kvbook, on a port of its own):
    the machine-wide scan finds both, and the arithmetic is checked on the one this test started."""
    from kvbook.ops.llama_server import thread_oversubscription
    from kvbook.ops.procs import free_port, kill_group

    with (tmp_path / "user.log").open("wb") as log:
        user = subprocess.Popen([str(llama_server), "-m", str(smollm2), "-c", "512", "-t", "1", "--port",
                                 str(free_port())], stdout=log, stderr=log, start_new_session=True)
    try:
        with start_llama_server(["-m", str(smollm2), "-c", "1024", "-t", "1"], run_dir=tmp_path) as server:
            pid = server.process.proc.pid
            found = dict(running_llama_servers())
            assert {pid, user.pid} <= set(found), found
            mine = [(pid, found[pid])]
            warning = thread_oversubscription(["llama-server", "-m", "x"], cores=2, others=mine)
            assert warning and f"pid {pid}" in warning and "want 3 CPU threads on 2 cores" in warning, warning
            assert thread_oversubscription(["llama-server", "-m", "x", "--threads", "1"], cores=2, others=mine) is None
            warning = thread_oversubscription(["llama-server", "-m", "x", "--threads", "1"], cores=2)
            assert warning and "want" in warning  # the machine-wide default counts the user's server too
    finally:
        kill_group(user)


def test_a_client_whose_check_raises_keeps_going_and_records_it(tmp_path, monkeypatch):
    """Stand-in check (says so): a real server cannot be made to raise an arbitrary exception inside a
    check on demand; the point is that run_load records it as a failure instead of losing the thread."""
    import kvbook.smoke.loadgen as load

    def raises(target, cfg):
        raise RuntimeError("surprise")

    monkeypatch.setattr(load, "ROTATION", (("forced_tool_call", raises),))
    result = load.run_load(Target("x", "http://127.0.0.1:9", "m"), tmp_path / "r.jsonl", clients=2, duration_s=0.3)
    records, bad = read_records(tmp_path / "r.jsonl")
    assert bad == [] and result.client_errors == result.requests == len(records) > 0
    assert all(r["reason"] == "client error: RuntimeError: surprise" and not r["passed"] for r in records)
    assert {r["client"] for r in records} == {0, 1}
