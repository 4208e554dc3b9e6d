"""One planner: every front end plans through kvbook.plan.api, and the planner itself is pure.

- The CLI, the sizing notebook's path (kvbook.notebook.sizing.resolve) and its command_line parameter give the same
  per-device plan for the same request, on every model preset x device preset pair (plans only, no server).
- The same request gives the same plan on any host: two simulated hosts (the detection inputs of kvbook.ops.host
  replaced: RAM, CPU features, nvidia-smi's GPUs; this machine cannot be two machines) give byte-identical JSON for
  a preset request, while the host-dependent devices (this machine, --budget-gib) do follow the host.
- The "Try other settings" panel plans with the run's placement flags (-ngl, --n-cpu-moe, -ts), so it agrees
  with the placement panel and with `kvbook plan`.
"""

from __future__ import annotations

import json
import shlex

import pytest

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.interface import CpuFeatures, DetectedGpu, GiB, ModelArch, ServerFlags
from kvbook.model.sources import preset_ids
from kvbook.notebook import sizing
from kvbook.ops import host as oh
from kvbook.plan import api
from kvbook.plan.devices import THIS_MACHINE, device_ids
from kvbook.plan.summary import plan_summary

MODELS = preset_ids()
DEVICES = [d for d in device_ids() if d != THIS_MACHINE and d != "rpc-2-hosts"]  # rpc-2-hosts needs --rpc


def cli_json(capsys, *args: str) -> dict:
    code = cli.main(["plan", "--json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_every_preset_pair_plans_the_same_in_the_notebook_and_the_cli(capsys) -> None:
    """The notebook's knobs and its command_line parameter build the request `kvbook plan` builds: the same JSON,
    device by device, on every model preset x device preset pair."""
    assert len(MODELS) >= 10 and len(DEVICES) >= 10
    host = oh.detect_host()
    for model in MODELS:
        for device in DEVICES:
            knobs = sizing.SizingParams(model=model, device=device, context=4096, slots=1)
            line = sizing.server_argv(knobs)
            expected = cli_json(capsys, "--device", device, "--", *line)
            _, request = sizing.request_for(knobs, host)
            _, pasted = sizing.request_for(sizing.SizingParams(device=device, command_line=shlex.join(line)), host)
            assert pasted == request, (model, device)  # the same question, so the same plan (planned once here)
            assert plan_summary(api.plan(request)) == expected, (model, device)


def test_the_command_line_parameter_sets_the_knobs_and_refuses_a_contradiction() -> None:
    p, request = sizing.request_for(sizing.SizingParams(
        device="rtx-4090-host-64", command_line="llama-server -m gpt-oss-120b -c 32768 -np 1 --n-cpu-moe 24 -ctk q8_0"))
    assert (p.model, p.context, p.slots, p.n_cpu_moe, p.cache_type_k, p.cache_type_v) == (
        "gpt-oss-120b", 32768, 1, 24, "q8_0", "f16")
    assert request.flags.cpu_moe_layers == 24 and sizing.server_flags(p, request.model.n_ctx_train) == request.flags
    with pytest.raises(BadInput, match="parameter 'context' = 8192 and command_line's 32768 disagree"):
        sizing.request_for(sizing.SizingParams(context=8192, command_line="llama-server -m gpt-oss-120b -c 32768"))
    with pytest.raises(BadInput, match="parameter 'command_line'"):
        sizing.request_for(sizing.SizingParams(command_line="llama-server -m 'gpt-oss-120b"))


# ---------------------------------------------------------------- the same request on two hosts


HOSTS = {
    "x86 workstation, AVX-512, two GPUs, 512 GiB": dict(
        ram=512 * GiB, cpu=CpuFeatures("simulated EPYC", avx2=True, avx512=True),
        gpus=(DetectedGpu(0, "NVIDIA GeForce RTX 4090", 24564, 24000), DetectedGpu(1, "NVIDIA A100", 81920, 80000))),
    "arm laptop, NEON + dotprod + i8mm, no GPU, 16 GiB": dict(
        ram=16 * GiB, cpu=CpuFeatures("simulated Graviton", neon=True, dotprod=True, i8mm=True), gpus=()),
}


def _simulate(monkeypatch, name: str) -> None:
    """Simulation: kvbook.ops.host's detection inputs replaced (this machine cannot be two machines)."""
    h = HOSTS[name]
    monkeypatch.setattr(oh, "host_ram_bytes", lambda: h["ram"])
    monkeypatch.setattr(oh, "this_cpu", lambda: h["cpu"])
    monkeypatch.setattr(oh, "detect_nvidia", lambda env=None, timeout_s=None: (h["gpus"], ""))
    monkeypatch.setattr(oh.sys, "platform", "linux")


@pytest.mark.parametrize("device, extra", [
    ("rtx-4090-host-64", ["-ngl", "0", "--no-host"]),  # every weight on the CPU, repacked (no CUDA_Host first)
    ("m1-max-64", ["-ngl", "0"]),  # Metal has no host buffer type: the CPU's weights repack
    ("h100-80", ["-ngl", "10", "--no-host", "--host-gib", "96"]),  # a preset without a host pool, host given
])
def test_the_same_preset_request_plans_the_same_on_two_simulated_hosts(capsys, monkeypatch, gemma3, device,
                                                                        extra) -> None:
    host_gib = extra[extra.index("--host-gib"):] if "--host-gib" in extra else []
    server = [a for a in extra if a not in host_gib]
    args = ["--device", device, *host_gib, "--", "llama-server", "-m", str(gemma3), "-c", "8192", *server]
    docs = []
    for name in HOSTS:
        _simulate(monkeypatch, name)
        docs.append(cli_json(capsys, *args))
    assert json.dumps(docs[0], sort_keys=True) == json.dumps(docs[1], sort_keys=True)
    if device != "h100-80":  # CPU weights that repack: the CPU features the preset states decided them
        assert sum(d["repack_bytes"] for d in docs[0]["devices"]) > 0


def test_the_simulated_hosts_do_reach_host_dependent_devices(capsys, monkeypatch, gemma3) -> None:
    """The check above could fail: this machine and --budget-gib follow the host (GPUs, RAM, the CPU that repacks)."""
    line = ["--", "llama-server", "-m", str(gemma3), "-c", "8192"]
    seen = {}
    for name in HOSTS:
        _simulate(monkeypatch, name)
        seen[name] = (cli_json(capsys, *line), cli_json(capsys, "--budget-gib", "8", *line))
    (x86, x86_budget), (arm, arm_budget) = seen.values()
    assert [d["name"] for d in x86["devices"]] == ["CUDA0", "CUDA1", "CPU"]
    assert [d["name"] for d in arm["devices"]] == ["CPU"]
    assert x86_budget["devices"][0]["repack_bytes"] != arm_budget["devices"][0]["repack_bytes"]


# ---------------------------------------------------------------- the fit fallback is injected


def test_a_front_end_without_the_fallback_refuses_an_unknown_architecture_by_name() -> None:
    request = api.PlanRequest(model=_generic(), flags=ServerFlags(model="x.gguf"),
                              device=sizing.resolve_device("m1-max-64"), has_rule=False,
                              unknown="x.gguf: architecture 'foo' is not modelled by kvbook")
    with pytest.raises(BadInput, match="architecture 'foo' is not modelled by kvbook; this front end has no"):
        api.plan(request)
    with pytest.raises(BadInput, match="the solver needs kvbook's rules"):
        api.solve(request)


def _generic() -> ModelArch:
    """A stand-in generic shape (the request is built by hand: what matters is has_rule False)."""
    from kvbook.model.sources import load_model

    return load_model("smollm2-135m")


def test_a_preset_states_the_cpu_it_assumes(capsys, monkeypatch, tmp_path, gemma3) -> None:
    """cpu_features in a device preset decides what repacks (here an Arm host beside a CUDA GPU, against the
    family default AVX2); a wrong entry is refused by name."""
    import shutil

    from kvbook.paths import params_dir

    shutil.copytree(params_dir() / "devices", tmp_path / "devices")
    preset = (tmp_path / "devices" / "rtx-4090-host-64.yaml").read_text()
    (tmp_path / "devices" / "arm-4090.yaml").write_text(preset.replace("id: rtx-4090-host-64", "id: arm-4090")
                                                        + "cpu_features: [neon, dotprod]\n")
    (tmp_path / "devices" / "bad-4090.yaml").write_text(preset + "cpu_features: [sse9]\n")
    monkeypatch.setenv("KVBOOK_PARAMS", str(tmp_path))
    line = ["--", "llama-server", "-m", str(gemma3), "-c", "4096", "-ngl", "0", "--no-host"]
    x86, arm = (cli_json(capsys, "--device", d, *line) for d in ("rtx-4090-host-64", "arm-4090"))
    assert x86["devices"][-1]["repack_bytes"] != arm["devices"][-1]["repack_bytes"]
    assert any(n["code"] == "repack.host-copy" and "neon, dotprod, as the preset states" in n["text"] for n in arm["notes"])
    assert cli.main(["plan", "--device", "bad-4090", *line]) == 2
    assert "cpu_features must be a list of avx2, avx512, neon, dotprod, i8mm" in capsys.readouterr().err
