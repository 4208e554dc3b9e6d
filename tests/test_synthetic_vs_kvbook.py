"""kvbook's prediction against llama-fit-params on synthetic full-size GGUFs of every preset:
the same caches (kind, cells, layers, K and V MiB) and recurrent state, exactly."""

from __future__ import annotations

import pytest
import yaml

from kvbook.memory.rules import plan_memory
from kvbook.model.sources import load_gguf
from kvbook.ops.fit_params import run_fit_params
from kvbook.ops.logparse import mib2
from kvbook.paths import params_dir
from kvbook.plan.flags import parse_server_args
from kvbook.testing.synthetic import write_synthetic_gguf

PRESETS = sorted(p.stem for p in (params_dir() / "models").glob("*.yaml"))
FLAGS = [
    ["-c", "4096"],
    ["-c", "65536", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
    ["-c", "20000", "-np", "3", "-ub", "256"],
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    cache = {}

    def get(preset: str):
        if preset not in cache:
            meta = yaml.safe_load((params_dir() / "models" / f"{preset}.yaml").read_text())["metadata"]
            cache[preset] = write_synthetic_gguf(meta, folder / f"{preset}.gguf")
        return cache[preset]

    return get


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f))
@pytest.mark.parametrize("preset", PRESETS)
def test_caches_match_fit_params(preset, flags, synthetic):
    path = synthetic(preset)
    ctx = int(flags[1])
    report = run_fit_params(path, ctx, flags[2:])
    assert report.log_complete, "llama-fit-params log came back short"
    # llama-fit-params sizes -np like llama-server with an explicit -np (default 1, not unified)
    args = ["-m", str(path), *flags] + ([] if "-np" in flags else ["-np", "1"])
    predicted = plan_memory(load_gguf(path), parse_server_args(args))
    assert report.n_ctx_seq == predicted.shape.n_ctx_seq
    attn = [c for c in predicted.caches if c.kind.value != "recurrent"]
    assert [(k.cells, k.layers) for k in report.kv_caches] == [(c.cells, c.layers) for c in attn]
    for seen, want in zip(report.kv_caches, attn):
        assert (seen.k_mib, seen.v_mib) == (mib2(want.k_bytes), mib2(want.v_bytes)), preset
    rec = [c for c in predicted.caches if c.kind.value == "recurrent"]
    assert len(report.recurrent) == len(rec)
    for seen, want in zip(report.recurrent, rec):
        assert (seen.k_mib, seen.v_mib) == (mib2(want.k_bytes), mib2(want.v_bytes))
