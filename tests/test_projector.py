"""`--mmproj FILE` (and the projector `-hf` fetches): the projector's weights are exact (its tensors) and its
compute buffer is an estimate, both checked against a real llama-server load of SmolLM2 with a projector.

The projectors are synthetic idefics3 (SmolVLM-style) towers written by kvbook.testing.synthetic: no small
real projector is on the package registries this project can install from (a real SmolVLM mmproj is ~100 MB
on the Hugging Face hub, unreachable here). The compute formula was fitted to these towers' figures, so
for them it matches; for real projectors it is labelled an estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.testing.hub import LoopbackHub
from kvbook.testing.synthetic import ProjectorShape, projector_tensors, write_synthetic_projector

SHAPES = {  # n_embd, n_ff, n_layer, n_head, image_size, patch_size, scale_factor (projection_dim: SmolLM2's 576)
    "16 patches": ProjectorShape(64, 128, 2, 4, 64, 16, 2),
    "256 patches": ProjectorShape(768, 3072, 2, 12, 224, 14, 4),
    "576 patches": ProjectorShape(256, 1024, 2, 8, 384, 16, 4),
    "1024 patches": ProjectorShape(384, 1536, 2, 6, 512, 16, 4),
}


@pytest.fixture(scope="module")
def projectors(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mmproj")
    return {name: write_synthetic_projector(shape, folder / f"mmproj-{name.split()[0]}-F32.gguf")
            for name, shape in SHAPES.items()}


@pytest.mark.parametrize("fa", ["on", "off", "auto"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_the_projector_is_what_the_server_allocates(tmp_path, smollm2, projectors, name, fa) -> None:
    args = ["-m", str(smollm2), "--mmproj", str(projectors[name]), "-c", "1024", "-np", "1", "-fa", fa, "-t", "1"]
    with start_llama_server(args, run_dir=tmp_path) as server:  # with warm-up: the projector reserves at start
        logged = server.measured()
        plan = server.plan
    assert plan is not None and plan.memory.projector is not None
    rows = {r.item: r for r in compare_memory(plan.memory, logged)}
    assert logged.projector_model_mib is not None and rows["projector weights MiB"].matches, rows["projector weights MiB"]
    compute = rows["projector compute MiB"]
    assert compute.measured and compute.planned == compute.measured, compute
    # everything else the server logs is still exact
    assert not [r for item, r in rows.items() if r.matches is False], rows


def test_the_plan_places_and_labels_it(capsys, smollm2, projectors) -> None:
    # -ngl 99 plans the model without a projector per tensor (token_embd on the CPU) but with one as one GPU pool
    # (the per-tensor plan does not place a projector yet), so the two would differ by more than the projector;
    # 30 of SmolLM2's 31 layers takes the per-layer plan both times
    NGL = "30"
    mm = str(projectors["256 patches"])
    docs = []
    for extra in ([], ["--no-mmproj-offload"]):
        assert cli.main(["plan", "--json", "--device", "rtx-4090-host-64", "--", "llama-server", "-m", str(smollm2),
                         "--mmproj", mm, "-ngl", NGL, *extra]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    gpu, cpu = docs
    assert gpu["projector"]["device"] != "CPU" and cpu["projector"]["device"] == "CPU"
    assert gpu["projector"]["weights_bytes"] == sum(4 * math.prod(ne) for _, ne in projector_tensors(SHAPES["256 patches"]))
    assert "estimate" in gpu["projector"]["compute_note"]
    extra = gpu["projector"]["weights_bytes"] + gpu["projector"]["compute_bytes"]
    assert cli.main(["plan", "--json", "--device", "rtx-4090-host-64", "--", "llama-server", "-m", str(smollm2),
                     "-ngl", NGL]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["projector"] is None and gpu["start_bytes"] - plain["start_bytes"] == extra


def test_hf_brings_the_repos_projector_unless_told_not_to(capsys, monkeypatch, smollm2, projectors) -> None:
    """The loopback hub stands in for huggingface.co (unreachable here)."""
    mm = projectors["16 patches"]
    with LoopbackHub({"kv/smolvlm-GGUF": {"smol-Q4_1.gguf": smollm2, mm.name: mm}}) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        for extra, want in (([], mm.name), (["--no-mmproj"], None)):
            assert cli.main(["plan", "--json", "--", "llama-server", "-hf", "kv/smolvlm-GGUF", "-c", "2048", *extra]) == 0
            doc = json.loads(capsys.readouterr().out)
            got = doc["projector"]["source"].rsplit("/", 1)[-1] if doc["projector"] else None
            assert got == want


def test_a_file_that_is_not_a_projector_is_one_line(capsys, smollm2) -> None:
    code = cli.main(["plan", "--", "llama-server", "-m", str(smollm2), "--mmproj", str(smollm2)])
    _, err = capsys.readouterr()
    assert code == 2 and "not a projector GGUF" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BadInput, match="warm-up image size"):
        from kvbook.plan.flags import parse_server_args

        parse_server_args(["-m", "x.gguf", "--image-max-tokens", "256"])


GEMMA3_SHAPES = {  # gemma3 towers (average pooling, then a projection into Gemma 3 270M's 640 dims)
    "gemma3 256 patches": ProjectorShape(256, 1024, 2, 8, 224, 14, 4, 640, "gemma3"),
    "gemma3 1024 patches": ProjectorShape(384, 1536, 2, 6, 448, 14, 4, 640, "gemma3"),
}
# the estimate was not fitted to them; measured here: -39.2% / -22.7% (256 patches, flash attention on/off),
# 0.0% / -9.1% (1024 patches): docs/planning.md states "0 to 39% low" for gemma3 towers
MAX_LOW_PCT = 40.0


@pytest.mark.parametrize("fa", ["on", "off"])
@pytest.mark.parametrize("name", list(GEMMA3_SHAPES))
def test_on_a_tower_it_was_not_fitted_to_the_estimate_is_low_by_the_stated_error(tmp_path, gemma3, name, fa) -> None:
    """Weights stay exact; the compute estimate is up to 39% low on gemma3 towers (docs/planning.md says so)."""
    mm = write_synthetic_projector(GEMMA3_SHAPES[name], tmp_path / "mmproj-gemma3-F32.gguf")
    args = ["-m", str(gemma3), "--mmproj", str(mm), "-c", "1024", "-np", "1", "-fa", fa, "-t", "1"]
    with start_llama_server(args, run_dir=tmp_path) as server:
        logged = server.measured()
        plan = server.plan
    rows = {r.item: r for r in compare_memory(plan.memory, logged)}
    assert rows["projector weights MiB"].matches, rows["projector weights MiB"]
    error = rows["projector compute MiB"].error_pct
    assert error is not None and -MAX_LOW_PCT <= error <= 0.5, rows["projector compute MiB"]
