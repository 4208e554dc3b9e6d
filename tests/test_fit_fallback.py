"""A GGUF of an architecture kvbook has no rule for is planned with llama.cpp's own accounting
(llama-fit-params on the file), labelled, and what it predicts is what the real llama-server allocates."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from kvbook import cli
from kvbook.model.arch import RULES, UnknownArchitecture
from kvbook.model.sources import load_model
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.testing.synthetic import write_synthetic_gguf

UNKNOWN = "internlm2"  # an architecture llama.cpp loads and kvbook has no rule for
MODEL = {"general.architecture": UNKNOWN, **{f"{UNKNOWN}.{k}": v for k, v in {
    "context_length": 32768, "embedding_length": 512, "block_count": 4, "feed_forward_length": 1024,
    "attention.head_count": 8, "attention.head_count_kv": 2, "rope.dimension_count": 64,
    "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, "vocab_size": 1000}.items()}}


@pytest.fixture(scope="module")
def unknown(tmp_path_factory) -> Path:
    assert UNKNOWN not in RULES, f"{UNKNOWN} gained a kvbook rule: pick another architecture for this test"
    return write_synthetic_gguf(MODEL, tmp_path_factory.mktemp(UNKNOWN) / f"{UNKNOWN}.gguf")


def test_kvbook_alone_refuses_it_by_name(unknown) -> None:
    with pytest.raises(UnknownArchitecture, match=f"architecture '{UNKNOWN}' is not modelled by kvbook"):
        load_model(str(unknown))


def test_plan_uses_llama_cpps_accounting_and_says_so(capsys, unknown) -> None:
    assert cli.main(["plan", "--json", "--", "llama-server", "-m", str(unknown), "-c", "8192", "-np", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator(json.loads(resources.files("kvbook").joinpath("data/plan.schema.json")
                                               .read_text())).validate(doc)
    assert doc["accounting"] == "llama-fit-params" and doc["arch"] == UNKNOWN
    assert [(c["kind"], c["cells"], c["layers"]) for c in doc["caches"]] == [("kv", 4096, 4)]
    assert doc["max_ctx"] == 0 and doc["alternatives"] == []
    assert any(n["code"] == "accounting.llama-fit-params" and "has no kvbook rule" in n["text"] and "llama-fit-params" in n["text"]
               for n in doc["notes"])


@pytest.mark.parametrize("args", [["-c", "8192", "-np", "2"], ["-c", "8192"], ["-c", "4096", "-np", "1", "-ctk", "q8_0",
                                                                             "-ctv", "q8_0", "-fa", "on"]])
def test_what_it_predicts_is_what_the_server_allocates(unknown, tmp_path, args) -> None:
    """Separate slots, the server's default (4 unified slots, which llama-fit-params cannot run) and a
    quantized cache: every logged cache and the compute buffer equal the plan's, to the printed MiB."""
    with start_llama_server(["-m", str(unknown), *args, "--no-warmup"], run_dir=tmp_path) as server:
        logged = server.measured()
        plan = server.plan
    assert plan is not None and plan.accounting == "llama-fit-params"
    rows = {r.item: r for r in compare_memory(plan.memory, logged)}
    for item, row in rows.items():
        if item == "weights MiB":
            continue  # repacked weights leave the mapped buffer (CPU_REPACK); the plan holds the tensor sizes
        if item == "compute MiB":
            assert row.planned == row.measured, row
        else:
            assert row.matches, row
    assert any(item.startswith("kv cache MiB") for item in rows)


@pytest.mark.parametrize("args", [["-c", "8192"], ["-c", "8192", "-np", "3"], ["-c", "16384", "-np", "2", "-kvu"],
                                  ["-c", "4096", "--swa-full"]])
def test_the_server_differences_are_corrected_on_a_known_sliding_window_model(gemma3, args) -> None:
    """On Gemma 3 (kvbook's rules are exact there) llama.cpp's accounting, corrected for unified slots and
    their shared sliding window, gives the same caches."""
    from kvbook.memory.rules import plan_memory
    from kvbook.model.arch import generic_arch
    from kvbook.model.ggufio import read_local
    from kvbook.ops.fit_params import memory_from_fit
    from kvbook.plan.flags import parse_server_args

    header = read_local(gemma3)
    arch = load_model(str(gemma3))
    generic = generic_arch(header.metadata, name="g", source=str(gemma3), weights_bytes=arch.weights_bytes,
                           weights_note="", n_vocab=arch.n_vocab)
    flags = parse_server_args(["-m", str(gemma3), *args])
    fit = memory_from_fit(gemma3, flags, generic)
    assert fit.caches == plan_memory(arch, flags).caches
