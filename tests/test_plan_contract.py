"""`kvbook plan` for scripts: every --json output validates against the shipped JSON Schema, --check gates on
the verdict, and the alternatives are real improvements that change one thing and keep the user's flags."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from kvbook import cli
from kvbook.memory.rules import plan_memory
from kvbook.memory.sweep import sweep
from kvbook.model.sources import load_model, preset_ids
from kvbook.plan.devices import custom_budget
from kvbook.plan.flags import parse_server_args
from kvbook.plan.planner import make_plan
from kvbook.plan.summary import SCHEMA_VERSION

SCHEMA = json.loads(resources.files("kvbook").joinpath("data/plan.schema.json").read_text())


def plan_json(capsys, *args: str) -> tuple[int, dict, str]:
    code = cli.main(["plan", "--json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


@pytest.mark.parametrize("preset", preset_ids())
@pytest.mark.parametrize("extra", [[], ["-c", "0", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
                                   ["-c", "8192", "-np", "1", "--swa-full", "--jinja", "--port", "9000"]])
def test_every_json_plan_validates_against_the_schema(capsys, preset, extra) -> None:
    for where in (["--budget-gib", "24"], ["--device", "rtx-4090"], ["--budget-gib", "4000"]):
        code, doc, _ = plan_json(capsys, *where, "--", "llama-server", "-m", preset, *extra)
        assert code == 0
        jsonschema.Draft202012Validator(SCHEMA).validate(doc)
        assert doc["schema_version"] == SCHEMA_VERSION == SCHEMA["properties"]["schema_version"]["const"]


def test_the_bundled_ggufs_validate_too(capsys, smollm2, gemma3) -> None:
    for model in (smollm2, gemma3):
        _, doc, _ = plan_json(capsys, "--", "llama-server", "-m", str(model), "-c", "20000", "-np", "3")
        jsonschema.Draft202012Validator(SCHEMA).validate(doc)


def test_the_extra_models_and_hub_sources_validate_too(capsys, monkeypatch, tmp_path, smollm2, gemma3) -> None:
    """A draft, a projector, LoRA adapters, a preset and -hf (a loopback hub stands in for huggingface.co,
    unreachable here) in one schema-checked JSON each, on a unified and a discrete device."""
    from kvbook.testing.hub import LoopbackHub
    from kvbook.testing.synthetic import ProjectorShape, write_synthetic_lora, write_synthetic_projector

    mm = write_synthetic_projector(ProjectorShape(), tmp_path / "mmproj-F32.gguf")
    lora = write_synthetic_lora(smollm2, tmp_path / "lora.gguf")
    lines = [["-m", str(smollm2), "-md", str(smollm2), "--mmproj", str(mm), "--lora", str(lora), "-c", "4096"],
             ["-m", str(gemma3), "-md", str(gemma3), "-c", "8192", "-np", "2", "-ctkd", "q8_0", "-ctvd", "q8_0"],
             ["--gpt-oss-20b-default", "-c", "8192"], ["-hf", "kv/smol-GGUF", "-np", "1"]]
    repos = {"ggml-org/gpt-oss-20b-GGUF": {"gpt-oss-20b-mxfp4.gguf": smollm2},
             "kv/smol-GGUF": {"smol-Q4_1.gguf": smollm2, mm.name: mm}}
    with LoopbackHub(repos) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        for where in (["--budget-gib", "24"], ["--device", "rtx-4090-host-64"]):
            for line in lines:
                code, doc, err = plan_json(capsys, *where, "--", "llama-server", *line)
                assert code == 0, err
                jsonschema.Draft202012Validator(SCHEMA).validate(doc)
                assert (doc["draft"] is not None) == ("-md" in line)
                assert (doc["projector"] is not None) == ("--mmproj" in line or "-hf" in line)


def test_the_schema_rejects_what_it_should(capsys) -> None:
    _, doc, _ = plan_json(capsys, "--", "llama-server", "-m", "llama-3.1-8b", "-c", "4096")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for broken in ({**doc, "verdict": "maybe"}, {**doc, "kv_bytes": -1}, {**doc, "surprise": 1},
                   {k: v for k, v in doc.items() if k != "caches"}, {**doc, "schema_version": SCHEMA_VERSION + 1},
                   {**doc, "projector": {"source": "x"}}):
        assert list(validator.iter_errors(broken)), broken


@pytest.mark.parametrize("budget, verdict, code", [("40", "fits", 0), ("27", "tight", 1), ("10", "does not fit", 1)])
def test_check_gates_on_the_verdict(capsys, budget, verdict, code) -> None:
    args = ["plan", "--check", "--budget-gib", budget, "--", "llama-server", "-m", "llama-3.1-8b", "-c", "131072", "-np", "1"]
    assert cli.main(args) == code
    out, err = capsys.readouterr()
    assert f"verdict  {verdict.upper()}" in out
    assert (err.strip() == f"kvbook plan --check: the plan is '{verdict}' on custom budget {budget} GiB"
            if code else err == ""), err


def test_alternatives_improve_change_one_thing_and_keep_the_users_flags() -> None:
    arch = load_model("llama-3.1-8b")
    flags = parse_server_args(["llama-server", "-m", "llama-3.1-8b", "-c", "131072", "-np", "1", "--jinja",
                               "--port", "9000", "-n", "512"])
    for budget in (27, 17):  # tight, does not fit
        plan = make_plan(arch, flags, custom_budget(budget))
        assert plan.alternatives, budget
        for alt in plan.alternatives:
            assert {"--jinja", "--port", "9000", "-n", "512"} <= set(alt.flags), alt
            assert ["fits", "tight", "does not fit"].index(alt.verdict.value) < \
                   ["fits", "tight", "does not fit"].index(plan.verdict.value), alt
            if alt.change.startswith("shorter context"):
                assert alt.n_ctx < plan.memory.shape.n_ctx, alt
            else:
                assert alt.n_ctx == plan.memory.shape.n_ctx, alt  # a cache type or slot change keeps -c


def test_swa_full_makes_no_checkpoints_on_a_sliding_window_model() -> None:
    """server-context.cpp: checkpoints need seq_rm RS/FULL or n_swa > 0, and --swa-full sets n_swa to 0."""
    gemma = load_model("gemma-3-27b")
    with_window = plan_memory(gemma, parse_server_args(["-m", "x", "-c", "32768", "-np", "1"]))
    full = plan_memory(gemma, parse_server_args(["-m", "x", "-c", "32768", "-np", "1", "--swa-full"]))
    assert with_window.host_extras.checkpoint_bytes > 0 and full.host_extras.checkpoint_bytes == 0
    hybrid = load_model("qwen3.6-35b-a3b")  # recurrent state cannot be rolled back: checkpoints stay
    assert plan_memory(hybrid, parse_server_args(["-m", "x", "-c", "32768", "--swa-full"])).host_extras.checkpoint_bytes > 0
    res = sweep(gemma, [32768], ("f16",), (1,), swa_full=True)
    assert int(res.host_extras_bytes[0, 0, 0]) == full.host_extras.bytes


def test_compute_error_is_stated_only_where_it_was_measured(capsys) -> None:
    """The CPU coefficient is fitted on CPU runs: a CUDA or Metal plan does not claim its error; it uses its
    backend's own model from public logs and says so (kvbook.memory.backends)."""
    rows = {}
    for device in ("this-machine", "rtx-4090", "m1-max-64"):
        _, doc, _ = plan_json(capsys, "--device", device, "--", "llama-server", "-m", "llama-3.1-8b", "-c", "8192")
        rows[device] = (doc["compute_backend"], doc["compute_calibrated"], doc["compute_error_pct"])
    assert rows["this-machine"][:2] == ("CPU", True) and rows["this-machine"][2] > 0
    assert rows["rtx-4090"] == ("CUDA", False, None) and rows["m1-max-64"] == ("Metal", False, None)
    _, doc, _ = plan_json(capsys, "--device", "rtx-4090", "--", "llama-server", "-m", "llama-3.1-8b", "-ngl", "0")
    assert doc["compute_backend"] == "CPU"  # nothing offloaded: the CPU backend computes
    cli.main(["plan", "--device", "rtx-4090", "--", "llama-server", "-m", "llama-3.1-8b", "-c", "8192"])
    out = capsys.readouterr().out
    assert "high end of each backend's interval over public logs" in out and "CUDA: fitted on" in out


def test_the_plan_lists_every_flag_it_read_and_what_it_changes(capsys, monkeypatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_N_PARALLEL", "2")
    _, doc, _ = plan_json(capsys, "--", "llama-server", "-m", "llama-3.1-8b", "-c", "8192", "--jinja", "-ctk", "q8_0",
                          "-fa", "on", "--port", "9000")
    read = [(r["flag"], r["source"], r["changes"]) for r in doc["flags_read"]]
    assert read[0] == ("LLAMA_ARG_N_PARALLEL=2", "environment", "slots: context per slot, caches, logits")
    assert ("-c 8192", "command line", "context size: every cache") in read
    assert ("--jinja", "command line", "nothing: does not change memory") in read
    assert ("-ctk q8_0", "command line", "K cache bytes") in read
    assert len(read) == 7 and doc["n_seq"] == 2


def test_a_discrete_custom_gpu_has_its_own_pools(capsys) -> None:
    _, doc, _ = plan_json(capsys, "--gpu-gib", "24", "--host-gib", "64", "--", "llama-server", "-m", "llama-3.1-8b",
                          "-c", "32768")
    assert [p["pool"] for p in doc["pools"]] == ["CUDA0", "Host"] and doc["compute_calibrated"] is False
    assert cli.main(["plan", "--host-gib", "64", "--", "llama-server", "-m", "llama-3.1-8b"]) == 2
    assert "--host-gib goes with --gpu-gib" in capsys.readouterr().err
