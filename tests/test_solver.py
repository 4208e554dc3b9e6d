"""The placement solver (kvbook plan --solve): every placement it ranks is exactly what the planner says for
its argv, none is beaten by a plain flag setting on the objective, the user's flags are kept, and every
option that does not start is listed with a reason."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from kvbook import cli
from kvbook.interface import GiB, Verdict
from kvbook.memory.rules import plan_memory
from kvbook.model.sources import load_model
from kvbook.ops.host import detect_host, this_machine
from kvbook.plan.devices import load_device, with_rpc
from kvbook.plan.flags import parse_server_args, replace
from kvbook.plan.placement import device_compute_bound
from kvbook.plan.planner import max_context, place, worst
from kvbook.plan.solver import host_read_bytes, solve

SCHEMA = json.loads(resources.files("kvbook").joinpath("data/plan.schema.json").read_text())
EPS = "127.0.0.1:50001,127.0.0.1:50002"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A small synthetic Qwen3-MoE GGUF (8 experts, 4 layers)."""
    from kvbook.testing.synthetic import TINY_MOE, tiny_metadata, write_synthetic_gguf

    return write_synthetic_gguf(tiny_metadata("qwen3moe", **TINY_MOE), tmp_path_factory.mktemp("moe") / "moe.gguf")


def _setup(path, budgets_gib, *args):
    flags = parse_server_args(["llama-server", "-m", str(path), "--rpc", EPS, *args])
    return load_model(str(path)), flags, with_rpc(this_machine(), flags.rpc, budgets_gib)


@pytest.mark.parametrize("objective", ["max-context", "fastest-decode"])
def test_each_ranked_placement_is_what_the_planner_says_for_its_argv(gemma3, objective) -> None:
    arch, flags, device = _setup(gemma3, (0.15, 0.25), "-np", "1")
    solution = solve(arch, flags, device, objective, top=8)
    assert len(solution.placements) == 8 and solution.fitting >= 8
    for p in solution.placements:
        again = parse_server_args(["llama-server", *p.argv])
        pools = place(arch, again, plan_memory(arch, again), device)
        assert pools == p.pools and worst(pools) is not Verdict.DOES_NOT_FIT
        assert again.ctx == p.n_ctx and "--fit" in p.argv
        assert host_read_bytes(arch, again, device) == p.host_read_bytes


def test_max_context_is_not_beaten_by_any_plain_ngl(gemma3) -> None:
    """No -ngl N with llama.cpp's own split (by free memory) starts a larger context than the solver's best."""
    arch, flags, device = _setup(gemma3, (0.15, 0.25), "-np", "1", "-fa", "on", "-ctk", "f16")
    best = solve(arch, flags, device, "max-context").placements[0]
    plain = [max_context(arch, replace(flags, gpu_layers=str(n)), device) for n in range(arch.n_layer + 2)]
    assert best.n_ctx >= max(plain) > 0


def test_fastest_decode_reads_least_from_host_ram(gemma3) -> None:
    """At a fixed -c, the top placement reads no more host bytes per token than any -ngl N that starts
    (with llama.cpp's split), and offloads more than the best of those when the budgets force a choice."""
    arch, flags, device = _setup(gemma3, (0.15, 0.25), "-np", "1", "-c", "4096")
    best = solve(arch, flags, device, "fastest-decode").placements[0]
    starting = []
    for n in range(arch.n_layer + 2):
        f = replace(flags, gpu_layers=str(n))
        if worst(place(arch, f, plan_memory(arch, f), device)) is not Verdict.DOES_NOT_FIT:
            starting.append(host_read_bytes(arch, f, device))
    assert best.n_ctx == 4096 and best.host_read_bytes <= min(starting)
    assert best.host_read_bytes < max(starting)


def test_the_users_flags_are_kept(gemma3) -> None:
    arch, flags, device = _setup(gemma3, (0.15, 0.25), "-np", "1", "-ngl", "10", "-ctk", "f16", "--port", "9999")
    solution = solve(arch, flags, device, "max-context", top=20)
    assert {"gpu_layers", "type_k", "parallel", "rpc"} <= set(solution.fixed)
    for p in solution.placements:
        assert p.n_gpu_layers == 10 and p.cache_type == "f16" and "q8_0" not in p.argv
        assert p.argv[p.argv.index("-ngl") + 1] == "10" and p.argv[p.argv.index("--port") + 1] == "9999"


def test_moe_experts_go_to_the_cpu_when_the_devices_are_small(moe) -> None:
    """With all layers needed on small devices, the solver keeps some layers' experts on the CPU
    (--n-cpu-moe), which llama.cpp's --fit does with -ot; a user's --cpu-moe is kept as given."""
    arch = load_model(str(moe))
    groups = dict(arch.tensor_groups)
    experts = sum(v for k, v in groups.items() if k.endswith(".exps"))
    _, flags, _ = _setup(moe, (1, 1), "-np", "1", "-c", "4096", "-ctk", "f16", "-ctv", "f16")
    probe = with_rpc(this_machine(), flags.rpc, (1, 1))
    memory = plan_memory(arch, replace(flags, gpu_layers="all"))
    one = place(arch, replace(flags, gpu_layers="all", tensor_split=(1.0, 0.0)), memory, probe)[1].need_bytes
    # every layer on one device needs `one`; spread over both, each device adds a compute buffer: budgets
    # that together lack room for half the experts either way
    tight = (one + device_compute_bound(arch, memory) - experts // 2) / 2 / GiB
    device = with_rpc(this_machine(), flags.rpc, (tight, tight))
    solution = solve(arch, flags, device, "fastest-decode")
    best = solution.placements[0]
    assert best.n_gpu_layers == arch.n_layer + 1 and best.n_cpu_moe != 0, best.argv
    assert any(r.option == "-ngl all" for r in solution.rejected)
    _, fixed, _ = _setup(moe, (tight, tight), "-np", "1", "-c", "4096", "--cpu-moe")
    assert all(p.n_cpu_moe == -1 for p in solve(arch, fixed, device, "fastest-decode").placements)


def test_local_gpu_and_host_presets_solve_without_a_gguf() -> None:
    """The issue's case: gpt-oss-120b on an RTX 4090 + 64 GB host starts with experts on the CPU."""
    arch = load_model("gpt-oss-120b")
    flags = parse_server_args(["llama-server", "-m", "gpt-oss-120b", "-np", "1", "-fa", "on"])
    best = solve(arch, flags, load_device("rtx-4090-host-64"), "max-context").placements[0]
    assert best.n_cpu_moe > 0 and best.n_ctx > 0
    assert all(u.verdict is not Verdict.DOES_NOT_FIT for u in best.pools)


def test_nothing_fits_lists_every_option_with_a_reason(capsys, gemma3) -> None:
    code = cli.main(["plan", "--solve", "--json", "--budget-gib", "0.05", "--", "llama-server", "-m", str(gemma3),
                     "-np", "1"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert code == 1 and "no placement starts" in err
    assert doc["solver"]["placements"] == [] and len(doc["solver"]["rejected"]) == doc["solver"]["searched"] > 0
    assert all("needs" in r["reason"] for r in doc["solver"]["rejected"])
    assert {r["code"] for r in doc["solver"]["rejected"]} <= {"rejected.does-not-start", "rejected.planner-check"}


@pytest.mark.parametrize("objective", ["max-context", "fastest-decode"])
def test_cli_json_validates_and_plans_the_best_placement(capsys, gemma3, objective) -> None:
    code = cli.main(["plan", "--solve", "--json", "--objective", objective, "--rpc-gib", "0.15,0.25", "--",
                     "llama-server", "-m", str(gemma3), "--rpc", EPS, "-np", "1"])
    doc = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    best = doc["solver"]["placements"][0]
    assert code == 0 and doc["llama_server_args"][1:] == best["llama_server_args"]
    assert [d["need_bytes"] for d in doc["devices"]] == [d["need_bytes"] for d in best["devices"]]
    assert doc["solver"]["objective"] == objective


@pytest.mark.parametrize("args, needle", [
    (["--objective", "fastest"], "invalid choice"),
    (["--top", "0"], "--top must be at least 1"),
])
def test_bad_solver_options_are_one_line(capsys, gemma3, args, needle) -> None:
    code = cli.main(["plan", "--solve", *args, "--", "llama-server", "-m", str(gemma3)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("model, device, args", [
    ("qwen3.6-35b-a3b", "rtx-4090-host-64", ["-np", "1", "-fa", "on"]),
    ("llama-3.1-8b", "rtx-4090", ["-np", "2", "-c", "65536"]),
    ("gpt-oss-20b", "m1-max-32", ["-np", "1"]),
])
@pytest.mark.parametrize("objective", ["max-context", "fastest-decode"])
def test_presets_placements_are_the_planners_too(model, device, args, objective) -> None:
    """Local GPU + host and unified presets (per-layer sizes estimated from the shapes)."""
    arch, dev = load_model(model), load_device(device, detect_host())
    flags = parse_server_args(["llama-server", "-m", model, *args])
    solution = solve(arch, flags, dev, objective, top=6)
    assert solution.placements and solution.fitting >= len(solution.placements)
    for p in solution.placements:
        again = parse_server_args(["llama-server", *p.argv])
        assert place(arch, again, plan_memory(arch, again), dev) == p.pools
        assert all(u.verdict is not Verdict.DOES_NOT_FIT for u in p.pools)
    keys = [(-p.n_ctx if objective == "max-context" else p.host_read_bytes) for p in solution.placements]
    assert keys == sorted(keys)


def test_user_tensor_overrides_stay_as_typed_in_every_placement(gemma3) -> None:
    """-ot is fixed: every ranked placement keeps it verbatim (tensors to the CPU and to the second RPC device)
    and is what the planner says for its argv, the pinned tensors included."""
    ot = r"attn_(q|output)\.=CPU,blk\.1\.=RPC0[127.0.0.1:50002]"
    arch, flags, device = _setup(gemma3, (0.15, 0.25), "-np", "1", "-ot", ot)
    solution = solve(arch, flags, device, "max-context", top=4)
    assert solution.placements
    for p in solution.placements:
        assert p.argv[p.argv.index("-ot") + 1] == ot and p.n_cpu_moe == 0
        again = parse_server_args(["llama-server", *p.argv])
        assert place(arch, again, plan_memory(arch, again), device) == p.pools
