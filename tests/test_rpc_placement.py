"""Per-device plans checked on real multi-device runs: ggml-rpc-server processes on loopback are llama.cpp
devices, and for each flag set every device's model buffer and KV (or recurrent) buffers the real
llama-server logs at -lv 4 equal kvbook's plan to the printed MiB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.logparse import mib2
from kvbook.ops.rpc import start_rpc_server

pytestmark = pytest.mark.slow

CASES = [  # (model fixture, servers, flags)
    ("gemma3", 2, ["-ngl", "10", "-c", "8192", "-np", "1"]),
    ("gemma3", 2, ["-ngl", "all", "-c", "4096", "-np", "2"]),
    ("gemma3", 2, ["-ngl", "7", "-ts", "3,1", "-c", "8192", "-np", "1", "--swa-full"]),
    ("gemma3", 3, ["-ngl", "19", "-c", "16384", "-np", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]),
    ("smollm2", 2, ["-ngl", "20", "-c", "4096", "-np", "1"]),
    ("smollm2", 2, ["-ngl", "31", "-c", "4096", "-np", "1", "-nkvo"]),
    ("smollm2", 3, ["-ngl", "12", "-ts", "1,2,1", "-c", "6000", "-np", "3"]),
    ("gemma3", 2, ["-ngl", "15", "-nkvo", "-c", "8192", "-np", "2", "-kvu"]),
    ("smollm2", 3, ["-ngl", "all", "-c", "8192", "-np", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]),
    ("moe", 2, ["-ngl", "all", "--n-cpu-moe", "2", "-c", "4096", "-np", "1"]),
    ("moe", 2, ["-ngl", "3", "--cpu-moe", "-c", "4096", "-np", "1"]),
    ("hybrid", 2, ["-ngl", "6", "-c", "4096", "-np", "2"]),
    ("gemma3", 3, ["-ngl", "12", "-dev", "RPC2,RPC0", "-ts", "1,3", "-c", "4096", "-np", "1"]),
    ("smollm2", 2, ["-ngl", "all", "-sm", "none", "-mg", "1", "-c", "4096", "-np", "1"]),
    ("moe", 2, ["-ngl", "all", "-ot", r"blk\.(0|1)\.ffn_.*_exps=CPU", "-c", "4096", "-np", "1"]),
    ("gemma3", 2, ["-ngl", "all", "-dev", "none", "-c", "4096", "-np", "1"]),
    ("gemma3", 2, ["-ngl", "10", "-c", "4096", "-np", "1", "-nr"]),
    ("gemma3", 2, ["-ngl", "10", "-c", "4096", "-np", "1", "--no-host"]),  # no host buffer type here: a no-op
    # -ot per tensor ({rpcN}: that server's host:port): any tensors to CPU (Q4_K ones repack), to another device,
    # the first matching entry wins; part of a layer's experts
    ("gemma3", 2, ["-ngl", "all", "-ot", r"attn_(q|output)\.=CPU,blk\.1[0-7]\.ffn_(up|gate)=RPC0[{rpc0}]", "-c", "4096",
                   "-np", "1"]),
    ("gemma3", 2, ["-ngl", "all", "-ot", r"blk\.1\.=RPC0[{rpc1}],blk\.[0-3]\.=CPU", "-c", "4096", "-np", "1"]),
    ("moe", 2, ["-ngl", "2", "-ot", r"blk\.3\.ffn_up_exps=CPU,blk\.0\.ffn_down_exps=RPC0[{rpc1}]", "-c", "4096", "-np", "1"]),
    ("smollm2", 2, ["-ngl", "all", "-ncffn", "3", "-c", "4096", "-np", "1"]),  # dense FFN of layers 0-2 on the CPU
    ("smollm2", 2, ["-ngl", "0", "-ot", r"blk\.(2|7)\.=RPC0[{rpc1}],output=RPC0[{rpc0}]", "-c", "4096", "-np", "1"]),
]

def with_endpoints(flags: list[str], endpoints: list[str]) -> list[str]:
    """The flags with each {rpcN} replaced by the N-th server's host:port."""
    out = []
    for f in flags:
        for i, ep in enumerate(endpoints):
            f = f.replace(f"{{rpc{i}}}", ep)
        out.append(f)
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A small synthetic Qwen3-MoE GGUF (8 experts, 4 layers) that llama-server really loads."""
    from kvbook.testing.synthetic import TINY_MOE, tiny_metadata, write_synthetic_gguf

    return write_synthetic_gguf(tiny_metadata("qwen3moe", **TINY_MOE), tmp_path_factory.mktemp("moe") / "moe.gguf")


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A small synthetic Qwen3.5 hybrid GGUF (attention every 4th layer, Gated DeltaNet elsewhere)."""
    from kvbook.testing.synthetic import TINY_HYBRID, tiny_metadata, write_synthetic_gguf

    return write_synthetic_gguf(tiny_metadata("qwen35", **TINY_HYBRID), tmp_path_factory.mktemp("hybrid") / "hybrid.gguf")


@pytest.fixture()
def rpc_servers(rpc_endpoints):
    return rpc_endpoints[:3]


def test_rpc_servers_stop_with_their_owner(tmp_path) -> None:
    server = start_rpc_server(tmp_path)
    assert server.alive()
    server.stop()
    assert not server.alive()


@pytest.mark.parametrize("model, n, flags", CASES, ids=[f"{m}-{n}rpc-{' '.join(f)}" for m, n, f in CASES])
def test_every_device_holds_what_the_plan_says(request, rpc_servers, tmp_path, capsys, model, n, flags) -> None:
    path = request.getfixturevalue(model)
    endpoints = rpc_servers[:n]
    argv = ["-m", str(path), "--rpc", ",".join(endpoints), *with_endpoints(flags, endpoints), "--fit", "off"]
    assert cli.main(["plan", "--json", "--", "llama-server", *argv]) == 0
    doc = json.loads(capsys.readouterr().out)
    devices = {d["name"]: d for d in doc["devices"]}
    with start_llama_server([*argv, "--no-warmup"], run_dir=tmp_path) as server:
        logged = server.measured()
    used = {k[k.index("[") + 1:-1] for k in logged.model_mib if "[" in k}  # llama.cpp logs every device it uses
    assert set(devices) == {"CPU", *(f"RPC{i}[{ep}]" for i, ep in enumerate(endpoints) if ep in used)}
    for name, planned in devices.items():
        endpoint = name[name.index("[") + 1:-1] if "[" in name else None
        model_key = "CPU_Mapped" if endpoint is None else next(k for k in logged.model_mib if k.endswith(f"[{endpoint}]"))
        kv_key = "CPU" if endpoint is None else next((k for k in logged.kv_buffer_mib if k.endswith(f"[{endpoint}]")), None)
        # the CPU's weights are its mapped range plus its CPU_REPACK copies (plan/weights.py)
        repack = planned["repack_bytes"]
        assert logged.model_mib.get(model_key, 0.0) == mib2(planned["weights_bytes"] - repack), (name, logged.model_mib)
        assert (logged.model_mib.get("CPU_REPACK", 0.0) if endpoint is None else 0.0) == mib2(repack), (name, logged.model_mib)
        measured_kv = logged.kv_buffer_mib.get(kv_key, 0.0) if kv_key else 0.0
        assert measured_kv == mib2(planned["kv_bytes"] + planned["recurrent_bytes"]), (name, logged.kv_buffer_mib)
        # each device's compute buffer is a calibrated estimate (plan/placement.py compute_terms): within 40% of the
        # log, or 5 MiB for the small buffers (these runs are the calibration's held-out set)
        compute_key = "CPU" if endpoint is None else next((k for k in logged.compute_mib if k.endswith(f"[{endpoint}]")), None)
        measured_compute = logged.compute_mib.get(compute_key, 0.0) if compute_key else 0.0
        if any(n["code"] == "ot.idle-device" for n in doc["notes"]):
            continue  # a device that only holds -ot tensors: its compute buffer is not modelled (the plan says so)
        if any(n["code"] == "spread.dense-ops-bound" for n in doc["notes"]):
            assert planned["compute_bytes"] / 2**20 >= measured_compute, (name, logged.compute_mib)  # a bound
        elif len(devices) > 1:
            planned_mib = planned["compute_bytes"] / 2**20
            assert abs(planned_mib - measured_compute) <= max(0.4 * measured_compute, 5.0), (name, logged.compute_mib,
                                                                                             planned_mib)
        else:  # nothing offloaded (-dev none): the one CPU estimate, within its stated error
            error = abs(planned["compute_bytes"] / 2**20 - measured_compute) / measured_compute * 100
            assert error <= doc["compute_error_pct"], (error, logged.compute_mib)
        assert (measured_compute > 0) == (planned["compute_bytes"] > 0), (name, logged.compute_mib)


@pytest.mark.parametrize("args, needle", [
    (["--rpc", "127.0.0.1:1,127.0.0.1:2", "-ngl", "10", "-ts", "1,1,1"], "-ts has 3 entries but the plan has 2 devices"),
    (["--rpc", "localhost", "-ngl", "10"], "'localhost' is not host:port"),
    (["--rpc", "127.0.0.1:99999", "-ngl", "10"], "is not host:port"),
    (["--rpc", "127.0.0.1:1", "-ngl", "10", "-ts", "1,1"], "-ts has 2 entries but the plan has 1 device (RPC0)"),
    (["--rpc", "127.0.0.1:1, 127.0.0.1:2", "-ngl", "10"], "' 127.0.0.1:2' has spaces around it"),
])
def test_bad_placement_input_is_one_line(capsys, gemma3, args, needle) -> None:
    code = cli.main(["plan", "--", "llama-server", "-m", str(gemma3), *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_rpc_needs_per_layer_sizes(capsys) -> None:
    """A preset without a tensor listing (smollm2-135m; the large presets carry one) has no per-layer sizes."""
    assert cli.main(["plan", "--", "llama-server", "-m", "smollm2-135m", "--rpc", "127.0.0.1:1", "-ngl", "10"]) == 2
    assert "needs the GGUF's tensors" in capsys.readouterr().err
    assert cli.main(["plan", "--device", "rtx-4090", "--", "llama-server", "-m", "smollm2-135m", "--rpc",
                     "127.0.0.1:1", "-ngl", "10"]) == 2
    assert "needs the GGUF's tensors" in capsys.readouterr().err  # RPC beside a local GPU: tests/test_devices.py


def test_an_unreachable_rpc_host_still_plans_from_declared_budgets(capsys, gemma3) -> None:
    """Nothing is contacted at plan time: a remote host's budget is declared (here 1 GiB, too small)."""
    code = cli.main(["plan", "--json", "--rpc-gib", "0.01,64", "--", "llama-server", "-m", str(gemma3),
                     "--rpc", "rpc-a.invalid:50052,rpc-b.invalid:50052", "-ngl", "all", "-ts", "1,1"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verdict"] == "does not fit"
    assert [d["verdict"] for d in doc["devices"]] == ["fits", "does not fit", "fits"]


def test_a_params_file_starts_rpc_servers_and_stops_them(tmp_path, gemma3) -> None:
    """`rpc_servers` in a params file: kvbook starts the ggml-rpc-servers, llama-server uses them as devices,
    the per-device plan matches what was logged, and nothing is left running (the conftest fixture checks)."""
    import yaml

    from kvbook.ops import procs
    from kvbook.ops.rpc import parse_rpc_hosts
    from kvbook.smoke.session import run_session

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "params/runs/smoke-rpc.yaml").read_text())
    session = run_session(gemma3, doc["server_args"], run_dir=tmp_path, results_path=tmp_path / "r.jsonl", run_id="rpc",
                          routes=("direct",), rpc=parse_rpc_hosts(doc["rpc_servers"]))
    names = [d["name"] for d in session.plan["devices"]]
    assert sum(n.startswith("RPC") for n in names) == 2, names
    assert session.comparison and all(r["match"] for r in session.comparison if r["match"] is not None), session.comparison
    assert not [p for p in procs.live_processes() if "rpc" in p.spec.name]


def test_rpc_servers_refuse_bad_entries_and_double_naming(tmp_path, gemma3) -> None:
    from kvbook.errors import BadInput
    from kvbook.ops.rpc import parse_rpc_hosts, rpc_servers
    from kvbook.smoke.session import run_session

    with pytest.raises(BadInput, match=r"rpc_servers\[1\]: port and threads must be whole numbers"):
        parse_rpc_hosts(["127.0.0.1:0", "127.0.0.1:x"])
    with pytest.raises(BadInput, match="not loopback"):
        with rpc_servers(parse_rpc_hosts(["192.0.2.1:0"]), tmp_path):
            pass
    with pytest.raises(BadInput, match="RPC devices twice"):
        run_session(gemma3, ["--rpc", "127.0.0.1:1", "-ngl", "1"], run_dir=tmp_path, results_path=tmp_path / "r",
                    run_id="x", rpc=parse_rpc_hosts(["127.0.0.1:0"]))
