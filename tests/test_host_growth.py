"""Host growth as the server has it: context checkpoints of one sequence's window per slot, the prompt cache's bytes
per cached token and per prompt, Apple's two limits, and host growth never on a GPU's budget. The last tests run the
pinned llama-server on loopback and compare its own checkpoint and cache log lines with the plan."""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.interface import GiB, Host, MiB, Verdict
from kvbook.load.serverlog import parse_host_growth
from kvbook.memory.rules import plan_memory, prompt_state_bytes, prompts_to_fill
from kvbook.model.sources import load_model
from kvbook.notebook import figures
from kvbook.ops.llama_server import start_llama_server
from kvbook.plan.devices import load_device, resolve_device
from kvbook.plan.flags import parse_server_args
from kvbook.plan.planner import make_plan
from kvbook.plan.weights import X86_AVX2

# one Gemma 3 270M checkpoint: 512 cells (n_swa) x (15 SWA layers x 1 KiB of K and V + 12 B of cell metadata)
# + headers; the server logs it as 7.506 MiB at -np 1 and at the 4-slot default (measured on the pinned build)
GEMMA3_CHECKPOINT_MIB = 7.506

# a fixed host (64 GiB, AVX2) for the presets that borrow the host RAM; no plan here reads this machine
HOST = Host(platform="linux", ram_bytes=64 * GiB, cpu=X86_AVX2)


def _plan(model: str, args: list[str], device: str):
    return make_plan(load_model(model), parse_server_args(["-m", model, *args]), load_device(device, HOST))


def test_a_checkpoint_is_one_sequences_window_whatever_the_slots(gemma3: Path) -> None:
    arch = load_model(str(gemma3))
    for args in (["-c", "32768", "-np", "1"], ["-c", "32768"], ["-c", "32768", "-np", "4"]):
        extras = plan_memory(arch, parse_server_args(["-m", str(gemma3), *args])).host_extras
        assert round(extras.checkpoint_each_bytes / MiB, 3) == GEMMA3_CHECKPOINT_MIB, args
        slots = 1 if "-np" in args and args[-1] == "1" else 4
        assert extras.checkpoints_max == 32 * slots
        assert extras.checkpoint_bytes == 32 * slots * extras.checkpoint_each_bytes
    short = plan_memory(arch, parse_server_args(["-m", str(gemma3), "-c", "256", "-np", "1"])).host_extras
    # a 256-token slot's window holds 256 cells, not 512: magic + seq id, the cache's headers, 15 layers x K/V headers
    assert short.checkpoint_each_bytes == 8 + 24 + 15 * 2 * 12 + 256 * (15 * 1024 + 12)
    none = plan_memory(arch, parse_server_args(["-m", str(gemma3), "-c", "32768", "-ctxcp", "0"])).host_extras
    assert none.checkpoint_bytes == 0 and none.checkpoints_max == 0


def test_gemma_3_27b_host_growth_is_the_prompt_cache_plus_32_windows() -> None:
    """-c 65536 -np 1 -ngl 99: 8 GiB of prompt cache + 32 x 416 MiB (1024 cells x 52 SWA layers x 8 KiB); at the
    server's defaults four slots keep 128 of them (60 GiB, not 242), and the shorter context offered is not -c 256."""
    plan = _plan("gemma-3-27b", ["-c", "65536", "-np", "1", "-ngl", "99"], "rtx-4090")
    h = plan.memory.host_extras
    assert h.checkpoint_each_bytes // MiB == 416 and h.checkpoints_max == 32
    assert h.bytes == pytest.approx(21 * GiB, rel=0.001)
    default = _plan("gemma-3-27b", [], "rtx-4090")
    assert default.memory.host_extras.bytes == pytest.approx(60 * GiB, rel=0.001)
    shorter = [a for a in default.alternatives if a.change.startswith("shorter context")]
    assert shorter and shorter[0].n_ctx > 32768, [a.change for a in default.alternatives]


def test_the_plan_states_how_much_traffic_fills_the_prompt_cache(capsys) -> None:
    plan = _plan("gemma-3-27b", ["-c", "65536", "-np", "1"], "m1-max-64")
    h = plan.memory.host_extras
    each = prompt_state_bytes(h, 4096)  # 4096 tokens x 81,932 B + the window + the 2 checkpoints it carries
    assert each == 4096 * h.cache_token_bytes + h.cache_prompt_bytes + 2 * h.checkpoint_each_bytes
    assert prompts_to_fill(h, 4096) == 8 * GiB // each == 5
    assert cli.main(["plan", "--device", "m1-max-64", "--", "llama-server", "-m", "gemma-3-27b", "-c", "65536",
                     "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert "full after about 5 distinct 4k-token prompts" in out and "32 checkpoints x 416.01 MiB" in out
    assert cli.main(["plan", "--json", "--device", "m1-max-64", "--", "llama-server", "-m", "smollm2-135m"]) == 0
    growth = json.loads(capsys.readouterr().out)["host_growth"]
    assert growth["cache_token_bytes"] == 30 * 2 * 3 * 64 * 2 + 12 and growth["checkpoints_max"] == 0  # dense: none


def test_apple_has_two_limits_and_the_verdict_agrees_with_the_largest_context() -> None:
    """Qwen3.5-27B at 262k on a 64 GB M1 Max: the Metal buffers fit the working set (53084 MiB), the prompt cache
    and checkpoints count against RAM only; the plan starts (tight in RAM) and says 262144 fits at start."""
    plan = _plan("qwen3.5-27b", ["-c", "262144"], "m1-max-64")
    metal, ram = plan.pools
    assert (metal.pool, metal.budget_bytes, ram.pool, ram.budget_bytes) == ("Metal", 53084 * MiB, "RAM", 56 * GiB)
    assert metal.host_extras_bytes == 0 and metal.verdict is Verdict.FITS
    # RAM holds everything: the memory plan, with the compute buffers as the Metal backend model places them (Metal's
    # own buffer on the working set, the CPU backend's beside it on RAM) instead of the one CPU-derived estimate
    compute = metal.compute_bytes + ram.compute_bytes
    assert ram.includes == ("Metal",) and ram.compute_bytes > 0
    assert ram.need_bytes == plan.memory.total_bytes - plan.memory.compute.bytes + compute > ram.budget_bytes
    assert ram.verdict is plan.verdict is Verdict.TIGHT and plan.max_ctx == 262144
    assert any(a.change.startswith(("smaller prompt cache", "fewer context checkpoints")) for a in plan.alternatives)
    # the post's own line on the same Mac: everything fits both limits
    post = _plan("qwen3.6-35b-a3b", ["-c", "262144", "-ub", "2048", "-b", "2048"], "m1-max-64")
    assert post.verdict is Verdict.FITS


def test_apple_compute_is_split_between_the_working_set_and_ram() -> None:
    """The Metal backend's two compute buffers as llama.cpp logs them on a Mac ("MTL0 compute buffer" and "CPU compute
    buffer", public corpus 001/008/053): the device's on the Metal pool (the working set), the CPU's on RAM only; each
    at its interval's high end, as the plan's compute note states them."""
    from kvbook.plan.planner import device_computes

    plan = _plan("gpt-oss-20b", ["-c", "32768", "-np", "1"], "m1-max-64")
    metal, ram = plan.pools
    computes = device_computes(plan.model, plan.flags, plan.memory, plan.device)
    assert computes is not None and set(computes) == {"Metal", "CPU"}
    assert metal.compute_bytes == computes["Metal"].high and ram.compute_bytes == computes["CPU"].high
    assert computes["CPU"].estimate > 0 and "Metal: fitted on" in computes["Metal"].note
    # -ngl 0 on a Mac: nothing runs on Metal, the CPU's one buffer is on RAM
    cpu_only = _plan("gpt-oss-20b", ["-c", "32768", "-np", "1", "-ngl", "0"], "m1-max-64")
    assert cpu_only.pools[0].compute_bytes == 0 and cpu_only.pools[1].compute_bytes == cpu_only.memory.compute.bytes


@pytest.mark.parametrize("device", ["m1-max-32", "m1-max-64", "m2-ultra-192", "m3-max-128", "m4-max-128"])
@pytest.mark.parametrize("model, ctx", [("qwen3.5-27b", 262144), ("gemma-3-27b", 131072), ("gpt-oss-120b", 131072),
                                        ("qwen3.6-35b-a3b", 262144)])
def test_verdict_and_largest_context_agree_on_every_apple_preset(device, model, ctx) -> None:
    plan = _plan(model, ["-c", str(ctx), "-np", "1"], device)
    starts = plan.verdict is not Verdict.DOES_NOT_FIT
    assert starts == (plan.max_ctx >= plan.memory.shape.n_ctx), (plan.verdict, plan.max_ctx)
    metal = next(u for u in plan.pools if u.pool == "Metal")
    assert metal.host_extras_bytes == 0 and metal.output_bytes == 0


def test_the_wired_limit_and_the_ram_limit_are_device_options() -> None:
    """sudo sysctl iogpu.wired_limit_mb=N makes recommendedMaxWorkingSetSize N MiB: --device-budget Metal=NMiB;
    CPU=SIZE sets the RAM limit; Metal with CPU and no preset also gives two limits."""
    raised = resolve_device(preset="m1-max-64", device_budgets=["Metal=60000MiB", "CPU=62GiB"])
    assert [(p.name, p.budget_bytes) for p in raised.pools] == [("Metal", 60000 * MiB), ("RAM", 62 * GiB)]
    plan = make_plan(load_model("qwen3.5-27b"), parse_server_args(["-m", "x", "-c", "262144"]), raised)
    assert plan.verdict is Verdict.FITS
    custom = resolve_device(device_budgets=["Metal=53084MiB,CPU=56GiB"])
    assert custom.unified and [p.kind for p in custom.pools] == ["gpu", "host"]


@pytest.mark.parametrize("device", ["rtx-4090", "2x-rtx-3090", "rtx-4090-host-64", "h100-80"])
@pytest.mark.parametrize("args", [[], ["-ngl", "20"], ["--n-cpu-moe", "10"], ["-c", "65536", "-np", "1"]])
def test_host_growth_is_never_on_a_discrete_gpu(device, args) -> None:
    plan = _plan("qwen3.6-35b-a3b", args, device)
    gpus = [u for u in plan.pools if any(p.name == u.pool and p.kind == "gpu" for p in plan.device.pools)]
    assert gpus and all(u.host_extras_bytes == 0 for u in gpus)
    host = next(u for u in plan.pools if u not in gpus)
    assert host.host_extras_bytes == plan.memory.host_extras.bytes > 0
    bar = figures.breakdown_figure(plan)
    assert next(t for t in bar.data if t.meta == "host_extras").y[0] == 0  # the GPU's bar carries none of it


def test_the_cuda_presets_budget_what_is_free_after_the_context() -> None:
    """nvidia-smi's total less 555 MiB (the CUDA context's high end, PR #20595 / #23604); the fit margin of
    1024 MiB makes a plan tight, as --fit would keep it free."""
    assert load_device("rtx-4090", HOST).pools[0].budget_bytes == (24564 - 555) * MiB
    assert load_device("h100-80", HOST).pools[0].budget_bytes == (81559 - 555) * MiB


# ---------------------------------------------------------------- the real server

def _complete(base_url: str, tokens: list[int]) -> None:
    body = json.dumps({"prompt": tokens, "n_predict": 1, "cache_prompt": True}).encode()
    req = urllib.request.Request(f"{base_url}/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200


# Prompt lengths kept short so the test stays quick on two shared cores (prefill ran at 23-27 tokens/s here under
# load): a Gemma prompt over n_swa + 4 + n_ubatch = 1028 tokens makes two full-window checkpoints, as a 4k one does.
# A run with 3000, 5000 and 3500 tokens logged 31.342, 37.224 and 32.813 MiB per cached prompt: the plan's figures.
@pytest.mark.parametrize("model, args, lengths", [
    ("gemma3", ["-c", "4096", "-np", "1"], (1100, 1400, 1200)),  # sliding window: checkpoints travel along
    ("smollm2", ["-c", "2048", "-np", "1"], (700, 1000, 800)),  # dense: bytes per token only
], ids=["gemma3-swa", "smollm2-dense"])
def test_the_real_servers_checkpoints_and_prompt_cache_match_the_plan(model, args, lengths, request, tmp_path) -> None:
    """Distinct prompts (random token ids, one token generated) on one slot: each new prompt moves the last one into
    the prompt cache. Every checkpoint the server logs and every cached prompt's size in its cache-update lines equal
    the plan's figures (the log prints MiB to three decimals)."""
    path = request.getfixturevalue(model)
    flags = parse_server_args(["-m", str(path), *args, "-t", "2", "--no-warmup"])
    extras = plan_memory(load_model(str(path)), flags).host_extras
    rng = random.Random(22)
    with start_llama_server(flags, run_dir=tmp_path, plan_first=False) as server:
        for n in lengths:
            _complete(server.base_url, [rng.randrange(1000, 40000) for _ in range(n)])
        log = parse_host_growth(server.log_path.read_text(errors="replace"))
    cached = log.cache_states[-1]
    assert len(cached) == len(lengths) - 1  # the slot keeps the last prompt; the others are in the cache
    for p in cached:
        assert p.checkpoints == extras.cache_prompt_checkpoints, p
        assert p.mib == pytest.approx(prompt_state_bytes(extras, p.n_tokens) / MiB, abs=0.0015), p
    assert log.cache_mib == pytest.approx(sum(prompt_state_bytes(extras, p.n_tokens) for p in cached) / MiB, abs=0.01)
    if extras.checkpoint_each_bytes:
        assert len(log.checkpoints) >= 2 * len(lengths)
        assert {mib for _, mib in log.checkpoints} == {round(extras.checkpoint_each_bytes / MiB, 3)}
    else:
        assert log.checkpoints == ()
    # the rate the plan states: the cap over what one such prompt costs
    assert prompts_to_fill(extras, 4096) == extras.cache_ram_bytes // prompt_state_bytes(extras, 4096)
