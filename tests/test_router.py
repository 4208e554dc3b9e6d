"""Router mode (`--models-preset`, `--models-dir`, `--models-max`): each model the router may load planned as the child
llama-server it spawns, and the worst case of --models-max of them together (ops/router.py, plan/router.py).
Checked against the real pinned router: one start with a preset INI of SmolLM2 and Gemma 3 270M (a [*] section,
an option by its variable name, a negated switch), both loaded through /models/load; each child's command line (as
the router reports it) reads as kvbook's, and every exact figure each child logs at -lv 4 equals its plan. The
router runs in its own process group with its children: stopping it leaves nothing running."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import requests

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.ops.host import detect_host, host_device
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.logparse import parse_log
from kvbook.ops.measured import compare_memory
from kvbook.ops.router import plan_router, router_models
from kvbook.plan.flags import parse_server_args
from kvbook.plan.router import parse_ini, worst_case

_SAME = ("argv", "read", "ignored", "from_env", "host", "port")


def _ini(smollm2: Path, gemma3: Path) -> str:
    return (f"; kvbook test presets\n[*]\nt = 1\nno-warmup = true\n\n[smol]\nmodel = {smollm2}\nc = 2048\nnp = 2\n\n"
            f"[gemma]\nmodel = {gemma3}\nctx-size = 1024\nLLAMA_ARG_N_PARALLEL = 1\nkv-offload = false\n")


@pytest.fixture(scope="module")
def router_run(smollm2, gemma3, tmp_path_factory):
    """The real router with both models loaded: (flags, the /models listing, the router's log)."""
    folder = tmp_path_factory.mktemp("router")
    ini = folder / "presets.ini"
    ini.write_text(_ini(smollm2, gemma3))
    flags = parse_server_args(["llama-server", "--models-preset", str(ini), "--models-max", "2"])
    with start_llama_server(flags, run_dir=folder, plan_first=False) as server:
        for name in ("smol", "gemma"):
            requests.post(f"{server.base_url}/models/load", json={"model": name}, timeout=10).raise_for_status()
        deadline, listing = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            listing = requests.get(f"{server.base_url}/models", timeout=10).json()["data"]
            if all(m["status"]["value"] == "loaded" for m in listing):
                break
            time.sleep(0.3)
        log = server.log_path.read_text(errors="replace")
        children = [int(p) for m in listing for p in m["status"]["args"][m["status"]["args"].index("--port") + 1:][:1]]
    assert all(m["status"]["value"] == "loaded" for m in listing), listing
    time.sleep(0.5)
    left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(ini)) or
            any(_cmdline_has(p, f"--port\0{port}\0") for port in children)]
    return flags, {m["id"]: m for m in listing}, log, left


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _child_log(log: str, port: int) -> str:
    """The lines the router forwarded from the child on `port` ("[port] line")."""
    prefix = re.compile(rf"^\[\s*{port}\] ?")
    return "\n".join(prefix.sub("", line) for line in log.splitlines() if prefix.match(line))


def test_each_child_is_planned_as_the_router_spawns_it(router_run) -> None:
    flags, listing, log, _ = router_run
    device = host_device(detect_host())
    routed = plan_router(flags, device, {})
    assert {m.name for m, _ in routed.children} == set(listing) == {"smol", "gemma"}
    for model, plan in routed.children:
        args = listing[model.name]["status"]["args"]
        real = parse_server_args(args[1:])
        ours = parse_server_args(model.argv)
        assert dataclasses.replace(real, **{f: getattr(ours, f) for f in _SAME}) == ours, model.name
        port = int(args[args.index("--port") + 1])
        logged = parse_log(_child_log(log, port))
        rows = compare_memory(plan.memory, logged)
        assert rows and not [r for r in rows if r.matches is False], (model.name, rows)
    assert routed.worst_bytes["Host"] == sum(p.pools[0].need_bytes for _, p in routed.children)


def test_stopping_the_router_leaves_no_child_running(router_run) -> None:
    assert router_run[3] == []


def test_the_worst_case_is_the_largest_models_max_together() -> None:
    needs = [{"GPU": 5, "Host": 1}, {"GPU": 3, "Host": 9}, {"GPU": 4, "Host": 2}]
    assert worst_case(needs, 2) == {"GPU": 9, "Host": 11}
    assert worst_case(needs, 0) == {"GPU": 12, "Host": 12}  # 0: no limit


def test_the_ini_reads_as_llama_server_reads_it(tmp_path, smollm2) -> None:
    sections = parse_ini("top = 1\n[ a:b ]  ; note\nc = 4096 # comment\n\n[*]\nnp=2\n", "x.ini")
    assert sections == {"default": {"top": "1"}, "a:b": {"c": "4096"}, "*": {"np": "2"}}
    ini = tmp_path / "p.ini"
    ini.write_text(f"[m]\nmodel = {smollm2}\nfrobnicate = 1\n")
    with pytest.raises(BadInput, match="option 'frobnicate' not recognized in preset 'm'"):
        router_models(parse_server_args(["--models-preset", str(ini)]))


def test_models_dir_and_the_cli(capsys, tmp_path, smollm2) -> None:
    (tmp_path / "SmolLM2.gguf").symlink_to(smollm2)
    (tmp_path / "mmproj-x.gguf").write_bytes(b"")  # a companion file, not a model
    assert cli.main(["plan", "--json", "--", "llama-server", "--models-dir", str(tmp_path), "-c", "1024",
                     "--models-max", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)["router"]
    assert [m["name"] for m in doc["models"]] == ["SmolLM2"] and doc["models_max"] == 0
    assert doc["models"][0]["plan"]["n_ctx"] == 1024  # the router's own -c reaches the child
