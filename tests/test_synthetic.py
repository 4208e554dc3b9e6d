"""Synthetic GGUFs load in llama.cpp and give the KV sizes the rules in llama-cpp-memory.md predict.

Expected MiB are worked out by hand: K or V bytes per layer = row(type, head_dim * n_head_kv)
* cells * streams; recurrent = 4 * (n_embd_r + n_embd_s) * seqs per recurrent layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from gguf import GGUFReader

from kvbook.errors import BadInput, KvbookError, ModelError, ServerError
from kvbook.ops.fit_params import FitReport, find_fit_params, parse_fit_output, run_fit_params
from kvbook.testing.synthetic import SUPPORTED_ARCHS, synthetic_tensors, write_synthetic_gguf

MODELS = Path(__file__).resolve().parents[1] / "params" / "models"
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def fit_params() -> Path:
    """The llama-fit-params binary; a missing one fails the test rather than skipping it."""
    try:
        return find_fit_params()
    except BadInput as e:
        pytest.fail(f"{e} (these tests need the pinned llama.cpp build)")


def _meta(arch: str, **keys: Any) -> dict[str, Any]:
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in keys.items()}}


# Small models with the real shapes' features: GQA, explicit head sizes, MoE, SWA, MLA, delta net.
_SSM = {"ssm.conv_kernel": 4, "ssm.state_size": 128, "ssm.group_count": 2,
        "ssm.time_step_rank": 4, "ssm.inner_size": 512, "full_attention_interval": 4}
_COMMON = {"context_length": 32768, "embedding_length": 256, "attention.layer_norm_rms_epsilon": 1e-6,
           "rope.freq_base": 1000000.0, "vocab_size": 1000}
SMALL: dict[str, dict[str, Any]] = {
    "llama": _meta("llama", **{**_COMMON, "embedding_length": 512, "block_count": 4,
                               "feed_forward_length": 1024, "attention.head_count": 8,
                               "attention.head_count_kv": 2, "rope.dimension_count": 64}),
    "qwen3": _meta("qwen3", **_COMMON, block_count=4, feed_forward_length=512,
                   **{"attention.head_count": 4, "attention.head_count_kv": 2,
                      "attention.key_length": 128, "attention.value_length": 128}),
    "qwen3moe": _meta("qwen3moe", **_COMMON, block_count=4, feed_forward_length=512,
                      expert_count=8, expert_used_count=2, expert_feed_forward_length=128,
                      **{"attention.head_count": 4, "attention.head_count_kv": 2,
                         "attention.key_length": 128, "attention.value_length": 128}),
    # 8 trunk layers (attention at 3 and 7) + 1 MTP layer
    "qwen35moe": _meta("qwen35moe", **_COMMON, **_SSM, block_count=9, nextn_predict_layers=1,
                       expert_count=8, expert_used_count=2, expert_feed_forward_length=128,
                       expert_shared_feed_forward_length=128,
                       **{"attention.head_count": 4, "attention.head_count_kv": 2,
                          "attention.key_length": 128, "attention.value_length": 128,
                          "rope.dimension_sections": [11, 11, 10, 0], "rope.dimension_count": 64}),
    "qwen35": _meta("qwen35", **_COMMON, **_SSM, block_count=8, feed_forward_length=512,
                    **{"attention.head_count": 4, "attention.head_count_kv": 2,
                       "attention.key_length": 128, "attention.value_length": 128,
                       "rope.dimension_sections": [11, 11, 10, 0], "rope.dimension_count": 64}),
    "qwen3next": _meta("qwen3next", **_COMMON, **_SSM, block_count=8, feed_forward_length=512,
                       expert_count=8, expert_used_count=2, expert_feed_forward_length=128,
                       expert_shared_feed_forward_length=128,
                       **{"attention.head_count": 4, "attention.head_count_kv": 2,
                          "attention.key_length": 128, "attention.value_length": 128,
                          "rope.dimension_count": 64}),
    # MLA: cache row = kv_lora_rank + rope dims = 128 + 32 = 160, one head, no V
    "deepseek2": _meta("deepseek2", **_COMMON, block_count=4, feed_forward_length=512,
                       leading_dense_block_count=1, expert_count=8, expert_used_count=2,
                       expert_feed_forward_length=128, expert_shared_count=1,
                       expert_weights_scale=2.5, expert_weights_norm=True, expert_gating_func=2,
                       **{"attention.head_count": 4, "attention.head_count_kv": 1,
                          "attention.q_lora_rank": 64, "attention.kv_lora_rank": 128,
                          "attention.key_length": 160, "attention.value_length": 128,
                          "attention.key_length_mla": 96, "attention.value_length_mla": 64,
                          "rope.dimension_count": 32}),
    # SWA on even layers (pattern 2), window 128
    "gpt-oss": _meta("gpt-oss", **_COMMON, block_count=4, feed_forward_length=256,
                     expert_count=4, expert_used_count=2, expert_feed_forward_length=256,
                     **{"attention.head_count": 8, "attention.head_count_kv": 2,
                        "attention.key_length": 64, "attention.value_length": 64,
                        "attention.sliding_window": 128}),
    "phi3": _meta("phi3", **{**_COMMON, "embedding_length": 512, "block_count": 4, "feed_forward_length": 1024,
                             "attention.head_count": 8, "attention.head_count_kv": 2, "rope.dimension_count": 64}),
    # no kvbook rule: planned with llama.cpp's own accounting (tests/test_fit_fallback.py)
    "internlm2": _meta("internlm2", **{**_COMMON, "embedding_length": 512, "block_count": 4,
                                       "feed_forward_length": 1024, "attention.head_count": 8,
                                       "attention.head_count_kv": 2}),
    # chunked attention: layers 0-2 chunked (window 8192 > context, so 4096 cells), layer 3 full; MoE on odd layers
    "llama4": _meta("llama4", **_COMMON, block_count=4, feed_forward_length=512, expert_count=4, expert_used_count=1,
                    expert_feed_forward_length=128, interleave_moe_layer_step=2,
                    **{"attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 64}),
    "glm4": _meta("glm4", **_COMMON, block_count=4, feed_forward_length=512,
                  **{"attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 32}),
    "command-r": _meta("command-r", **_COMMON, block_count=4, feed_forward_length=512,
                       **{"attention.head_count": 4, "attention.head_count_kv": 2,
                          "attention.layer_norm_epsilon": 1e-5}),
    "olmo2": _meta("olmo2", **_COMMON, block_count=4, feed_forward_length=512,
                   **{"attention.head_count": 4, "attention.head_count_kv": 2}),
    "seed_oss": _meta("seed_oss", **_COMMON, block_count=4, feed_forward_length=512,
                      **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 128,
                         "attention.value_length": 128}),
    "qwen3vl": _meta("qwen3vl", **_COMMON, block_count=4, feed_forward_length=512,
                     **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 128,
                        "attention.value_length": 128, "rope.dimension_sections": [24, 20, 20, 0]}),
    "qwen3vlmoe": _meta("qwen3vlmoe", **_COMMON, block_count=4, feed_forward_length=512, expert_count=8,
                        expert_used_count=2, expert_feed_forward_length=128,
                        **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 128,
                           "attention.value_length": 128, "rope.dimension_sections": [24, 20, 20, 0]}),
    # Mamba2 on layers 0-2 (head_count_kv 0), attention on layer 3
    "granitehybrid": _meta("granitehybrid", **_COMMON, block_count=4, feed_forward_length=512,
                           **{"attention.head_count": 4, "attention.head_count_kv": [0, 0, 0, 2],
                              "ssm.conv_kernel": 4, "ssm.inner_size": 512, "ssm.state_size": 64,
                              "ssm.group_count": 1, "ssm.time_step_rank": 8}),
    # Mamba2, attention, MLP, Mamba2: the MLP layer owns no cache
    "nemotron_h": _meta("nemotron_h", **_COMMON, block_count=4, feed_forward_length=[0, 0, 512, 0],
                        **{"attention.head_count": 4, "attention.head_count_kv": [0, 2, 0, 0],
                           "attention.layer_norm_epsilon": 1e-5, "ssm.conv_kernel": 4, "ssm.inner_size": 512,
                           "ssm.state_size": 64, "ssm.group_count": 2, "ssm.time_step_rank": 8}),
    # short convolutions on layers 0 and 2, attention on 1 and 3
    "lfm2": _meta("lfm2", **{**_COMMON, "embedding_length": 512}, block_count=4, feed_forward_length=512,
                  **{"attention.head_count": 8, "attention.head_count_kv": [0, 2, 0, 2], "shortconv.l_cache": 3}),
    # every layer: attention and Mamba2 side by side
    "falcon-h1": _meta("falcon-h1", **_COMMON, block_count=2, feed_forward_length=512,
                       **{"attention.head_count": 4, "attention.head_count_kv": 2, "ssm.conv_kernel": 4,
                          "ssm.inner_size": 512, "ssm.state_size": 64, "ssm.group_count": 1,
                          "ssm.time_step_rank": 8}),
    # layers 0-4 SWA, layer 5 full (pattern 6), window 512
    "gemma3": _meta("gemma3", **_COMMON, block_count=6, feed_forward_length=512,
                    **{"attention.head_count": 4, "attention.head_count_kv": 1,
                       "attention.key_length": 128, "attention.value_length": 128,
                       "attention.sliding_window": 512}),
    # speculative drafts (their own token_embd and output, so they load without a target context)
    "eagle3": _meta("eagle3", **_COMMON, block_count=1, feed_forward_length=512, target_layers=[0, 1, 2],
                    target_hidden_size=256, **{"attention.head_count": 4, "attention.head_count_kv": 2,
                                               "attention.key_length": 128, "attention.value_length": 128}),
    "dflash": _meta("dflash", **_COMMON, block_count=2, feed_forward_length=512, target_layers=[0, 1, 2],
                    **{"attention.head_count": 4, "attention.head_count_kv": 2,
                       "attention.key_length": 128, "attention.value_length": 128}),
}

# arch -> (flags, [(kind, cells, layers, K MiB, V MiB)], recurrent MiB) at -c 4096
EXPECTED: dict[str, tuple[list[str], list[tuple[str, int, int, float, float]], float]] = {
    # 4 layers x 2 heads x 64 x f16 x 4096 cells
    "llama": (["-np", "1"], [("kv", 4096, 4, 4.0, 4.0)], 0.0),
    # 1 and 2 layers x 2 heads x 128 x f16 x 4096 cells
    "eagle3": (["-np", "1"], [("kv", 4096, 1, 2.0, 2.0)], 0.0),
    "dflash": (["-np", "1"], [("kv", 4096, 2, 4.0, 4.0)], 0.0),
    "qwen3": (["-np", "1"], [("kv", 4096, 4, 8.0, 8.0)], 0.0),
    "qwen3moe": (["-np", "1"], [("kv", 4096, 4, 8.0, 8.0)], 0.0),
    # 2 attention layers; 6 delta-net layers x 4 B x (3*(512+2*2*128) + 128*512) = 1.57 MiB
    "qwen35moe": (["-np", "1"], [("kv", 4096, 2, 4.0, 4.0)], 1.57),
    "qwen35": (["-np", "1"], [("kv", 4096, 2, 4.0, 4.0)], 1.57),
    "qwen3next": (["-np", "1"], [("kv", 4096, 2, 4.0, 4.0)], 1.57),
    # 4 layers x 160 x f16 x 4096, no V
    "deepseek2": (["-np", "1"], [("kv", 4096, 4, 5.0, 0.0)], 0.0),
    # odd layers full: 2 x 2 heads x 64 x f16 x 4096; SWA cells = pad256(128 + 512) = 768
    "gpt-oss": (["-np", "1"], [("kv", 4096, 2, 2.0, 2.0), ("swa", 768, 2, 0.375, 0.375)], 0.0),
    # 4 layers x 2 heads x 64 x f16 x 4096 cells
    "phi3": (["-np", "1"], [("kv", 4096, 4, 4.0, 4.0)], 0.0),
    "internlm2": (["-np", "1"], [("kv", 4096, 4, 4.0, 4.0)], 0.0),
    # 1 full + 3 chunked layers x 2 heads x 64; chunk cells = pad256(min(4096, 8192 + 512)) = 4096
    "llama4": (["-np", "1"], [("kv", 4096, 1, 1.0, 1.0), ("swa", 4096, 3, 3.0, 3.0)], 0.0),
    "glm4": (["-np", "1"], [("kv", 4096, 4, 4.0, 4.0)], 0.0),
    "command-r": (["-np", "1"], [("kv", 4096, 4, 4.0, 4.0)], 0.0),
    "olmo2": (["-np", "1"], [("kv", 4096, 4, 4.0, 4.0)], 0.0),
    # 4 layers x 2 heads x 128
    "seed_oss": (["-np", "1"], [("kv", 4096, 4, 8.0, 8.0)], 0.0),
    "qwen3vl": (["-np", "1"], [("kv", 4096, 4, 8.0, 8.0)], 0.0),
    "qwen3vlmoe": (["-np", "1"], [("kv", 4096, 4, 8.0, 8.0)], 0.0),
    # 3 Mamba2 layers x 4 B x (3*(512+2*1*64) + 64*512) = 0.40 MiB
    "granitehybrid": (["-np", "1"], [("kv", 4096, 1, 1.0, 1.0)], 0.40),
    # 2 Mamba2 layers x 4 B x (3*(512+2*2*64) + 64*512) = 0.27 MiB
    "nemotron_h": (["-np", "1"], [("kv", 4096, 1, 1.0, 1.0)], 0.27),
    # 2 short-conv layers x 4 B x 512 x (3-1) = 8 KiB
    "lfm2": (["-np", "1"], [("kv", 4096, 2, 2.0, 2.0)], 0.01),
    # 2 layers, each with KV and Mamba2: 2 x 4 B x (3*(512+2*64) + 64*512) = 0.26 MiB
    "falcon-h1": (["-np", "1"], [("kv", 4096, 2, 2.0, 2.0)], 0.26),
    # SWA cells = pad256(512 + 512) = 1024
    "gemma3": (["-np", "1"], [("kv", 4096, 1, 1.0, 1.0), ("swa", 1024, 5, 1.25, 1.25)], 0.0),
}


Row = tuple[str, int, int, float, float]  # kind (kv / swa), cells, layers, K MiB, V MiB


def _assert_kv(r: FitReport, expected: list[Row]) -> None:
    """The log prints MiB with 2 decimals, so 0.375 shows as 0.38."""
    got = [(c.kind, c.cells, c.layers, c.k_mib, c.v_mib) for c in r.kv_caches]
    assert [g[:3] for g in got] == [e[:3] for e in expected], got
    assert [g[3:] for g in got] == [pytest.approx(e[3:], abs=0.006) for e in expected], got


def test_every_supported_arch_has_a_case() -> None:
    assert set(SMALL) == set(EXPECTED) == set(SUPPORTED_ARCHS)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_small_model_loads_with_expected_kv(arch: str, tmp_path: Path, fit_params: Path) -> None:
    path = write_synthetic_gguf(SMALL[arch], tmp_path / f"{arch}.gguf")
    flags, kv, recurrent = EXPECTED[arch]
    r = run_fit_params(path, 4096, flags, binary=fit_params)
    assert r.log_complete and (r.n_ctx, r.n_ctx_seq, r.n_seq_max) == (4096, 4096, 1)
    _assert_kv(r, kv)
    assert r.recurrent_mib == pytest.approx(recurrent, abs=0.005)
    assert r.compute_total_mib > 0
    assert r.host.context_mib == int(r.kv_mib + r.recurrent_mib)


def test_streams_and_quantized_cache(tmp_path: Path, fit_params: Path) -> None:
    path = write_synthetic_gguf(SMALL["llama"], tmp_path / "llama.gguf")
    # -c 20000 -np 3: n_ctx_seq = pad256(20000 // 3) = 6912, three streams
    r = run_fit_params(path, 20000, ["-np", "3"], binary=fit_params)
    assert (r.n_ctx_seq, r.n_ctx, r.n_seq_max) == (6912, 20736, 3)
    _assert_kv(r, [("kv", 6912, 4, 20.25, 20.25)])
    # q8_0 rows: 128 values -> 4 blocks x 34 B = 136 B per cell and layer
    r = run_fit_params(path, 4096, ["-np", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
                       binary=fit_params)
    _assert_kv(r, [("kv", 4096, 4, 2.125, 2.125)])
    assert (r.kv_caches[0].k_type, r.kv_caches[0].v_type) == ("q8_0", "q8_0")


def _preset(name: str) -> dict[str, Any]:
    path = MODELS / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"preset {path.name} not written yet")
    return dict(yaml.safe_load(path.read_text())["metadata"])


def test_qwen36_35b_full_size(tmp_path: Path, fit_params: Path) -> None:
    """llama-cpp-memory.md section 10: -c 65536 -np 1 gives KV 1280.00 + recurrent 62.81 MiB."""
    path = write_synthetic_gguf(_preset("qwen3.6-35b-a3b"), tmp_path / "q.gguf")
    assert path.stat().st_blocks * 512 < 1 * MIB < path.stat().st_size
    r = run_fit_params(path, 65536, ["-np", "1"], binary=fit_params)
    # 10 attention layers x 2 heads x 256 x f16 x 65536; 30 delta-net layers
    _assert_kv(r, [("kv", 65536, 10, 640.0, 640.0)])
    assert [(x.layers, x.k_mib, x.v_mib) for x in r.recurrent] == [(40, 2.81, 60.0)]
    assert r.recurrent_mib == 62.81
    # 4 streams of 65536 (the server's 4 unified slots hold the same): 5120.00 + 251.25
    r = run_fit_params(path, 262144, ["-np", "4", "-ctk", "bf16", "-ctv", "bf16", "-fa", "on"],
                       binary=fit_params)
    assert (r.kv_mib, r.recurrent_mib) == (5120.0, 251.25)


def test_deepseek_v3_full_size_mla(tmp_path: Path, fit_params: Path) -> None:
    """MLA: 61 layers x (512 + 64) x f16 per cell, no V; a ~350 GiB file costs only its header."""
    path = write_synthetic_gguf(_preset("deepseek-v3"), tmp_path / "ds.gguf")
    assert path.stat().st_size > 300 * 1024 * MIB and path.stat().st_blocks * 512 < 1 * MIB
    r = run_fit_params(path, 65536, ["-np", "1"], binary=fit_params)
    _assert_kv(r, [("kv", 65536, 61, 4392.0, 0.0)])
    r = run_fit_params(path, 163840, ["-np", "1"], binary=fit_params)
    assert r.kv_mib == 10980.0


def test_metadata_round_trips_with_llama_cpp_types(tmp_path: Path) -> None:
    md = {**SMALL["gemma3"], "gemma3.attention.sliding_window_pattern": [True] * 5 + [False],
          "gemma3.rope.freq_base": 10000, "tokenizer.ggml.tokens": ["a", "b"]}
    r = GGUFReader(write_synthetic_gguf(md, tmp_path / "g.gguf"))
    f = r.fields
    assert f["gemma3.block_count"].types[0].name == "UINT32"
    assert f["gemma3.rope.freq_base"].types[0].name == "FLOAT32"  # whole number, float key
    assert f["gemma3.attention.sliding_window_pattern"].contents() == [True] * 5 + [False]
    assert f["tokenizer.ggml.model"].contents() == "none"
    assert "tokenizer.ggml.tokens" not in f
    assert [t.name for t in r.tensors] == [n for n, _ in synthetic_tensors(md)]


def test_unknown_architecture_and_missing_vocab() -> None:
    with pytest.raises(ModelError, match="no synthetic GGUF for architecture 'mamba'"):
        synthetic_tensors({"general.architecture": "mamba", "mamba.block_count": 1,
                           "mamba.embedding_length": 8, "mamba.vocab_size": 10})
    md = {k: v for k, v in SMALL["llama"].items() if k != "llama.vocab_size"}
    with pytest.raises(ModelError, match="llama.vocab_size"):
        synthetic_tensors(md)


def test_oracle_failure_carries_exit_code_and_log_tail(tmp_path: Path, fit_params: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ServerError, match=r"exited with code -?[1-9]\d*.*invalid magic") as e:
        run_fit_params(bad, 4096, binary=fit_params)
    assert isinstance(e.value, KvbookError)
    assert "last log lines:" in str(e.value) and "failed to load model" in str(e.value)


def test_missing_binary_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="not an executable"):
        find_fit_params(tmp_path / "llama-fit-params")


LOG = """\
0.00.002.739 D llama_context: n_seq_max             = 1
0.00.002.739 D llama_context: n_ctx                 = 65536
0.00.002.739 D llama_context: n_ctx_seq             = 65536
0.00.003.001 I llama_kv_cache_iswa: creating non-SWA KV cache, size = 65536 cells
0.00.003.002 D llama_kv_cache: size =  192.00 MiB ( 65536 cells,   3 layers,  1/1 seqs), K (f16):   96.00 MiB, V (f16):   96.00 MiB
0.00.003.003 I llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells
0.00.003.004 D llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16):    7.50 MiB, V (f16):    7.50 MiB
0.00.003.005 D llama_memory_recurrent: size =   62.81 MiB (     1 cells,  40 layers,  1 seqs  0 rs_seq), R (f32):    2.81 MiB, S (f32):   60.00 MiB, P (f32):    0.00 MiB
0.00.003.765 D sched_reserve:        CPU compute buffer size =   583.28 MiB
0.00.003.815 I common_memory_breakdown_print: |   - Host               |                  1025 =   235 +     207 +     583                |
0.00.003.815 I common_memory_breakdown_print: |   - CPU_REPACK         |                    18 =    18 +       0 +       0                |
"""


def test_parse_fit_output_without_binary() -> None:
    r = parse_fit_output("Host 235 207 583 \n", LOG, ["llama-fit-params"])
    assert [(c.kind, c.cells, c.layers, c.total_mib) for c in r.kv_caches] == [
        ("kv", 65536, 3, 192.0), ("swa", 1024, 15, 15.0)]
    assert r.recurrent[0].v_mib == 60.0 and r.recurrent_mib == 62.81
    assert (r.n_ctx, r.n_ctx_seq, r.n_seq_max, r.kv_mib) == (65536, 65536, 1, 207.0)
    assert r.compute_mib == (("CPU", 583.28),)
    assert [(b.name, b.model_mib) for b in r.breakdown] == [("Host", 235), ("CPU_REPACK", 18)]
    assert r.host.compute_mib == 583 and r.log_complete
    assert not parse_fit_output("Host 1 2 3\n", LOG.split("0.00.003.765")[0]).log_complete
    with pytest.raises(ServerError, match="no 'Host' memory row"):
        parse_fit_output("kv", LOG)
