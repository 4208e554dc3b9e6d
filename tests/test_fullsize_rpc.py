"""Full-size synthetic GGUFs (Qwen3.6-35B-A3B, gpt-oss-120b, DeepSeek-V3; sparse files, realistic quant mixes)
over two loopback ggml-rpc-server devices: for each flag set llama-fit-params' per-device rows equal kvbook's
per-device plan for weights (every RPC device; the host's CPU and CPU_REPACK tensors together) and KV +
recurrent state, to the whole MiB it prints; each device's compute buffer is within the calibrated estimate's
stated error (data/compute_coefficients.json 'per_device')."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvbook.memory.compute import coefficients
from kvbook.ops.fit_devices import compare_devices
from kvbook.testing.fullsize import FULL_SIZE, write_full_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_fullsize_rpc import FLAG_SETS  # the benchmark's flag sets, one source

pytestmark = pytest.mark.slow


@pytest.fixture()
def endpoints(rpc_endpoints):
    return rpc_endpoints[:2]


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_every_device_matches_fit_params(tmp_path, endpoints, name) -> None:
    path = write_full_size(name, tmp_path)
    assert path.stat().st_blocks * 512 < 64 * 2**20 < path.stat().st_size  # sparse: headers only on disk
    assert abs(path.stat().st_size / FULL_SIZE[name].target_bytes - 1) < 0.02
    stated = coefficients()["per_device"]["fit_max_error_pct"]
    for flags in FLAG_SETS:
        case = compare_devices(path, endpoints, flags)
        assert case.log_complete, "llama-fit-params log came back short"
        assert [d.fit.name for d in case.devices] == ["RPC0", "RPC1", "Host"], flags
        for d in case.devices:
            where = (name, " ".join(flags), d.fit.name)
            assert d.weights_exact, (where, d.fit, d.weights_bytes / 2**20)
            assert d.context_exact, (where, d.fit, d.context_bytes / 2**20)
            if d.compute_error_pct is not None:
                assert abs(d.compute_error_pct) <= stated, (where, d.fit.compute_mib, d.compute_bytes / 2**20)
    path.unlink()
