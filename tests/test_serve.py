"""`kvbook serve`, run as a user runs it: the real CLI in a subprocess, one served stack for the module (real
llama-server with SmolLM2, real LiteLLM, the real Claude Code for the probe and a `claude -p` turn), several checks
against it, Ctrl-C at the end; bad input needs no server."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.litellm_command  # kvbook serve runs the `litellm` command, as for users
SERVER_ARGS = ["-c", "8192", "-np", "1", "--jinja", "--temp", "0", "-t", "1"]


def kvbook(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvbook.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def gone(pid: int, within_s: float = 15.0) -> bool:
    """The process no longer exists (or is a zombie)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


class Stack:
    """A `kvbook serve` subprocess, its output files and its state."""

    def __init__(self, out: Path, args: list[str], name: str):
        self.out, self.name = out, name
        self.env = {**os.environ, "KVBOOK_OUTPUTS": str(out)}
        self.env.pop("LITELLM_MASTER_KEY", None)
        self.stdout, self.stderr = out / "serve.stdout", out / "serve.stderr"
        with self.stdout.open("w") as so, self.stderr.open("w") as se:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvbook.cli", "serve", *args], stdout=so, stderr=se,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT)
        self.folder = out / "serve" / name

    def wait_ready(self, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while "stops everything" not in self.stdout.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"kvbook serve did not get ready (exit {self.proc.poll()}):\n"
                            f"{self.stdout.read_text()[-2000:]}\n{self.stderr.read_text()[-3000:]}")
            time.sleep(0.3)
        return self.state()

    def state(self) -> dict:
        return json.loads((self.folder / "state.json").read_text())

    def pids(self, state: dict) -> list[int]:
        return [s["pid"] for s in state["servers"]] + [state["litellm"]["pid"]] + [r["pid"] for r in state["rpc"]]

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def write_params(path: Path, name: str, models: list[dict], **top) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "port": 0, "smoke_every_s": 0, **top, "models": models}))
    return path


@pytest.fixture(scope="module")
def users_own_server(tmp_path_factory):
    """The user's own llama-server, unrelated to kvbook, running through the whole module: serve must neither
    count it nor stop it."""
    from kvbook.ops.components import find_llama_server, model_path
    from kvbook.ops.procs import free_port, kill_group

    log = tmp_path_factory.mktemp("user") / "user.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(find_llama_server()), "-m", str(model_path("smollm2-135m")), "-c", "512", "-t", "1",
                                 "--port", str(free_port())], stdout=fh, stderr=fh, start_new_session=True)
    yield proc
    kill_group(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, users_own_server):
    out = tmp_path_factory.mktemp("serve")
    user = out / "home" / ".claude" / "settings.json"
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps({"theme": "dark", "permissions": {"allow": ["Bash(ls)"]}, "env": {"KEEP_ME": "1"}}))
    params = write_params(out / "t.yaml", "t-serve", [
        {"model": "smollm2-135m", "name": "smol", "server_args": SERVER_ARGS, "slots": ["opus"]},
        {"model": "smollm2-135m", "name": "smol-b", "server_args": ["-c", "2048", "-np", "1", "-t", "1"],
         "slots": ["haiku"]}])
    s = Stack(out, ["-f", str(params), "--claude-settings", str(user)], "t-serve")
    s.user_settings = user
    try:
        s.ready = s.wait_ready()
        yield s
    finally:
        s.stop(signal.SIGKILL)  # only reached when the last test did not stop it


def test_ready_block_and_folder(stack) -> None:
    text = stack.stdout.read_text()
    st = stack.ready
    assert f"key in {stack.folder / 'litellm.key'}" in text and st["litellm"]["url"] in text
    assert f"claude --settings {stack.folder / 'claude-settings.json'}" in text
    assert "smoke check through LiteLLM: passed" in text, text
    assert "8192 tokens per slot (logged 8192)" in text, text
    assert stat.S_IMODE((stack.folder / "litellm.key").stat().st_mode) == 0o600
    logs = sorted(p.name for p in stack.folder.glob("*.log"))
    assert logs == sorted([*(f"llama-server-{s['port']}.log" for s in st["servers"]),
                           f"litellm-{st['litellm']['port']}.log", "serve.log"]), logs
    key = (stack.folder / "litellm.key").read_text().strip()
    assert key not in json.dumps(st)  # the state never holds the key
    cmdline = Path(f"/proc/{st['litellm']['pid']}/cmdline").read_bytes().split(b"\0")
    assert Path(cmdline[1].decode()).name == "litellm" and b"--config" in cmdline, cmdline  # the command, not a fork


def test_litellm_config_for_daily_use(stack) -> None:
    st = stack.ready
    doc = yaml.safe_load(Path(st["litellm"]["config"]).read_text())
    names = {e["model_name"]: e for e in doc["model_list"]}
    ids = st["claude"]["slot_ids"]
    assert set(ids) == {"opus", "haiku"} and all(i.startswith("claude-") for i in ids.values())
    plan_max = st["servers"][0]["plan"]["max_input_tokens"]
    assert plan_max == 8192  # the per-slot context (-c 8192 -np 1)
    for name in ("smol", ids["opus"], "claude-*"):
        assert names[name]["litellm_params"]["model"] == "anthropic/smol"
        assert names[name]["model_info"] == {"max_input_tokens": plan_max}
    assert names[ids["haiku"]]["litellm_params"] == {**names["smol-b"]["litellm_params"]}
    assert names["smol-b"]["litellm_params"]["api_base"] == st["servers"][1]["url"]
    assert names[ids["haiku"]]["model_info"] == {"max_input_tokens": 2048}
    assert doc["router_settings"]["num_retries"] == 0  # one backend per name: no retries against it


def test_each_slot_reaches_its_own_server(stack) -> None:
    """Two models planned together and served side by side: opus's ID on the first, haiku's on the second."""
    import requests

    st = stack.ready
    key = (stack.folder / "litellm.key").read_text().strip()
    logs = [Path(s["log"]) for s in st["servers"]]
    for slot, index in (("haiku", 1), ("opus", 0)):
        before = [p.read_text(errors="replace").count("launch_slot_") for p in logs]
        resp = requests.post(st["litellm"]["url"] + "/v1/messages", headers={"x-api-key": key}, timeout=120,
                             json={"model": st["claude"]["slot_ids"][slot], "max_tokens": 4,
                                   "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200, resp.text[:300]
        grew = [p.read_text(errors="replace").count("launch_slot_") > b for p, b in zip(logs, before)]
        assert grew == [index == 0, index == 1], (slot, grew)


def test_claude_settings_merged_and_print_env(stack) -> None:
    st = stack.ready
    key = (stack.folder / "litellm.key").read_text().strip()
    doc = json.loads(stack.user_settings.read_text())
    assert doc["theme"] == "dark" and doc["permissions"] == {"allow": ["Bash(ls)"]} and doc["env"]["KEEP_ME"] == "1"
    env = doc["env"]
    assert env["ANTHROPIC_BASE_URL"] == st["litellm"]["url"] and env["ANTHROPIC_AUTH_TOKEN"] == key
    assert env["CLAUDE_CODE_ATTRIBUTION_HEADER"] == "0"
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "8192" and env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "1024"
    assert env["ANTHROPIC_DEFAULT_OPUS_MODEL"] == st["claude"]["slot_ids"]["opus"]
    assert "ANTHROPIC_DEFAULT_SONNET_MODEL" not in env
    assert stat.S_IMODE(stack.user_settings.stat().st_mode) == 0o600
    printed = kvbook("serve", "--name", "t-serve", "--print-env", env=stack.env)
    assert printed.returncode == 0, printed.stderr
    assert f"export ANTHROPIC_AUTH_TOKEN={key}" in printed.stdout.splitlines()
    assert "export CLAUDE_CODE_ATTRIBUTION_HEADER=0" in printed.stdout.splitlines()


def test_claude_p_answers_through_the_served_stack(stack, tmp_path) -> None:
    """The real client, configured by nothing but the printed settings path."""
    from kvbook.claude.client import claude_env, run_claude
    from kvbook.ops.components import find_claude

    (tmp_path / "home").mkdir()
    env = claude_env(tmp_path / "home", "http://127.0.0.1:9")
    for k in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"):
        env.pop(k)  # only the settings file says where to send and with which key
    before = (Path(stack.ready["servers"][0]["log"])).read_text(errors="replace").count("launch_slot_")
    run = run_claude(find_claude(), ["--settings", str(stack.folder / "claude-settings.json"), "-p",
                                     "What is the capital of France? Answer in one word.", "--model", "opus",
                                     "--tools", "", "--output-format", "json"],
                     env=env, cwd=tmp_path, timeout_s=180)
    assert run.returncode == 0, run.stdout[-1000:] + run.stderr[-1000:]
    result = json.loads(run.stdout)
    assert result.get("is_error") is False and result.get("result"), result
    after = Path(stack.ready["servers"][0]["log"]).read_text(errors="replace").count("launch_slot_")
    assert after > before  # the turn reached the served llama-server


def test_a_second_serve_of_the_same_name_is_refused(stack) -> None:
    """A subprocess with a timeout: were the check missing, this would start a second stack."""
    run = kvbook("serve", "--name", "t-serve", "--port", "0", "--", "-m", stack.ready["servers"][0]["argv"][2],
                 "-c", "512", env=stack.env, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is already running" in run.stderr, run.stderr
    assert (stack.folder / "state.json").exists() and stack.proc.poll() is None


def test_status_then_a_crashed_llama_server_is_restarted(stack) -> None:
    shown = kvbook("serve", "--name", "t-serve", "--status", env=stack.env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    old = stack.ready["servers"][0]
    assert f"port {old['port']}  pid {old['pid']}  up (HTTP 200)" in shown.stdout, shown.stdout
    assert "plan fits: 8192 tokens per slot" in shown.stdout and "logged at start: 8192 tokens per slot" in shown.stdout
    assert "last smoke check" in shown.stdout and "passed" in shown.stdout
    os.kill(old["pid"], signal.SIGKILL)  # a crash
    deadline = time.monotonic() + 120
    while stack.state()["servers"][0]["pid"] == old["pid"]:
        assert time.monotonic() < deadline and stack.proc.poll() is None, stack.stderr.read_text()[-2000:]
        time.sleep(0.3)
    log = (stack.folder / "serve.log").read_text()
    assert "exited with code -9 (SIGKILL" in log and "restarting in 1 s (restart 1)" in log and "restarted on port" in log
    new = stack.state()["servers"][0]
    assert new["port"] == old["port"] and new["restarts"] == 1
    shown = kvbook("serve", "--name", "t-serve", "--status", env=stack.env)
    assert shown.returncode == 0 and f"pid {new['pid']}  up" in shown.stdout and "had exited with code -9" in shown.stdout


def test_ctrl_c_stops_everything(stack, users_own_server) -> None:
    """Last of the stack's checks: SIGINT, as Ctrl-C sends it; the user's own llama-server is left running."""
    pids = stack.pids(stack.state())
    assert stack.stop(signal.SIGINT) == 0, stack.stderr.read_text()[-2000:]
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p, 0)]
    assert users_own_server.poll() is None
    assert not (stack.folder / "state.json").exists()
    assert "Ctrl-C: every process it started is stopped" in stack.stderr.read_text()
    after = kvbook("serve", "--name", "t-serve", "--status", env=stack.env)
    assert after.returncode == 2 and after.stderr.count("\n") == 1 and "is running" in after.stderr


# ---------------------------------------------------------------- no server needed


@pytest.fixture()
def env(tmp_path, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("KVBOOK_OUTPUTS", str(tmp_path / "out"))
    return {**os.environ}


def kvbook_here(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (no interpreter start per case): exit code and stderr."""
    from kvbook.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("doc", "message"), [
    ("models: []", "'models' must be a non-empty list"),
    ("models: [{model: nope-model}]", "is neither a bundled model"),
    ("models: [{model: smollm2-135m, slots: [gpt]}]", "slots out of opus, sonnet, haiku, default"),
    ("models: [{model: smollm2-135m, server_args: [--port, '9']}]", "--port is set by kvbook serve"),
    ("host: 0.0.0.0\nmodels: [{model: smollm2-135m}]", "is not loopback"),
    ("colour: red\nmodels: [{model: smollm2-135m}]", "unknown key 'colour'"),
    ("models: [{model: smollm2-135m, slots: [opus]}, {model: smollm2-135m, name: b, slots: [opus]}]",
     "slot 'opus' is given to both"),
])
def test_bad_params_one_line_nothing_written(tmp_path, env, capsys, doc, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(doc)
    code, err = kvbook_here(capsys, "serve", "-f", str(path))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_several_servers_are_planned_together(tmp_path, env, capsys) -> None:
    """One SmolLM2 with a 131072-token slot fits this machine (~2.8 GiB of KV); sixteen replicas do not: refused
    with one line, nothing started or written."""
    from kvbook.serve.stack import plan_stack, spec_from_params

    args = ["-c", "131072", "-np", "1", "-t", "1"]
    one = spec_from_params(write_params(tmp_path / "one.yaml", "one", [{"model": "smollm2-135m", "server_args": args}]))
    assert plan_stack(one, [[]]).fits
    many = write_params(tmp_path / "many.yaml", "many", [{"model": "smollm2-135m", "server_args": args, "replicas": 16}])
    stack = plan_stack(spec_from_params(many), [[]] * 16)
    assert not stack.fits and all(p.verdict.value == "fits" for p in stack.plans)
    code, err = kvbook_here(capsys, "serve", "-f", str(many))
    assert code == 2 and err.count("\n") == 1, err
    assert "the 16 llama-servers together need" in err and "at start" in err and "nothing was started" in err
    assert not (tmp_path / "out").exists()


def test_a_busy_port_is_refused_before_anything_starts(tmp_path, env, capsys) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        params = write_params(tmp_path / "p.yaml", "busy", [{"model": "smollm2-135m", "slots": []}], port=port)
        code, err = kvbook_here(capsys, "serve", "-f", str(params))
    assert code == 2 and err.count("\n") == 1 and f"127.0.0.1:{port} is already in use" in err, err
    assert not (tmp_path / "out").exists()


def test_settings_file_that_is_not_json_is_left_alone(tmp_path) -> None:
    from kvbook.claude.settings import merge_settings
    from kvbook.errors import BadInput

    path = tmp_path / "settings.json"
    path.write_text("{not json")
    with pytest.raises(BadInput, match="nothing was written"):
        merge_settings(path, {"A": "1"})
    assert path.read_text() == "{not json" and [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_unmergeable_claude_settings_refused_before_anything_starts(tmp_path, env, capsys) -> None:
    (tmp_path / "settings.json").write_text("[1, 2]")
    params = write_params(tmp_path / "p.yaml", "s", [{"model": "smollm2-135m"}])
    code, err = kvbook_here(capsys, "serve", "-f", str(params), "--claude-settings", str(tmp_path / "settings.json"))
    assert code == 2 and err.count("\n") == 1 and "expected a JSON object" in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "settings.json").read_text() == "[1, 2]"



def test_two_models_and_replicas_routes_and_groups(tmp_path) -> None:
    """params/serve/two-models.yaml planned together; each slot's ID goes to its model, claude-* to the first;
    replicas of a model form one LiteLLM group (so LiteLLM may retry on the other backend)."""
    from kvbook.ops.litellm import write_config
    from kvbook.serve.stack import plan_stack, spec_from_params, stack_routes

    spec = spec_from_params(ROOT / "params/serve/two-models.yaml")
    assert [m.name for m in spec.models] == ["gemma3", "smollm2"]
    stack = plan_stack(spec, [[], []])
    assert stack.fits and len(stack.plans) == 2
    pool, start, grown, _ = stack.need[0]
    assert start == sum(u.need_bytes - u.host_extras_bytes for p in stack.plans for u in p.pools if u.pool == pool)
    assert grown == sum(u.need_bytes for p in stack.plans for u in p.pools if u.pool == pool) > start
    ids = {"opus": "claude-opus-x", "sonnet": "claude-sonnet-x", "haiku": "claude-haiku-x"}
    routes = stack_routes(spec, ["http://127.0.0.1:1", "http://127.0.0.1:2"], [32768, 16384], ids)
    to = {r.model_name: (r.upstream_model, r.api_base) for r in routes if r.backend == "anthropic"}
    assert to["claude-opus-x"] == to["claude-sonnet-x"] == to["claude-*"] == ("gemma3", "http://127.0.0.1:1")
    assert to["claude-haiku-x"] == ("smollm2", "http://127.0.0.1:2")
    doc = yaml.safe_load(write_config(routes, tmp_path / "a.yaml").read_text())
    assert doc["router_settings"]["num_retries"] == 0
    two = write_params(tmp_path / "r.yaml", "r", [{"model": "smollm2-135m", "replicas": 2, "server_args": ["-c", "1024"]}])
    rspec = spec_from_params(two)
    routes = stack_routes(rspec, ["http://127.0.0.1:1", "http://127.0.0.1:2"], [1024, 1024], {"opus": "claude-o"})
    group = [r.api_base for r in routes if r.model_name == "claude-o"]
    assert group == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    doc = yaml.safe_load(write_config(routes, tmp_path / "b.yaml").read_text())
    assert "router_settings" not in doc  # several backends per name: LiteLLM's retries may go to the other one


# ---------------------------------------------------------------- stopping: SIGTERM, and a killed parent


def test_no_orphans_after_sigterm_or_a_killed_serve(tmp_path) -> None:
    """Two short-lived stacks started side by side (no Claude slots, so no probe): one gets SIGTERM, the other
    SIGKILL, which gives serve no chance to clean up: its children must still die (the kernel's
    PR_SET_PDEATHSIG), and the stale state is reported as such."""
    stacks = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        name = f"t-{sig.name.lower()}"
        params = write_params(tmp_path / f"{name}.yaml", name, [{"model": "smollm2-135m", "slots": [],
                                                                  "server_args": ["-c", "1024", "-t", "1"]}],
                              restart=False)
        (tmp_path / name).mkdir()
        stacks[sig] = Stack(tmp_path / name, ["-f", str(params)], name)
    for sig, s in stacks.items():
        pids = s.pids(s.wait_ready())
        assert len(pids) == 2 and all(not gone(p, 0) for p in pids)
        code = s.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), s.stderr.read_text()[-2000:]
        assert all(gone(p) for p in pids), f"left running after {sig.name}: {[p for p in pids if not gone(p, 0)]}"
        status = kvbook("serve", "--name", s.name, "--status", env=s.env)
        assert status.returncode == 2 and status.stderr.count("\n") == 1
        assert ("stale" in status.stderr) == (sig == signal.SIGKILL), status.stderr
