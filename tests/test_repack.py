"""llama.cpp's CPU_REPACK buffer and per-tensor weights placement (plan/weights.py), checked on real
llama-server loads at -lv 4: the CPU's mapped range (CPU_Mapped) and its repacked copies (CPU_REPACK) equal
kvbook's plan to the printed MiB, with and without -nr, on the bundled models and small synthetic GGUFs of
the types the repack rule treats differently (multi-device and -ot cases: tests/test_rpc_placement.py)."""

from __future__ import annotations

import json
import re

import pytest
from gguf import GGMLQuantizationType

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.interface import TensorInfo
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.logparse import mib2
from kvbook.plan.flags import parse_server_args
from kvbook.ops.host import this_cpu
from kvbook.plan.weights import APPLE_M, X86_AVX2, repacks

_META = {"general.architecture": "qwen3", **{f"qwen3.{k}": v for k, v in {
    "context_length": 4096, "embedding_length": 256, "attention.layer_norm_rms_epsilon": 1e-6,
    "rope.freq_base": 1000000.0, "vocab_size": 1000, "block_count": 2, "feed_forward_length": 512,
    "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
    "attention.value_length": 64}.items()}}


def _plan(capsys, argv: list[str]) -> dict:
    assert cli.main(["plan", "--json", "--", "llama-server", *argv]) == 0
    doc = json.loads(capsys.readouterr().out)
    (cpu,) = [d for d in doc["devices"] if d["name"] == "CPU"]
    return cpu


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Small dense GGUFs (tied output) by weight type; `odd` has 1001 tokens, so its tied output's rows do not
    divide by 8 and only the layers repack."""
    folder = tmp_path_factory.mktemp("repack")
    from kvbook.testing.synthetic import write_synthetic_gguf

    out = {t: write_synthetic_gguf(_META, folder / f"{t}.gguf", GGMLQuantizationType[t])
           for t in ("Q4_0", "Q2_K", "Q6_K", "IQ4_NL")}
    out["odd"] = write_synthetic_gguf({**_META, "qwen3.vocab_size": 1001}, folder / "odd.gguf",
                                      GGMLQuantizationType.Q4_0)
    return out


CASES = [  # (model: a bundled fixture or a synthetic type, extra flags); -ngl 0: this machine has no GPU
    ("gemma3", []),  # Q4_K attn_output / ffn_down repack (AVX2); Q5_0, Q6_K, Q8_0 do not
    ("gemma3", ["-nr"]),
    ("smollm2", []),  # Q4_1: no kernel, no CPU_REPACK buffer
    ("Q4_0", []),  # every weight and the tied output's copy
    ("Q4_0", ["--no-repack"]),
    ("Q2_K", []),  # an AVX-512 kernel: this machine has it
    ("Q6_K", []),  # a NEON-only kernel: not on x86
    ("IQ4_NL", []),
    ("odd", []),
    # no mmap: the CPU's tensors allocated one by one in a `CPU` buffer, repacked ones only in CPU_REPACK and the
    # tied output once (plan/weights.py), not the mapped range
    ("gemma3", ["-lm", "none"]),
    ("Q4_0", ["-lm", "none"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("model, flags", CASES, ids=[f"{m} {' '.join(f)}".strip() for m, f in CASES])
def test_cpu_mapped_and_cpu_repack_equal_the_log(request, synthetic, capsys, tmp_path, model, flags) -> None:
    path = synthetic[model] if model in synthetic else request.getfixturevalue(model)
    argv = ["-m", str(path), "-c", "512", "-np", "1", "--fit", "off", *flags]
    cpu = _plan(capsys, argv)
    with start_llama_server([*argv, "--no-warmup"], run_dir=tmp_path) as server:
        logged = server.measured()
        text = server.log_path.read_text(errors="replace")
    plain = "CPU" if "none" in flags else "CPU_Mapped"
    assert logged.model_mib.get(plain) == mib2(cpu["weights_bytes"] - cpu["repack_bytes"]), logged.model_mib
    assert logged.model_mib.get("CPU_REPACK", 0.0) == mib2(cpu["repack_bytes"]), logged.model_mib
    assert logged.weights_mib == round(mib2(cpu["weights_bytes"] - cpu["repack_bytes"]) + mib2(cpu["repack_bytes"]), 2)
    # the CPU features kvbook reads from /proc/cpuinfo are the ones the (native) build reports using
    info = re.search(r"system_info:.*", text)
    assert info and ("AVX2 = 1" in info[0]) == this_cpu().avx2 and ("AVX512 = 1" in info[0]) == this_cpu().avx512


def test_the_repack_rule_for_other_cpus() -> None:
    """A stand-in for CPUs this machine is not (an Apple M-series NEON CPU, an x86 without AVX-512): the rule
    read from repack.cpp, applied to tensor records; no server can run them here."""
    def t(name: str, ggml_type: str, *shape: int) -> TensorInfo:
        return TensorInfo(name, ggml_type, shape, 0, 0, 0)

    assert repacks(t("blk.0.ffn_down.weight", "Q6_K", 2048, 640), APPLE_M)
    assert not repacks(t("blk.0.ffn_down.weight", "Q6_K", 2048, 640), X86_AVX2)
    assert repacks(t("blk.0.attn_v.weight", "Q8_0", 640, 256), APPLE_M) and not repacks(
        t("blk.0.attn_v.weight", "Q8_0", 640, 256), X86_AVX2)
    assert repacks(t("blk.0.attn_q.weight", "Q4_0", 256, 1004), APPLE_M)  # NEON: rows by 4; AVX2: by 8
    assert not repacks(t("blk.0.attn_q.weight", "Q4_0", 256, 1004), X86_AVX2)
    assert not repacks(t("blk.0.ffn_up.weight", "Q2_K", 256, 512), X86_AVX2)  # AVX-512 only
    assert not repacks(t("token_embd.weight", "Q4_0", 256, 1000), X86_AVX2)  # GET_ROWS: a lookup
    assert repacks(t("token_embd.weight", "Q4_0", 256, 1000), X86_AVX2, as_output=True)  # the tied output's MUL_MAT
    assert repacks(t("blk.0.ffn_up_exps.weight", "Q4_K", 256, 128, 8), X86_AVX2)  # MUL_MAT_ID: 3-D
    assert not repacks(t("blk.0.attn_k_b.weight", "Q4_K", 256, 128, 8), X86_AVX2)  # MUL_MAT of a 3-D weight


def test_device_presets_state_their_repack_assumption(capsys, gemma3) -> None:
    """A discrete GPU's host buffer type comes first in llama.cpp's CPU list: with mmap no CPU weight is repacked
    (src/llama-model.cpp make_cpu_buft_list); Apple's Metal has none, so layers left on the CPU repack (from
    the source: no such machine here)."""
    argv = ["-m", str(gemma3), "-c", "4096", "-np", "1"]
    assert cli.main(["plan", "--json", "--device", "rtx-4090", "--", "llama-server", *argv, "-ngl", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(d["repack_bytes"] == 0 for d in doc["devices"]) and any(n["code"] == "repack.host-buffer-first" for n in doc["notes"])
    assert cli.main(["plan", "--json", "--device", "m1-max-32", "--", "llama-server", *argv, "-ngl", "10"]) == 0
    doc = json.loads(capsys.readouterr().out)
    repacked = {d["name"]: d["repack_bytes"] for d in doc["devices"]}  # CPU_REPACK is CPU memory: RAM, not Metal's
    assert repacked["CPU"] > 0 and repacked["Metal"] == 0 and any(n["code"] == "repack.host-copy" and "Apple M-series" in n["text"] for n in doc["notes"])
    assert cli.main(["plan", "--json", "--device", "m1-max-32", "--", "llama-server", *argv, "-ngl", "10", "-nr"]) == 0
    assert all(d["repack_bytes"] == 0 for d in json.loads(capsys.readouterr().out)["devices"])


def test_an_expert_both_an_rpc_override_and_cpu_moe_select_is_refused(capsys) -> None:
    from kvbook.plan.placement import assign
    from kvbook.plan.weights import tensor_weights

    flags = parse_server_args(["-m", "x.gguf", "--rpc", "127.0.0.1:5", "-ot", "exps=RPC0[127.0.0.1:5]", "--cpu-moe"])
    tensors = (TensorInfo("blk.0.ffn_up_exps.weight", "Q4_K", (256, 128, 8), 1, 0, 0),)
    with pytest.raises(BadInput, match="depends on their order on the command line"):
        tensor_weights(tensors, assign(1, 2, ("R",), (1.0,)), overrides=flags.tensor_overrides, cpu_moe_layers=-1,
                       bufts={"RPC0[127.0.0.1:5]": "R"})


def test_a_shape_only_model_sizes_only_whole_layers_experts(capsys, tmp_path) -> None:
    """A model known by its shapes (a config.json; presets carry tensor listings) has no tensor names: -ot that
    keeps whole layers' experts on the CPU is sized as --n-cpu-moe; any other pattern is refused by name."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
                               "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                               "max_position_embeddings": 40960, "vocab_size": 151936, "intermediate_size": 6144,
                               "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}))
    assert cli.main(["plan", "--device", "rtx-4090", "--", "llama-server", "-m", str(cfg), "-c", "4096",
                     "-ot", "attn_q=CPU"]) == 2
    err = capsys.readouterr().err
    assert "no GGUF tensors" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["plan", "--device", "rtx-4090", "--", "llama-server", "-m", str(cfg), "-c", "4096",
                     "-ot", r"blk\.([0-9]|1[0-9])\.ffn_.*_exps=CPU"]) in (0, 1)


def test_a_draft_on_the_cpu_is_repacked_too(capsys, tmp_path, gemma3) -> None:
    """-md: the draft model loads with the target's parameters (-nr included), so it has its own CPU_Mapped and
    CPU_REPACK buffers; the CPU's planned weights hold both models' two buffers."""
    argv = ["-m", str(gemma3), "-md", str(gemma3), "-c", "512", "-np", "1", "--fit", "off"]
    cpu = _plan(capsys, argv)
    with start_llama_server([*argv, "-t", "1", "--no-warmup"], run_dir=tmp_path) as server:
        target, draft = server.measured(), server.measured_draft()
    assert draft is not None and draft.model_mib.get("CPU_REPACK") == target.model_mib.get("CPU_REPACK") == 12.66
    logged = target.weights_mib + draft.weights_mib
    assert round(logged, 2) == mib2(cpu["weights_bytes"]) and mib2(cpu["repack_bytes"] // 2) == 12.66


def test_no_host_repacks_cpu_weights_beside_a_gpu(capsys, gemma3) -> None:
    """src/llama-model.cpp make_cpu_buft_list: a GPU's host buffer type (CUDA_Host) comes before CPU_REPACK for the
    CPU's weights unless --no-host; then they are repacked as on a CPU-only machine. Checked against the source
    (no GPU here): the CPU-only plan is the reference for the bytes."""
    from kvbook import cli

    def cpu(*args: str) -> dict:
        assert cli.main(["plan", "--json", *args]) == 0
        doc = json.loads(capsys.readouterr().out)
        return next(d for d in doc["devices"] if d["name"] == "CPU") if doc["devices"] else doc

    line = ["--", "llama-server", "-m", str(gemma3), "-c", "4096", "-ngl", "0"]
    gpu = cpu("--device", "rtx-4090", *line)
    assert gpu["repack_bytes"] == 0
    no_host = cpu("--device", "rtx-4090", *line, "--no-host")
    alone = cpu("--budget-gib", "8", *line)
    assert no_host["repack_bytes"] > 0 and no_host["repack_bytes"] == alone.get("repack_bytes", no_host["repack_bytes"])
