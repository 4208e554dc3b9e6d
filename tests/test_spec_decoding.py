"""`--spec-type draft-mtp`: the target's NextN weights, drafted outputs and recurrent rollback rows, and the MTP
context (a KV cache over the NextN layers, its logits and compute buffer), as memory/speculative.py models them.
Checked against the real pinned llama-server on tiny synthetic GGUFs with one MTP layer (a qwen35moe and a dense
qwen35): every exact figure the server logs at -lv 4 for both contexts equals the plan. EAGLE3 and DFlash
are in tests/test_spec_eagle.py and test_spec_dflash.py; DSpark is refused by name (pure checks, no server)."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.plan.flags import parse_server_args
from kvbook.testing.synthetic import TINY_HYBRID, TINY_MOE, tiny_metadata, write_synthetic_gguf

_MTP = {**TINY_HYBRID, "block_count": 9, "nextn_predict_layers": 1}  # 8 trunk layers + 1 MTP layer


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory) -> dict[str, str]:
    """A qwen35moe-style and a dense qwen35 model, each with one NextN/MTP layer."""
    folder = tmp_path_factory.mktemp("mtp")
    moe = tiny_metadata("qwen35moe", **_MTP, **TINY_MOE, expert_shared_feed_forward_length=128)
    return {"moe": str(write_synthetic_gguf(moe, folder / "moe.gguf")),
            "dense": str(write_synthetic_gguf(tiny_metadata("qwen35", **_MTP), folder / "dense.gguf"))}


CASES = [
    ("moe", ["-c", "4096", "-np", "2"]),  # defaults: 3 drafted tokens, f16 draft cache
    ("dense", ["-c", "8192", "--spec-draft-n-max", "2", "-ctkd", "q8_0", "-ctvd", "q8_0", "-fa", "on"]),
]


@pytest.mark.parametrize("model, args", CASES, ids=[f"{m} {' '.join(a)}" for m, a in CASES])
def test_the_mtp_context_is_what_the_server_allocates(mtp_models, tmp_path, model, args) -> None:
    path = mtp_models[model]
    with start_llama_server(["-m", path, "--spec-type", "draft-mtp", *args, "-t", "1", "--no-warmup"],
                            run_dir=tmp_path) as server:
        target, mtp = server.measured(), server.measured_draft()
        plan = server.plan
        log = server.log_path.read_text(errors="replace")
    assert plan is not None and plan.memory.draft is not None and mtp is not None
    assert "creating MTP draft context" in log
    for memory, logged in ((plan.memory, target), (plan.memory.draft, mtp)):
        rows = compare_memory(memory, logged)
        assert not [r for r in rows if r.matches is False], rows
    # the MTP context: one cache over the NextN layer, n_ctx_seq cells, the draft cache types; no weights of its own
    (cache,) = mtp.caches
    n_max = 2 if "--spec-draft-n-max" in args else 3
    assert (cache.layers, cache.cells) == (1, plan.memory.shape.n_ctx_seq)
    assert cache.k_type == ("q8_0" if "-ctkd" in args else "f16") and not mtp.model_mib
    # the target: n_max rollback rows per slot of recurrent state, and 1 + n_max outputs per slot
    recurrent = next(c for c in plan.memory.caches if c.kind.value == "recurrent")
    logged_rec = next(c for c in target.caches if c.kind == "recurrent")
    assert logged_rec.total_mib == round(recurrent.bytes / 2**20, 2)
    assert f"n_rs_seq              = {n_max}" in log
    assert plan.memory.shape.n_outputs_max == plan.memory.shape.n_seq * (1 + n_max)
    assert f"n_outputs_max         = {plan.memory.shape.n_outputs_max}" in log


def test_without_mtp_the_nextn_layer_is_not_loaded(mtp_models, tmp_path) -> None:
    """Without --spec-type draft-mtp llama.cpp skips the NextN layer's tensors (TENSOR_SKIP): the weights the server
    maps equal the plan's, which leaves that layer out (model/resolve.py loaded_weights)."""
    with start_llama_server(["-m", mtp_models["moe"], "-c", "4096", "-np", "2", "-t", "1", "--no-warmup"],
                            run_dir=tmp_path) as server:
        logged, plan = server.measured(), server.plan
        log = server.log_path.read_text(errors="replace")
    assert plan is not None and "model has unused tensor blk.8." in log
    rows = compare_memory(plan.memory, logged)
    assert rows and not [r for r in rows if r.matches is False], rows
    assert logged.model_mib["CPU_Mapped"] == 7.64  # 8.62 MiB with the NextN layer (test above: draft-mtp)


def test_mtp_adds_its_context_and_the_nextn_weights(capsys, mtp_models) -> None:
    base = ["plan", "--json", "--", "llama-server", "-m", mtp_models["moe"], "-c", "4096", "-np", "2"]
    assert cli.main(base) == 0
    alone = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--spec-type", "draft-mtp"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["draft"]["n_ctx"] == doc["n_ctx"] and [c["layers"] for c in doc["draft"]["caches"]] == [1]
    assert doc["recurrent_bytes"] == 4 * alone["recurrent_bytes"]  # 1 + 3 rows per slot
    assert any(f["flag"] == "--spec-type draft-mtp" for f in doc["flags_read"])
    jsonschema.validate(doc, json.loads(resources.files("kvbook").joinpath("data/plan.schema.json").read_text()))


def test_on_one_gpu_the_mtp_context_sits_with_the_layers(capsys, mtp_models) -> None:
    def devices(*extra: str) -> dict[str, dict]:
        assert cli.main(["plan", "--json", "--device", "rtx-4090-host-64", "--", "llama-server", "-m",
                         mtp_models["dense"], "-c", "4096", "-np", "1", *extra]) == 0
        return {d["kind"]: d for d in json.loads(capsys.readouterr().out)["devices"]}

    plain, gpu, host = devices(), devices("--spec-type", "draft-mtp"), devices("--spec-type", "draft-mtp", "-ngl", "0")
    mtp_kv = 4096 * 2 * 2 * 128 * 2  # cells x (K + V) x 2 KV heads x 128 x f16
    assert gpu["gpu"]["kv_bytes"] - plain["gpu"]["kv_bytes"] == mtp_kv
    assert host["host"]["kv_bytes"] == gpu["gpu"]["kv_bytes"] and host["gpu"]["kv_bytes"] == 0


@pytest.mark.parametrize("value, why", [
    ("draft-dspark", "DSpark"), ("ngram-mod,draft-dspark", "DSpark"),
])
def test_unmodelled_spec_types_are_refused_by_name(value, why) -> None:
    with pytest.raises(BadInput, match=rf"--spec-type {value.split(',')[-1]}: .*{why}.* does not model it yet"):
        parse_server_args(["-m", "x.gguf", "--spec-type", value])


def test_spec_type_values_read_as_llama_server_reads_them() -> None:
    assert parse_server_args(["-m", "x", "--spec-type", "draft-mtp", "--spec-type", "none"]).spec_types == ("draft-mtp",)
    assert parse_server_args(["-m", "x", "--spec-type", "none,ngram-mod"]).spec_types == ()
    with pytest.raises(BadInput, match="unknown speculative type 'mtp'"):
        parse_server_args(["-m", "x", "--spec-type", "mtp"])
    # --spec-default sets --spec-type ngram-mod (and its n-max 64) where it stands
    assert parse_server_args(["-m", "x", "--spec-default"]).spec_types == ("ngram-mod",)
    assert parse_server_args(["-m", "x", "--spec-default", "--spec-ngram-mod-n-max", "8"]).ngram_mod_n_max == 8


def test_mtp_without_an_mtp_layer_or_spread_is_one_line(capsys, mtp_models, smollm2) -> None:
    code = cli.main(["plan", "--", "llama-server", "-m", str(smollm2), "--spec-type", "draft-mtp"])
    _, err = capsys.readouterr()
    assert code == 2 and "no NextN/MTP layers" in err and len(err.strip().splitlines()) == 1
    code = cli.main(["plan", "--device", "rtx-4090-host-64", "--", "llama-server", "-m", mtp_models["moe"],
                     "--spec-type", "draft-mtp", "--cpu-moe"])
    _, err = capsys.readouterr()
    assert code == 2 and "spread over devices" in err and len(err.strip().splitlines()) == 1
