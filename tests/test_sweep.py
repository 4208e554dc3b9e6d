"""The vectorised sweep gives the same numbers as the scalar memory model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvbook.memory.rules import plan_memory
from kvbook.memory.sweep import largest_fitting_ctx, sweep
from kvbook.model.sources import load_model
from kvbook.plan.flags import parse_server_args

PRESETS = ["llama-3.1-8b", "qwen3.6-35b-a3b", "gemma-3-27b", "gpt-oss-20b", "deepseek-v3", "qwen3-next-80b-a3b"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("flash", [True, False])
def test_sweep_matches_scalar(preset, unified, flash):
    arch = load_model(preset)
    ctxs = [0, 1000, 4096, 20000, 65536, 131072]
    types = ["f16", "q8_0", "q4_0"] if flash else ["f16", "f32"]
    if arch.is_mla:
        types = [t for t in types]
    slots = [-1, 1, 3, 4]
    res = sweep(arch, ctxs, types, slots, unified=unified, flash_attn=flash, ubatch=512)
    for (i, c), (j, t), (k, s) in itertools.product(enumerate(ctxs), enumerate(types), enumerate(slots)):
        args = ["-m", preset, "-c", str(c), "-np", str(s), "-ctk", t, "-ctv", t, "-fa", "on" if flash else "off"]
        if unified:
            args.append("-kvu")
        mem = plan_memory(arch, parse_server_args(args))
        where = f"{preset} {' '.join(args)}"
        assert res.n_ctx_seq[i, j, k] == mem.shape.n_ctx_seq, where
        assert res.kv_bytes[i, j, k] == mem.kv_bytes, where
        assert res.recurrent_bytes[i, j, k] == mem.recurrent_bytes, where
        assert abs(int(res.compute_bytes[i, j, k]) - mem.compute.bytes) <= 1, where
        assert res.output_bytes[i, j, k] == mem.output_bytes, where
        assert res.host_extras_bytes[i, j, k] == mem.host_extras.bytes, where


def test_largest_fitting_ctx_is_monotone_in_budget():
    arch = load_model("llama-3.1-8b")
    ctxs = np.arange(256, 131073, 256)
    res = sweep(arch, ctxs, ("f16", "q8_0", "q4_0"), (1,))
    small = largest_fitting_ctx(res, 8 * 2**30)
    large = largest_fitting_ctx(res, 16 * 2**30)
    assert (large >= small).all()
    # quantizing the cache never lowers the largest fitting context
    assert small[0, 0] <= small[1, 0] <= small[2, 0]
    assert 0 < small[0, 0] < 131072
