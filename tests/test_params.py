"""Every preset loads, names its id after its file, and cites a source for every number."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvbook.model.sources import load_model
from kvbook.paths import params_dir
from kvbook.ops.host import detect_host
from kvbook.plan.devices import device_ids, load_device

MODELS = sorted((params_dir() / "models").glob("*.yaml"))
DEVICES = sorted((params_dir() / "devices").glob("*.yaml"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_model_preset(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert doc["id"] == path.stem
    missing = [k for k in doc["metadata"] if k not in doc.get("sources", {})]
    assert not missing, f"uncited keys: {missing}"
    assert doc["weights"].get("source")
    arch = load_model(path.stem)
    assert arch.n_layer > 0 and arch.weights_bytes > 0
    # exact only from a tensor listing that reproduces the file (test_preset_tensors.py checks each against its log)
    listed = path.with_name(path.stem + ".tensors.tsv").is_file()
    assert arch.weights_exact == (listed and doc["weights"].get("exact", True))


@pytest.mark.parametrize("path", DEVICES, ids=lambda p: p.stem)
def test_device_preset(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert doc["id"] == path.stem
    for key in ("budget_mib", "bandwidth_gbps"):
        assert key in doc.get("sources", {}), f"{key} not cited"
    device = load_device(path.stem, detect_host())
    assert all(p.budget_bytes > 0 for p in device.pools)
    assert all(p.budget_bytes <= p.total_bytes for p in device.pools)


def test_ids_unique_and_listed():
    ids = device_ids()
    assert len(ids) == len(set(ids)) and "this-machine" in ids and "m1-max-64" in ids


def test_bundled_presets_match_real_files(smollm2, gemma3):
    from kvbook.model.sources import load_gguf

    for name, path in (("smollm2-135m", smollm2), ("gemma3-270m", gemma3)):
        preset, real = load_model(name), load_gguf(path)
        for field in ("n_layer", "n_embd", "n_vocab", "n_head_kv", "head_k", "head_v", "is_swa", "n_swa", "n_ctx_train"):
            assert getattr(preset, field) == getattr(real, field), (name, field)
        assert preset.weights_bytes == path.stat().st_size


def test_committed_notebooks_are_what_the_builder_writes():
    """notebooks/*.ipynb come from tools/build_notebooks.py; an edit made only in Jupyter is caught here."""
    import runpy

    import nbformat

    from kvbook.paths import repo_root

    builder = runpy.run_path(str(repo_root() / "tools" / "build_notebooks.py"))
    built = {"01-sizing": builder["SIZING"], "02-serve-and-smoke": builder["SMOKE"], "03-compare": builder["COMPARE"],
             "04-claude-code": builder["CLAUDE_CODE"], "05-capacity": builder["CAPACITY"]}
    on_disk = sorted(p.stem for p in (repo_root() / "notebooks").glob("*.ipynb"))
    assert on_disk == sorted(built)
    for name, nb in built.items():
        committed = nbformat.read(str(repo_root() / "notebooks" / f"{name}.ipynb"), as_version=4)
        assert nbformat.writes(nb) == nbformat.writes(committed), f"{name}: run tools/build_notebooks.py"
