"""`--lora FILE` / `--lora-scaled FILE:SCALE`: the adapters' buffers (src/llama-adapter.cpp: every lora_a and
lora_b tensor, norm vectors skipped) are planned next to the weights, and equal what the real llama-server
logs ("LoRA buffer size"). The adapters are synthetic (kvbook.testing.synthetic.write_synthetic_lora: the
bundled models' own tensor shapes, zero data): no LoRA for the bundled models is on the registries."""

from __future__ import annotations

import json

import pytest
from gguf import GGMLQuantizationType as T

from kvbook import cli
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.testing.synthetic import write_synthetic_lora

CASES = [
    ("smollm2", [dict(rank=5, weight_type=T.F32)], "--lora"),
    ("smollm2", [dict(rank=8, targets=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")),
                 dict(rank=16, targets=("ffn_gate",))], "--lora"),
    ("smollm2", [dict(rank=4), dict(rank=2, targets=("attn_k",))], "--lora-scaled"),
    ("gemma3", [dict(rank=8, targets=("attn_q", "attn_v", "ffn_down"))], "--lora"),
]


@pytest.mark.parametrize("model, adapters, flag", CASES, ids=[f"{m} {len(a)} x {f}" for m, a, f in CASES])
def test_the_adapters_are_what_the_server_allocates(request, tmp_path, model, adapters, flag) -> None:
    base = request.getfixturevalue(model)
    files = [str(write_synthetic_lora(base, tmp_path / f"lora{i}.gguf", **kw)) for i, kw in enumerate(adapters)]
    value = ",".join(f"{f}:0.5" for f in files) if flag == "--lora-scaled" else ",".join(files)
    args = ["-m", str(base), flag, value, "-c", "2048", "-np", "1", "-t", "1", "--no-warmup"]
    with start_llama_server(args, run_dir=tmp_path) as server:
        logged = server.measured()
        plan = server.plan
    assert plan is not None and plan.memory.lora_bytes > 0 and logged.lora_mib > 0
    rows = compare_memory(plan.memory, logged)
    assert not [r for r in rows if r.matches is False], rows
    assert any(r.item == "LoRA MiB" and r.matches for r in rows)


def test_the_plan_counts_them_and_refuses_a_mismatch(capsys, tmp_path, smollm2, gemma3) -> None:
    lora = str(write_synthetic_lora(smollm2, tmp_path / "smol-lora.gguf"))
    base = ["plan", "--json", "--", "llama-server", "-m", str(smollm2), "-c", "2048", "-np", "1"]
    assert cli.main(base) == 0
    alone = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--lora", lora, "--lora", lora]) == 0  # repeated flags add up, as in arg.cpp
    doc = json.loads(capsys.readouterr().out)
    assert doc["start_bytes"] - alone["start_bytes"] == doc["devices"][0]["weights_bytes"] - alone["devices"][0][
        "weights_bytes"] > 0
    code = cli.main(["plan", "--", "llama-server", "-m", str(gemma3), "--lora", lora])
    _, err = capsys.readouterr()
    assert code == 2 and "an adapter for 'llama', the model is 'gemma3'" in err
    code = cli.main(["plan", "--", "llama-server", "-m", str(smollm2), "--lora", str(smollm2)])
    _, err = capsys.readouterr()
    assert code == 2 and "not a LoRA adapter GGUF" in err and len(err.strip().splitlines()) == 1
