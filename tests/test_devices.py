"""Several devices: multi-GPU presets, --device-budget, RPC beside local GPUs, and this-machine detection.

The layer split is checked against llama.cpp's rule written out here from the pinned source (src/llama-model.cpp
llama_model::load_tensors: layer il of the active ones goes to the first device whose cumulative share exceeds
il / active), and the device order against src/llama.cpp llama_prepare_model_devices (RPC servers first, then
local GPUs). No GPU is on this machine, so no CUDA run backs these plans; RPC-only plans are checked against real
ggml-rpc-server runs in tests/test_rpc_placement.py.
"""

from __future__ import annotations

import json
import os
import stat
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.interface import GiB, MiB
from kvbook.ops import host as oh
from kvbook.ops.host import parse_nvidia_smi, this_machine
from kvbook.plan import devices as dv
from kvbook.plan.devices import (
    load_device,
    metal_working_set_estimate,
    parse_device_budgets,
    parse_size,
    tensor_limits,
)

SCHEMA = json.loads(resources.files("kvbook").joinpath("data/plan.schema.json").read_text())


def plan_json(capsys, *args: str) -> dict:
    code = cli.main(["plan", "--json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def expected_layers(n_all: int, ngl: int, devices: list[str], shares: list[float]) -> list[str]:
    """llama.cpp's assignment of the n_all repeating layers and the output (the last entry), written out
    independently of kvbook.plan.placement."""
    total, points = sum(shares), []
    for s in shares:
        points.append((points[-1] if points else 0.0) + s / total)
    first, active = max(n_all + 1 - ngl, 0), min(ngl, n_all + 1)
    out = []
    for il in range(n_all + 1):
        if il < first:
            out.append("CPU")
            continue
        x = (il - first) / active
        out.append(devices[min(next((i for i, p in enumerate(points) if p > x), len(devices)), len(devices) - 1)])
    return out


def layer_list(doc: dict) -> list[str]:
    runs = doc["placement"]["layers"]
    return [r["device"] for r in runs for _ in range(r["first"], r["last"] + 1)] + [doc["placement"]["output"]]


QWEN = ["--", "llama-server", "-m", "qwen3.6-35b-a3b", "-c", "65536", "-ngl", "99", "-fa", "on"]
# what llama.cpp reads as free after its CUDA context: nvidia-smi's total less 555 MiB (params/devices/README.md)
FREE_3090, FREE_4090 = (24576 - 555) * MiB, (24564 - 555) * MiB


def test_two_3090s_split_layers_by_free_memory_with_kv_and_compute_per_gpu(capsys) -> None:
    doc = plan_json(capsys, "--device", "2x-rtx-3090", *QWEN)
    names = [d["name"] for d in doc["devices"]]
    assert names == ["CUDA0", "CUDA1", "CPU"]
    assert [d["budget_bytes"] for d in doc["devices"][:2]] == [FREE_3090] * 2
    assert layer_list(doc) == expected_layers(40, 99, ["CUDA0", "CUDA1"], [1.0, 1.0])
    gpus = doc["devices"][:2]
    assert all(d["kv_bytes"] > 0 and d["weights_bytes"] > GiB for d in gpus)
    assert sum(d["kv_bytes"] for d in doc["devices"]) == doc["kv_bytes"]
    assert sum(d["recurrent_bytes"] for d in doc["devices"]) == doc["recurrent_bytes"]
    # each GPU that runs layers and the host side reserve their own compute buffer: CUDA's model (public logs)
    assert all(d["compute_bytes"] > 0 for d in doc["devices"])
    assert any(n["code"] == "compute.gpu-intervals" and "CUDA: fitted on" in n["text"] for n in doc["notes"])
    assert doc["verdict"] == "fits"


@pytest.mark.parametrize("extra, devices, shares", [
    (["-ts", "3,1"], ["CUDA0", "CUDA1"], [3.0, 1.0]),
    (["-ts", "0,1"], ["CUDA0", "CUDA1"], [0.0, 1.0]),
    (["-ngl", "20"], ["CUDA0", "CUDA1"], [1.0, 1.0]),
])
def test_two_gpu_split_follows_ts_and_partial_ngl(capsys, extra, devices, shares) -> None:
    args = [a for a in QWEN if a not in ("-ngl", "99")] + extra
    doc = plan_json(capsys, "--device", "2x-rtx-3090", *args)
    ngl = int(extra[1]) if extra[0] == "-ngl" else 99
    assert layer_list(doc) == expected_layers(40, ngl, devices, shares)


@pytest.mark.parametrize("extra", [["-sm", "none", "-mg", "1"], ["-dev", "CUDA1"]])
def test_one_gpu_of_two_holds_everything(capsys, extra) -> None:
    doc = plan_json(capsys, "--device", "2x-rtx-3090", *QWEN, *extra)
    assert [d["name"] for d in doc["devices"]] == ["CUDA1", "CPU"]
    # every layer and the output on CUDA1; the token embeddings stay on the CPU (llama.cpp's input layer), mapped
    # as a file range (the alignment padding around them counts: "weight copies")
    held = doc["devices"][0]["weights_bytes"] + doc["devices"][1]["weights_bytes"]
    assert 0 <= held - doc["weights_bytes"] < 2**20
    assert 0 < doc["devices"][1]["weights_bytes"] < doc["weights_bytes"] // 50 and doc["placement"]["input"] == "CPU"
    assert doc["devices"][0]["kv_bytes"] == doc["kv_bytes"]


def test_device_budget_overrides_a_preset_and_moves_the_split(capsys) -> None:
    doc = plan_json(capsys, "--device", "2x-rtx-3090", "--device-budget", "CUDA1=12GiB", *QWEN)
    assert doc["devices"][1]["budget_bytes"] == 12 * GiB
    assert layer_list(doc) == expected_layers(40, 99, ["CUDA0", "CUDA1"], [FREE_3090, 12 * GiB])
    doc = plan_json(capsys, "--device", "rtx-4090", "--device-budget", "CUDA0=20GiB", *QWEN)
    assert doc["devices"][0]["budget_bytes"] == 20 * GiB


def test_device_budget_builds_a_gpu_and_host(capsys) -> None:
    doc = plan_json(capsys, "--device-budget", "CUDA0=24GiB", "--host-gib", "64", "--", "llama-server", "-m",
                    "gpt-oss-120b", "-c", "32768", "--cpu-moe", "-fa", "on")
    assert [(d["name"], d["budget_bytes"]) for d in doc["devices"]] == [("CUDA0", 24 * GiB), ("CPU", 64 * GiB)]
    gpu, host = doc["devices"]
    assert host["weights_bytes"] > 50 * GiB > gpu["weights_bytes"]  # the experts stay in host RAM
    doc = plan_json(capsys, "--device-budget", "CUDA1=24GiB,CUDA0=22.5GiB", "--device-budget", "CPU=20000MiB",
                    "--", "llama-server", "-m", "llama-3.1-8b", "-c", "4096")
    assert [(d["name"], d["budget_bytes"]) for d in doc["devices"]] == [
        ("CUDA0", int(22.5 * GiB)), ("CUDA1", 24 * GiB), ("CPU", 20000 * MiB)]


def test_a_tensor_over_the_devices_largest_stays_on_the_cpu(capsys, gemma3) -> None:
    """--device-budget NAME=SIZE@MAX: Gemma 3 270M's tied output (170 MiB, token_embd at MUL_MAT) is larger than
    a 128 MiB device accepts (ggml-vulkan supports_op, maxStorageBufferRange), so it stays mapped on the CPU and
    the Vulkan device holds 170 MiB less; measured on lavapipe in tests/test_vulkan_lavapipe.py."""
    argv = ["--", "llama-server", "-m", str(gemma3), "-ngl", "all", "-c", "4096", "-np", "1", "--fit", "off"]
    whole = {d["name"]: d for d in plan_json(capsys, "--device-budget", "Vulkan0=2GiB", *argv)["devices"]}
    kept = {d["name"]: d for d in plan_json(capsys, "--device-budget", "Vulkan0=2GiB@128MiB", *argv)["devices"]}
    assert round((whole["Vulkan0"]["weights_bytes"] - kept["Vulkan0"]["weights_bytes"]) / MiB, 2) == 170.0  # as logged
    assert kept["CPU"]["weights_bytes"] == whole["CPU"]["weights_bytes"]  # the same mapped token_embd
    assert tensor_limits(["Vulkan0=2GiB@128MiB,vulkan1=2GiB", "CUDA0=1GiB@4GiB"]) == {"Vulkan0": 128 * MiB,
                                                                                    "CUDA0": 4 * GiB}


def test_sizes_and_names_parse() -> None:
    assert [parse_size(s) for s in ("24GiB", "22.5GiB", "20000MiB", "24 gb", ".5TiB")] == [
        24 * GiB, int(22.5 * GiB), 20000 * MiB, 24 * 10**9, 512 * GiB]
    assert parse_device_budgets(["cuda0=1GiB,vulkan1=2GiB", "host=3GiB", "metal=4GiB", "rocm2=1MiB"]) == (
        ("CUDA0", GiB), ("Vulkan1", 2 * GiB), ("CPU", 3 * GiB), ("Metal", 4 * GiB), ("ROCm2", MiB))


@pytest.mark.parametrize("args, needle", [
    (["--device", "rtx-4090", "--device-budget", "CUDA1=20GiB"], "has no device CUDA1; its devices: CUDA0, CPU"),
    (["--device-budget", "CUDA0=24"], "'24' is not a size like 24GiB"),
    (["--device-budget", "CUDA0=lots"], "is not a size like"),
    (["--device-budget", "CUDA0=24GiB,cuda0=20GiB"], "CUDA0 is given twice"),
    (["--device-budget", "CUDA0"], "is not NAME=SIZE"),
    (["--device-budget", "GPU0=4GiB"], "unknown device name 'GPU0'"),
    (["--device-budget", "Metal=48GiB,CUDA0=24GiB"], "Metal is unified memory and cannot be mixed"),
    (["--device-budget", "RPC0=4GiB"], "RPC0: no matching llama-server --rpc endpoint"),
    (["--device-budget", "CUDA0=24GiB", "--gpu-gib", "24"], "--device-budget with --gpu-gib"),
    (["--device-budget", "CUDA0=24GiB", "--budget-gib", "24"], "--device-budget with --budget-gib"),
    (["--device-budget", "CPU=8GiB", "--host-gib", "8"], "--host-gib with --device-budget CPU"),
    (["--device-budget", "ROCm0=24GiB,CUDA1=2GiB"], "CUDA and ROCm devices come from different"),
    (["--device-budget", "CUDA0=0MiB"], "must be more than 0"),
    (["--device-budget", "Vulkan0=2GiB@lots"], "Vulkan0 largest tensor (@SIZE): 'lots' is not a size"),
])
def test_bad_device_budgets_are_one_line(capsys, args, needle) -> None:
    code = cli.main(["plan", *args, "--", "llama-server", "-m", "llama-3.1-8b", "-c", "4096"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_rpc_devices_come_before_local_gpus(capsys, gemma3) -> None:
    """llama_prepare_model_devices (src/llama.cpp) inserts the RPC servers at the front of the device list,
    then the GPUs; -mg and the layer split count in that order. Checked against the source only: a local GPU
    cannot be run here."""
    base = ["--device", "rtx-4090", "--", "llama-server", "-m", str(gemma3), "-c", "4096", "--rpc", "127.0.0.1:50052",
            "-ngl", "all"]
    doc = plan_json(capsys, "--device-budget", "RPC0=2GiB", *base)
    assert [d["name"] for d in doc["devices"]] == ["RPC0[127.0.0.1:50052]", "CUDA0", "CPU"]
    assert layer_list(doc) == expected_layers(18, 19, ["RPC0[127.0.0.1:50052]", "CUDA0"], [2 * GiB, FREE_4090])
    assert doc["devices"][0]["budget_bytes"] == 2 * GiB
    assert any(n["code"] == "spread.rpc-compute" and "local GPUs' (CUDA0) buffers are not calibrated" in n["text"]
               for n in doc["notes"])
    one = plan_json(capsys, *base, "-sm", "none", "-mg", "0")  # device 0 is the RPC server, not CUDA0
    assert sorted(d["name"] for d in one["devices"]) == ["CPU", "RPC0[127.0.0.1:50052]"]
    swapped = plan_json(capsys, *base, "-dev", "CUDA0,RPC0")
    assert [d["name"] for d in swapped["devices"]][:2] == ["CUDA0", "RPC0[127.0.0.1:50052]"]
    assert layer_list(swapped)[0] == "CUDA0"


def test_the_two_host_rpc_preset_binds_to_the_command_lines_endpoints(capsys, gemma3) -> None:
    cmd = ["--", "llama-server", "-m", str(gemma3), "-c", "4096", "-ngl", "all"]
    rpc = ["--rpc", "192.168.1.11:50052,192.168.1.12:50052"]
    doc = plan_json(capsys, "--device", "rpc-2-hosts", *cmd, *rpc)
    assert [(d["name"], d["budget_bytes"]) for d in doc["devices"]][1:] == [
        ("RPC0[192.168.1.11:50052]", 57344 * MiB), ("RPC1[192.168.1.12:50052]", 57344 * MiB)]
    doc = plan_json(capsys, "--device", "rpc-2-hosts", "--device-budget", "RPC1=8GiB", *cmd, *rpc)
    assert doc["devices"][2]["budget_bytes"] == 8 * GiB
    for args, needle in ((cmd, "rpc-2-hosts has 2 RPC devices"),
                         ([*cmd, "--rpc", "192.168.1.11:50052"], "but llama-server has 1 --rpc endpoints"),
                         ([*cmd, "--rpc", "192.168.1.11:50052,10.0.0.9:50052"], "endpoint 1 is 10.0.0.9:50052"),
                         (["--rpc-gib", "8,8", "--device-budget", "RPC0=8GiB", *cmd, *rpc], "both give RPC budgets")):
        assert cli.main(["plan", "--device", "rpc-2-hosts", *args]) == 2
        assert needle in capsys.readouterr().err


def test_solver_places_over_two_gpus(capsys) -> None:
    code = cli.main(["plan", "--solve", "--json", "--device", "2x-rtx-3090", "--", "llama-server", "-m",
                     "qwen3.6-35b-a3b", "-fa", "on"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["solver"]["placements"]
    assert {d["name"] for d in doc["devices"]} == {"CUDA0", "CUDA1", "CPU"}
    assert doc["verdict"] != "does not fit"


# ------------------------------------------------------------------ this machine

# Rows of real nvidia-smi output captured from public sources (found by code search), reduced to this query's
# columns (index, name, memory.total, memory.free) in --format=csv,noheader,nounits form:
# an environment report of 8x A800-SXM4-80GB (printed with index, name, memory.total, memory.free, driver, compute_cap);
# agent tool logs of an RTX 4090 (24564 MiB, 24090 MiB free) and an RTX 5090 (32607 MiB, 32119 MiB free).
A800 = """0, NVIDIA A800-SXM4-80GB, 81920, 8404
1, NVIDIA A800-SXM4-80GB, 81920, 12549
2, NVIDIA A800-SXM4-80GB, 81920, 12459
3, NVIDIA A800-SXM4-80GB, 81920, 12549
4, NVIDIA A800-SXM4-80GB, 81920, 67547
5, NVIDIA A800-SXM4-80GB, 81920, 81148
6, NVIDIA A800-SXM4-80GB, 81920, 81032
7, NVIDIA A800-SXM4-80GB, 81920, 65326
"""
MIXED = "0, NVIDIA GeForce RTX 4090, 24564, 24090\n1, NVIDIA GeForce RTX 5090, 32607, 32119\n"
# A DGX Spark (GB10, unified memory) prints [N/A] for both figures (a public cluster guide, captured with header).
GB10 = "0, NVIDIA GB10, [N/A], [N/A]\n"


def test_nvidia_smi_rows_parse() -> None:
    gpus = parse_nvidia_smi(A800)
    assert len(gpus) == 8 and gpus[0].name == "NVIDIA A800-SXM4-80GB" and (gpus[4].total_mib, gpus[4].free_mib) == (81920, 67547)
    assert [g.free_mib for g in parse_nvidia_smi(MIXED)] == [24090, 32119]
    for garbage in (GB10, "", "No devices were found\n", "0, X, 10\n", "0, X, 10, 20\n", "NVIDIA-SMI has failed"):
        with pytest.raises(ValueError):
            parse_nvidia_smi(garbage)


def _stub(tmp_path: Path, body: str) -> dict[str, str]:
    """A stand-in `nvidia-smi` on PATH: this machine has no NVIDIA GPU or driver to run the real one."""
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_this_machine_reads_its_gpus_from_nvidia_smi(tmp_path) -> None:
    """Stand-in for hardware this machine lacks: a stub nvidia-smi script printing captured real rows."""
    env = _stub(tmp_path, f"cat <<'EOF'\n{MIXED}EOF\n")
    device = this_machine(env, platform="linux")
    assert [(p.name, p.kind, p.budget_bytes, p.total_bytes) for p in device.pools[:2]] == [
        ("CUDA0", "gpu", 24090 * MiB, 24564 * MiB), ("CUDA1", "gpu", 32119 * MiB, 32607 * MiB)]
    assert device.pools[2].kind == "host" and not device.unified
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in device.notes  # two different GPUs: CUDA's order may differ
    picked = this_machine({**env, "CUDA_VISIBLE_DEVICES": "1"}, platform="linux")
    assert [(p.name, p.budget_bytes) for p in picked.pools][0] == ("CUDA0", 32119 * MiB) and len(picked.pools) == 2
    hidden = this_machine({**env, "CUDA_VISIBLE_DEVICES": ""}, platform="linux")
    assert [p.kind for p in hidden.pools] == ["host"]


def test_this_machine_plans_on_the_detected_gpus(tmp_path, capsys, monkeypatch) -> None:
    """Stand-in for hardware this machine lacks: a stub nvidia-smi on PATH; the CLI plans over its two GPUs."""
    monkeypatch.setenv("PATH", _stub(tmp_path, f"cat <<'EOF'\n{MIXED}EOF\n")["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    doc = plan_json(capsys, "--", "llama-server", "-m", "llama-3.1-8b", "-c", "4096")
    assert [d["name"] for d in doc["devices"]] == ["CUDA0", "CUDA1", "CPU"]
    assert layer_list(doc) == expected_layers(32, 33, ["CUDA0", "CUDA1"], [24090 * MiB, 32119 * MiB])
    assert any(n["code"] == "device.detected" and n["text"].startswith("this machine: nvidia-smi: CUDA0 NVIDIA GeForce RTX 4090")
               for n in doc["notes"])


@pytest.mark.parametrize("body, needle", [
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.' >&2\nexit 9\n",
     "nvidia-smi failed (NVIDIA-SMI has failed"),
    (f"cat <<'EOF'\n{GB10}EOF\n", "nvidia-smi printed something kvbook cannot read"),
    ("printf '\\377\\376 binary garbage'\n", "nvidia-smi printed something kvbook cannot read"),
    ("exec sleep 30\n", "nvidia-smi did not answer (TimeoutExpired)"),
])
def test_a_broken_nvidia_smi_falls_back_to_the_cpu_with_a_note(tmp_path, monkeypatch, body, needle) -> None:
    """Stand-in for hardware this machine lacks: stub nvidia-smi scripts that fail, print garbage or hang."""
    monkeypatch.setattr(oh, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    device = this_machine(_stub(tmp_path, body), platform="linux")
    assert [p.kind for p in device.pools] == ["host"] and needle in device.notes and "CPU only" in device.notes


def test_macos_is_metal_and_ram_estimated_low_like_older_macos(monkeypatch) -> None:
    """Stand-in for a Mac: the platform is given and hw.memsize replaced. The estimate reproduces the older macOS's
    recommendedMaxWorkingSetSize (2/3 of 32 GiB = 21845.33 MiB, PR #2011; 3/4 of 64 GiB = 49152 MiB, #1870), a lower
    bound of the current presets' (25559 and 53084 MiB); RAM is physical less the 8 GiB macOS may keep."""
    for preset, ram, older in (("m1-max-32", 32 * GiB, 21845.33 * MiB), ("m1-max-64", 64 * GiB, 49152 * MiB)):
        assert abs(metal_working_set_estimate(ram) - older) < MiB
        assert metal_working_set_estimate(ram) < load_device(preset).pools[0].budget_bytes
    monkeypatch.setattr(oh, "_mac_ram_bytes", lambda *a: 64 * GiB)
    device = this_machine({}, platform="darwin")
    assert device.unified and [(p.name, p.kind, p.budget_bytes) for p in device.pools] == [
        ("Metal", "gpu", 48 * GiB), ("RAM", "host", 56 * GiB)]
    assert "estimate" in device.notes


def test_metal_cannot_take_rpc_devices() -> None:
    with pytest.raises(BadInput, match="RPC devices beside unified memory"):
        dv.with_rpc(load_device("m1-max-64"), ("127.0.0.1:50052",))


def test_a_draft_over_two_gpus_is_refused_unless_one_is_kept(capsys, gemma3, smollm2) -> None:
    cmd = ["plan", "--device", "2x-rtx-3090", "--", "llama-server", "-m", str(gemma3), "-md", str(smollm2), "-c", "4096"]
    assert cli.main(cmd) == 2
    assert "-md with several GPUs (CUDA0, CUDA1)" in capsys.readouterr().err
    assert cli.main([*cmd, "-dev", "CUDA1"]) == 0  # the draft inherits -dev (common_base_params_to_speculative)
    capsys.readouterr()


def test_host_gib_sets_a_presets_host(capsys) -> None:
    doc = plan_json(capsys, "--device", "2x-rtx-3090", "--host-gib", "64", *QWEN)
    assert doc["devices"][2]["budget_bytes"] == 64 * GiB
    assert [d["budget_bytes"] for d in plan_json(capsys, "--device", "rtx-4090-host-64", *QWEN)["devices"]] == [
        FREE_4090, 64 * GiB]
