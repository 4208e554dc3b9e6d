"""The placement map (issue 21 item 3): every tensor (or tensor group, for a model known by its shapes) on its
device and buffer type, computed once per plan by planner.placement_map; the plan's per-device weights,
CPU_REPACK, layer, output and expert pools are read from it. Pure plans, no server."""

from __future__ import annotations

import pytest

from kvbook.model.sources import load_model
from kvbook.interface import GiB, Host
from kvbook.plan.devices import effective_device, load_device
from kvbook.plan.flags import parse_server_args
from kvbook.plan.placement import CPU, MAPPED
from kvbook.plan.planner import make_plan, placement_map
from kvbook.plan.weights import REPACK, X86_AVX2, weight_bytes


def _plan(model: str, device_id: str, *args: str):
    flags = parse_server_args(["llama-server", "-m", model, *args], {})
    device = effective_device(load_device(device_id, Host(platform="linux", ram_bytes=64 * GiB, cpu=X86_AVX2)), flags)
    arch = load_model(model)
    return arch, placement_map(arch, flags, device), make_plan(arch, flags, device, search=False)


@pytest.mark.parametrize("device_id, args", [
    ("rtx-4090-host-64", ("-c", "8192", "-ngl", "10", "--no-host")),  # spread: CUDA0 and the CPU, repacked
    ("2x-rtx-3090", ("-c", "8192", "-ngl", "99")),  # spread over two GPUs
    ("m1-max-32", ("-c", "8192", "-ngl", "0")),  # Apple's two limits, every layer on the CPU
])
def test_a_gguf_map_places_every_tensor_and_the_plan_reads_it(gemma3, device_id, args) -> None:
    arch, where, plan = _plan(str(gemma3), device_id, *args)
    names = [t.name for t in where.tensors if not t.output]
    assert sorted(names) == sorted(t.name for t in arch.tensors)  # every GGUF tensor, once
    assert weight_bytes(where.tensors, where.offload.devices) == where.weights  # the weights are its sums
    for t in where.tensors:
        assert (t.buffer in (MAPPED, REPACK, CPU)) == (t.device == CPU), t
    assert (plan.layers_on, plan.output_on, plan.experts_on) == (where.layers_on, where.output_on, where.experts_on)
    host = next(u for u in plan.pools if u.pool == where.host)
    assert host.repack_bytes == where.weights.repack == sum(t.nbytes for t in where.tensors if t.buffer == REPACK)
    for u in plan.pools:
        if u.pool in where.offload.devices and where.mode == "spread":
            assert u.weights_bytes == sum(t.nbytes for t in where.tensors if t.device == u.pool), u.pool
    if device_id == "rtx-4090-host-64":
        assert where.mode == "spread" and where.weights.repack > 0 and plan.compute_backend == "CPU"


def test_a_preset_map_places_its_tensor_groups() -> None:
    """A model known by its shapes (a preset without a tensor listing): the map holds its tensor groups, the
    first layers on the CPU under a partial -ngl, and the offload device's weights are the groups' sums."""
    arch, where, plan = _plan("gemma3-270m", "rtx-3090", "-c", "8192", "-ngl", "10")
    assert not arch.tensors and where.mode == "spread"
    first = arch.n_layer + 1 - 10  # the last 10 of the n_layer + 1 layers are offloaded
    assert {t.name for t in where.tensors} == {"token_embd", "output", *(f"L{il}" for il in range(arch.n_layer))}
    on_cpu = {t.name for t in where.tensors if t.device == CPU}
    assert on_cpu == {"token_embd", *(f"L{il}" for il in range(first))}
    assert all(t.buffer == MAPPED for t in where.tensors if t.device == CPU)
    (gpu,) = where.offload.devices
    assert where.weights.by_device[gpu] == sum(t.nbytes for t in where.tensors if t.device == gpu)
    assert plan.layers_on == (where.host,) * first + (gpu,) * (arch.n_layer - first) and plan.output_on == gpu
