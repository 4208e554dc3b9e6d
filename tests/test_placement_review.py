"""Issue #14 review: placement flags as a user types them, each defect found pinned by a test.

llama.cpp's rules are quoted from the pinned source (src/llama-model.cpp load_tensors, src/llama.cpp
llama_prepare_model_devices, common/arg.cpp, ggml-backend-reg.cpp ggml_backend_dev_by_name). Pure planning: no
server is started.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest

from kvbook import cli
from kvbook.ops.host import detect_host
from kvbook.plan.devices import load_device
from kvbook.plan.summary import _size

SCHEMA = json.loads(resources.files("kvbook").joinpath("data/plan.schema.json").read_text())
PARTS = ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes", "host_extras_bytes")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, device: list[str], *server: str, solve: bool = False) -> dict:
    code, out, err = run(capsys, "plan", "--json", *(["--solve"] if solve else []), *device, "--", "llama-server",
                         *server)
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMA)
    need = {d["name"]: d["need_bytes"] for d in doc["devices"]}
    for d in doc["devices"]:  # a row's need is its parts, plus the rows it covers (Apple's RAM limit covers MTL0's)
        assert d["need_bytes"] == sum(d[k] for k in PARTS) + sum(need[n] for n in d["includes"]), d
    return doc


def one_line(capsys, device: list[str], *server: str) -> str:
    code, out, err = run(capsys, "plan", *device, "--", "llama-server", *server)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rows(doc: dict) -> list[tuple]:
    return [(d["name"], *(d[k] for k in PARTS)) for d in doc["devices"]]


# ---------------------------------------------------------------- -ts

@pytest.mark.parametrize("device, extra", [
    (["--device", "rtx-4090"], ()),  # one local GPU
    (["--device", "rtx-4090"], ("-ngl", "10")),  # one GPU, partial offload (the per-layer path)
    (["--device", "2x-rtx-3090"], ("-sm", "none", "-mg", "1")),  # two GPUs, one in use
    (["--device", "2x-rtx-3090"], ("-dev", "none")),  # no offload device
    (["--budget-gib", "8"], ()),  # CPU only
    (["--device", "m1-max-64"], ()),  # unified memory: Metal's one device
])
def test_ts_with_one_offload_device_or_none_is_a_no_op_with_a_note(capsys, smollm2, device, extra) -> None:
    """llama.cpp splits layers over its devices only: with one (or none) every offloaded layer goes to it, so -ts
    changes nothing (load_tensors copies the first n_devices shares); it was refused ('-ts on one local GPU or none')."""
    plain = plan_json(capsys, device, "-m", str(smollm2), *extra)
    split = plan_json(capsys, device, "-m", str(smollm2), *extra, "-ts", "1")
    assert rows(split) == rows(plain) and split["placement"] == plain["placement"]
    assert any(n["code"] == "split.no-effect" and n["text"].startswith("-ts 1 changes nothing") for n in split["notes"]), split["notes"]
    solved = plan_json(capsys, device, "-m", str(smollm2), *extra, "-ts", "1", "-c", "4096", solve=True)
    assert solved["solver"]["placements"], solved["solver"]["rejected"][:3]


def test_ts_for_two_gpus_with_one_in_use_is_a_no_op(capsys, smollm2) -> None:
    """`-sm none -ts 1,1` on two GPUs: -ts names the machine's devices, one is used; the solver refused every
    placement ('-ts has 2 entries but the plan has 1 offload devices') while the plan took it."""
    device, line = ["--device", "2x-rtx-3090"], ("-m", str(smollm2), "-sm", "none", "-c", "4096")
    assert rows(plan_json(capsys, device, *line, "-ts", "1,1")) == rows(plan_json(capsys, device, *line))
    assert plan_json(capsys, device, *line, "-ts", "1,1", solve=True)["solver"]["placements"]


def test_ts_with_fewer_entries_than_devices_pads_with_zeros(capsys, gemma3) -> None:
    """arg.cpp sets the shares past the list to 0: `-ts 1` on two GPUs puts every layer on CUDA0 (it was refused
    as '-ts has 1 entries but the plan has 2 devices')."""
    one = plan_json(capsys, ["--device", "2x-rtx-3090"], "-m", str(gemma3), "-ts", "1")
    both = plan_json(capsys, ["--device", "2x-rtx-3090"], "-m", str(gemma3), "-ts", "1,0")
    assert rows(one) == rows(both)
    assert one["placement"]["layers"] == [{"device": "CUDA0", "first": 0, "last": 17}]
    assert one["placement"]["output"] == "CUDA0"
    assert plan_json(capsys, ["--device", "2x-rtx-3090"], "-m", str(gemma3), "-ts", "1", "-c", "4096",
                     solve=True)["solver"]["placements"]


@pytest.mark.parametrize("device, extra, needle", [
    (["--device", "2x-rtx-3090"], ("-ts", "1,1,1"), "-ts has 3 entries but the plan has 2 devices (CUDA0, CUDA1)"),
    (["--device", "rtx-4090"], ("-ts", "1,1"), "-ts has 2 entries but the plan has 1 device (CUDA0)"),
    (["--device", "m1-max-64"], ("-ts", "1,1"), "-ts has 2 entries but the plan has 1 device (MTL0)"),
    (["--budget-gib", "8"], ("-ts", ",".join(["1"] * 16)), "got 16 input configs, but system only has 16 devices"),
])
def test_ts_with_more_entries_than_devices_is_one_line(capsys, smollm2, device, extra, needle) -> None:
    assert needle in one_line(capsys, device, "-m", str(smollm2), *extra)


# ---------------------------------------------------------------- -dev, -sm none, -mg

def test_dev_names_are_case_insensitive_as_llama_cpp_reads_them(capsys, gemma3) -> None:
    """ggml_backend_dev_by_name compares with striequals: `-dev cuda1` is CUDA1 (it was 'invalid device')."""
    upper = plan_json(capsys, ["--device", "2x-rtx-3090"], "-m", str(gemma3), "-dev", "CUDA1")
    lower = plan_json(capsys, ["--device", "2x-rtx-3090"], "-m", str(gemma3), "-dev", "cuda1")
    assert rows(lower) == rows(upper) and [d["name"] for d in lower["devices"]] == ["CUDA1", "CPU"]


def test_a_device_named_twice_is_one_line(capsys, gemma3) -> None:
    """`-dev CUDA0,CUDA0` listed CUDA0 twice and counted its KV twice; now one line."""
    assert "cuda0 is named twice" in one_line(capsys, ["--device", "2x-rtx-3090"], "-m", str(gemma3), "-dev",
                                              "CUDA0,cuda0")


def test_metal_is_llama_cpps_mtl0(capsys, gemma3) -> None:
    """On unified memory llama.cpp has one device, MTL0: `-dev MTL0` is the default, `-dev Metal` and
    `-sm none -mg 1` are refused as llama-server refuses them (both were taken or refused the other way)."""
    plain = plan_json(capsys, ["--device", "m1-max-64"], "-m", str(gemma3))
    assert rows(plan_json(capsys, ["--device", "m1-max-64"], "-m", str(gemma3), "-dev", "mtl0")) == rows(plain)
    assert rows(plan_json(capsys, ["--device", "m1-max-64"], "-m", str(gemma3), "-sm", "none")) == rows(plain)
    assert "Metal's device is MTL0" in one_line(capsys, ["--device", "m1-max-64"], "-m", str(gemma3), "-dev", "Metal")
    assert "invalid value for main_gpu: 1 (available devices: 1)" in one_line(
        capsys, ["--device", "m1-max-64"], "-m", str(gemma3), "-sm", "none", "-mg", "1")


# ---------------------------------------------------------------- --cpu-moe on a dense model

@pytest.mark.parametrize("flag", [("--cpu-moe",), ("--n-cpu-moe", "4"), ("-ot", "exps=CPU")])
def test_cpu_moe_on_a_dense_model_is_a_no_op_with_a_note(capsys, smollm2, flag) -> None:
    """llama-server accepts --cpu-moe on a dense model (its overrides match no tensor); it was refused."""
    plain = plan_json(capsys, ["--device", "rtx-4090"], "-m", str(smollm2), "-ngl", "0")
    moe = plan_json(capsys, ["--device", "rtx-4090"], "-m", str(smollm2), "-ngl", "0", *flag)
    assert rows(moe) == rows(plain)
    assert any(n["code"] == "moe.no-experts" and "has no experts, so nothing moves" in n["text"] for n in moe["notes"])
    full = plan_json(capsys, ["--device", "rtx-4090"], "-m", str(smollm2), *flag)
    assert rows(full) == rows(plan_json(capsys, ["--device", "rtx-4090"], "-m", str(smollm2)))


# ---------------------------------------------------------------- numbers that add up

def _mib(text: str) -> float:
    number, unit = text.split()
    return float(number) * (1024 if unit == "GiB" else 1)


def _text(capsys, device: list[str], *server: str) -> str:
    code, out, err = run(capsys, "plan", *device, "--", "llama-server", *server)
    assert code == 0, err
    return out


@pytest.mark.parametrize("device, model, extra", [
    (["--device", "2x-rtx-3090"], "qwen3.6-35b-a3b", ("-c", "65536", "-ngl", "99", "-fa", "on")),
    (["--device", "rtx-4090"], "qwen3.6-35b-a3b", ("-c", "65536", "-ngl", "99", "--n-cpu-moe", "20", "-fa", "on")),
    (["--device", "rpc-2-hosts"], "gemma3", ("-ngl", "all", "--rpc", "192.168.1.11:50052,192.168.1.12:50052")),
    (["--device", "rtx-4090"], "smollm2", ("-ngl", "10")),
    (["--device", "rtx-4090"], "smollm2", ()),
])
def test_the_printed_totals_are_what_the_device_rows_hold(capsys, gemma3, smollm2, device, model, extra) -> None:
    """The top compute line showed the single-device estimate (131.62 MiB) while each of CUDA0, CUDA1 and the CPU
    held a 424 MiB bound, and 'total' (38.09 GiB) was not the rows' sum (39.21 GiB); the rows left out output and
    host growth. Now compute, at start and total are the rows' sums, each row lists every part it holds."""
    path = {"gemma3": str(gemma3), "smollm2": str(smollm2)}.get(model, model)
    out = _text(capsys, device, "-m", path, *extra)
    doc = plan_json(capsys, device, "-m", path, *extra)
    printed = lambda label: re.search(rf"^  {label} +([\d.]+ [MG]iB)", out, re.M)[1]  # noqa: E731
    assert printed("total") == _size(sum(d["need_bytes"] for d in doc["devices"])).strip()
    assert printed("compute") == _size(sum(d["compute_bytes"] for d in doc["devices"])).strip()
    lines = [_mib(x) for x in re.findall(r"^  (?:weights|KV cache|SWA cache|recurrent|weight copies|compute|output) +"
                                         r"([\d.]+ [MG]iB)", out, re.M)]
    start = _mib(printed("at start"))
    assert sum(lines) == pytest.approx(start, abs=0.01 * len(lines) * (1024 if start > 1024 else 1))
    if len(doc["devices"]) > 1:
        host = next(d for d in doc["devices"] if d["name"] == "CPU")
        assert (", host growth" in out) == (host["host_extras_bytes"] > 0) and ", output" in out


def test_estimated_layer_sizes_add_up_to_the_weights(capsys, tmp_path) -> None:
    """A model known by its shapes (a config.json) has per-layer sizes estimated from them; the rounding lost a few
    bytes per group, so the devices' weights did not add up to the model's."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
                               "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                               "max_position_embeddings": 40960, "vocab_size": 151936, "intermediate_size": 6144,
                               "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}))
    doc = plan_json(capsys, ["--device", "2x-rtx-3090"], "-m", str(cfg), "-c", "8192", "-ngl", "99")
    assert sum(d["weights_bytes"] for d in doc["devices"]) == doc["weights_bytes"]
    doc = plan_json(capsys, ["--device", "rtx-4090-host-64"], "-m", str(cfg), "-c", "32768", "--cpu-moe")
    assert sum(d["weights_bytes"] for d in doc["devices"]) == doc["weights_bytes"]


# ---------------------------------------------------------------- -sm row

@pytest.mark.parametrize("device, extra, needle", [
    (["--device", "2x-rtx-3090"], (), "-sm row: device CUDA0 does not support split buffers"),
    (["--device", "2x-rtx-3090"], ("-dev", "CUDA1"), "-sm row: device CUDA1 does not support split buffers"),
    (["--device", "m1-max-64"], (), "-sm row: device MTL0 does not support split buffers"),
    (["--device-budget", "SYCL0=16GiB,SYCL1=16GiB"], (), "-sm row changes memory (weights split by rows across SYCL"),
])
def test_sm_row_is_refused_as_this_build_refuses_it(capsys, gemma3, device, extra, needle) -> None:
    """The pinned build's CUDA, Vulkan and Metal backends register no split buffer type (only SYCL and Hexagon
    do), so make_gpu_buft_list throws 'device X does not support split buffers'; kvbook said it 'changes memory'."""
    assert needle in one_line(capsys, device, "-m", str(gemma3), "-sm", "row", *extra)


@pytest.mark.parametrize("device, extra", [(["--budget-gib", "8"], ()), (["--device", "rtx-4090"], ("-dev", "none"))])
def test_sm_row_with_no_device_in_use_changes_nothing(capsys, gemma3, device, extra) -> None:
    """No offload device (CPU only, or -dev none): no buffer list asks for split buffers; it was refused."""
    plain = plan_json(capsys, device, "-m", str(gemma3), *extra)
    assert rows(plan_json(capsys, device, "-m", str(gemma3), "-sm", "row", *extra)) == rows(plain)


# ---------------------------------------------------------------- an unreachable RPC host at launch

@pytest.mark.parametrize("endpoint", ["127.0.0.1:1", "rpc-a.invalid:50052"])
def test_an_unreachable_rpc_host_fails_at_launch_in_one_line(tmp_path, smollm2, endpoint) -> None:
    """The plan uses the declared budgets (tests/test_rpc_placement.py); at launch llama-server itself aborted with
    'Failed to connect to ...' and a gdb backtrace, which kvbook passed on as a many-line error."""
    from kvbook.errors import ServerError
    from kvbook.ops.llama_server import start_llama_server

    with pytest.raises(ServerError) as caught:
        start_llama_server(["llama-server", "-m", str(smollm2), "-c", "2048", "-ngl", "all", "--rpc", endpoint],
                           run_dir=tmp_path, binary=tmp_path / "never-run", device=load_device("rtx-4090", detect_host()))
    message = str(caught.value)
    assert message.startswith(f"--rpc {endpoint}: cannot connect") and "\n" not in message
    assert not list(tmp_path.glob("*.log"))  # nothing was started


# ---------------------------------------------------------------- placement: where the experts sit

@pytest.mark.parametrize("extra, experts", [
    (("--n-cpu-moe", "20"), [{"device": "CPU", "first": 0, "last": 19}, {"device": "CUDA0", "first": 20, "last": 39}]),
    (("--cpu-moe",), [{"device": "CPU", "first": 0, "last": 39}]),
    (("-ot", r"blk\.[0-4]\.ffn_.*_exps=CPU"), [{"device": "CPU", "first": 0, "last": 4},
                                               {"device": "CUDA0", "first": 5, "last": 39}]),
    ((), [{"device": "CUDA0", "first": 0, "last": 39}]),
])
def test_placement_says_where_the_experts_sit(capsys, extra, experts) -> None:
    """Deliver 3 asks which tensor groups sit where; `placement` said every layer was on CUDA0 while --n-cpu-moe 20
    kept the experts of layers 0-19 in host RAM."""
    device = ["--device", "rtx-4090"]
    doc = plan_json(capsys, device, "-m", "qwen3.6-35b-a3b", "-c", "8192", "-ngl", "99", *extra)
    assert doc["placement"]["experts"] == experts and doc["placement"]["layers"] == [
        {"device": "CUDA0", "first": 0, "last": 39}]
    text = _text(capsys, device, "-m", "qwen3.6-35b-a3b", "-c", "8192", "-ngl", "99", *extra)
    assert ("  experts: " in text) == (len(experts) > 1 or experts[0]["device"] == "CPU")


def test_a_dense_model_has_no_expert_placement(capsys, smollm2) -> None:
    assert plan_json(capsys, ["--device", "rtx-4090"], "-m", str(smollm2))["placement"]["experts"] == []


def test_all_zero_shares_are_the_default_split(capsys) -> None:
    """load_tensors treats -ts 0,0 as no split given (by free memory); it was refused."""
    base = ["-m", "qwen3.6-35b-a3b", "-c", "8192", "-ngl", "all"]
    assert rows(plan_json(capsys, ["--device", "2x-rtx-3090"], *base, "-ts", "0,0")) == rows(
        plan_json(capsys, ["--device", "2x-rtx-3090"], *base))


def test_a_custom_gpu_is_cuda0(capsys) -> None:
    """--gpu-gib's GPU carries llama.cpp's name for the common case, so -dev CUDA0 works on it."""
    doc = plan_json(capsys, ["--gpu-gib", "24", "--host-gib", "64"], "-m", "qwen3.6-35b-a3b", "-c", "8192", "-dev", "CUDA0")
    assert [d["name"] for d in doc["devices"]] == ["CUDA0", "CPU"]


def test_a_model_bigger_than_the_gpu_gets_the_solvers_placement_as_an_alternative(capsys) -> None:
    """The issue's first complaint: gpt-oss-120b on an RTX 4090 + 64 GB without -ngl was 'does not fit, no
    alternatives' where llama-server's --fit starts it with experts on the CPU. With --fit on (the default) the
    plan is of fit's own choice (tests/test_fit_predict.py); with --fit off the solver's placement is offered."""
    fitted = plan_json(capsys, ["--device", "rtx-4090-host-64"], "-m", "gpt-oss-120b", "-c", "32768")
    assert fitted["verdict"] != "does not fit" and fitted["fit"]["status"] == "adjusted"
    doc = plan_json(capsys, ["--device", "rtx-4090-host-64"], "-m", "gpt-oss-120b", "-c", "32768", "--fit", "off")
    assert doc["verdict"] == "does not fit"
    placement = [a for a in doc["alternatives"] if a["change"].startswith("placement")]
    # it starts; within --fit's 1 GiB margin of the free memory after the CUDA context it is "tight" (the solver
    # fills the card to its budget, not to the margin)
    assert len(placement) == 1 and placement[0]["verdict"] in ("fits", "tight")
    assert "--n-cpu-moe" in placement[0]["change"]
    again = plan_json(capsys, ["--device", "rtx-4090-host-64"], *placement[0]["flags"])
    assert again["verdict"] == placement[0]["verdict"] and any(r["device"] == "CPU" for r in again["placement"]["experts"])
    small = plan_json(capsys, ["--gpu-gib", "24", "--host-gib", "16"], "-m", "gpt-oss-120b", "-c", "32768", "--fit", "off")
    assert not [a for a in small["alternatives"] if a["change"].startswith("placement")]
    assert any(n["code"] == "solve.no-placement" for n in small["notes"])
