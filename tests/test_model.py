"""Architecture rules, flag parsing and planning on presets and metadata dicts (no binaries needed)."""

from __future__ import annotations

import pytest

from kvbook.errors import BadInput, ModelError
from kvbook.interface import CacheKind, FlashAttn, GiB, MiB
from kvbook.memory.rules import plan_memory
from kvbook.model.arch import arch_from_metadata
from kvbook.model.sources import hf_to_metadata, load_model
from kvbook.plan.devices import custom_budget
from kvbook.plan.flags import parse_server_args, render_args
from kvbook.plan.planner import make_plan


def meta(arch: str, **keys) -> dict:
    base = {"general.architecture": arch, f"{arch}.block_count": 8, f"{arch}.context_length": 8192,
            f"{arch}.embedding_length": 512, f"{arch}.attention.head_count": 8, f"{arch}.attention.head_count_kv": 2,
            f"{arch}.vocab_size": 1000}
    base.update({f"{arch}.{k}" if not k.startswith("general.") else k: v for k, v in keys.items()})
    return base


def arch_of(m: dict):
    return arch_from_metadata(m, name="t", source="test", weights_bytes=0, weights_exact=True, weights_note="")


def mem(m: dict, *args: str):
    return plan_memory(arch_of(m), parse_server_args(["-m", "x", *args]))


def test_gpt_oss_swa_pattern_even_layers():
    a = arch_of(meta("gpt-oss", **{"attention.sliding_window": 128}))
    assert a.is_swa == (True, False) * 4


def test_gemma3_swa_needs_window_and_pattern_six():
    assert not any(arch_of(meta("gemma3")).is_swa)
    a = arch_of(meta("gemma3", block_count=12, **{"attention.sliding_window": 512}))
    assert a.is_swa == (True,) * 5 + (False,) + (True,) * 5 + (False,)


def test_explicit_swa_pattern_array_wins():
    a = arch_of(meta("gemma3", block_count=4, **{"attention.sliding_window": 64,
                                               "attention.sliding_window_pattern": [True, False, False, True]}))
    assert a.is_swa == (True, False, False, True)


def test_hybrid_interval_and_nextn():
    m = meta("qwen35moe", block_count=9, nextn_predict_layers=1, full_attention_interval=4,
             **{"ssm.conv_kernel": 4, "ssm.inner_size": 256, "ssm.state_size": 16, "ssm.group_count": 2})
    a = arch_of(m)
    assert a.n_layer == 8 and a.n_layer_nextn == 1
    assert a.is_recurrent == (True, True, True, False, True, True, True, False)
    caches = mem(m, "-c", "1024", "-np", "2").caches
    kv, rec = caches
    assert kv.layers == 2 and rec.layers == 6 and rec.cells == 2
    assert rec.k_bytes == 4 * (3 * (256 + 2 * 2 * 16)) * 2 * 6 and rec.v_bytes == 4 * 16 * 256 * 2 * 6


def test_llama4_chunked_window_is_fixed_unless_the_gguf_says_zero():
    a = arch_of(meta("llama4"))
    assert a.n_swa == 8192 and a.is_swa == (True, True, True, False) * 2
    assert arch_of(meta("llama4", **{"attention.sliding_window": 1024})).n_swa == 8192  # the value is not read
    off = arch_of(meta("llama4", **{"attention.sliding_window": 0}))
    assert off.n_swa == 0 and not any(off.is_swa)


def test_phi3_ignores_its_window_and_olmo2_slides_only_with_one():
    assert not any(arch_of(meta("phi3", **{"attention.sliding_window": 2047})).is_swa)
    assert not any(arch_of(meta("olmo2")).is_swa)
    assert arch_of(meta("olmo2", **{"attention.sliding_window": 4096})).is_swa == (True, True, True, False) * 2


_MAMBA = {"ssm.conv_kernel": 4, "ssm.inner_size": 1024, "ssm.state_size": 128, "ssm.group_count": 1}


def test_hybrid_layer_kinds_from_kv_heads_and_ffn():
    g = arch_of(meta("granitehybrid", block_count=4, **_MAMBA, **{"attention.head_count_kv": [0, 2, 0, 0]}))
    assert g.is_recurrent == (True, False, True, True) and [g.has_kv(i) for i in range(4)] == [False, True, False, False]
    # Nemotron-H: Mamba2, attention, MLP (owns nothing), Mamba2
    n = arch_of(meta("nemotron_h", block_count=4, feed_forward_length=[0, 0, 2048, 0], **_MAMBA,
                     **{"attention.head_count_kv": [0, 2, 0, 0]}))
    assert n.is_recurrent == (True, False, False, True) and [n.has_kv(i) for i in range(4)] == [False, True, False, False]
    kv, rec = mem(meta("nemotron_h", block_count=4, feed_forward_length=[0, 0, 2048, 0], **_MAMBA,
                       **{"attention.head_count_kv": [0, 2, 0, 0]}), "-c", "1024", "-np", "1").caches
    assert kv.layers == 1 and rec.layers == 2
    # Falcon-H1: every layer owns KV and Mamba2 state
    f = arch_of(meta("falcon-h1", block_count=4, **_MAMBA))
    assert all(f.is_recurrent) and all(f.has_kv(i) for i in range(4))


def test_lfm2_short_conv_state_and_window_on_attention_layers():
    m = meta("lfm2", block_count=4, **{"shortconv.l_cache": 3, "attention.head_count_kv": [0, 2, 0, 2]})
    a = arch_of(m)
    assert a.recurrent is not None and (a.recurrent.n_embd_r, a.recurrent.n_embd_s) == (512 * 2, 0)
    assert not any(a.is_swa)
    w = arch_of({**m, "lfm2.attention.sliding_window": 512})
    assert w.is_swa == (False, True, False, True) and w.n_swa == 512


def test_mla_has_no_v_and_needs_equal_types():
    m = meta("deepseek2", **{"attention.head_count_kv": 1, "attention.key_length": 576, "attention.value_length": 512,
                             "attention.key_length_mla": 192, "attention.value_length_mla": 128})
    (kv,) = mem(m, "-c", "4096", "-np", "1").caches
    assert kv.v_bytes == 0 and kv.v_type is None and kv.k_bytes == 576 * 2 * 4096 * 8
    with pytest.raises(BadInput, match="MLA"):
        mem(m, "-ctk", "q8_0", "-ctv", "f16")


def test_per_layer_kv_heads_array():
    m = meta("llama", **{"attention.head_count_kv": [2, 2, 4, 4, 2, 2, 4, 4]})
    (kv,) = mem(m, "-c", "256", "-np", "1").caches
    assert kv.k_bytes == sum([2, 2, 4, 4, 2, 2, 4, 4]) * 64 * 2 * 256


def test_v_padded_to_widest_layer_without_flash_attention():
    m = meta("llama", **{"attention.head_count_kv": [2, 2, 4, 4, 2, 2, 4, 4]})
    on = mem(m, "-c", "256", "-np", "1", "-fa", "on").caches[0]
    off = mem(m, "-c", "256", "-np", "1", "-fa", "off").caches[0]
    assert on.v_bytes == on.k_bytes and off.v_bytes == 8 * 4 * 64 * 2 * 256


@pytest.mark.parametrize("ctx, np_, kvu, want", [
    (20000, 3, False, (20736, 6912)),
    (20000, 3, True, (20224, 20224)),
    (0, 2, False, (16384, 8192)),   # -c 0 with --fit on: training context per slot
    (0, -1, False, (8192, 8192)),   # auto: 4 slots, unified
    (100, 1, False, (256, 256)),
])
def test_context_rounding(ctx, np_, kvu, want):
    args = ["-c", str(ctx), "-np", str(np_)] + (["-kvu"] if kvu else [])
    shape = mem(meta("llama"), *args).shape
    assert (shape.n_ctx, shape.n_ctx_seq) == want


def test_c0_with_fit_off_is_training_context_in_total():
    shape = mem(meta("llama"), "-c", "0", "-np", "2", "--fit", "off").shape
    assert (shape.n_ctx, shape.n_ctx_seq) == (8192, 4096)


def test_flag_parsing_accepts_harmless_flags_and_refuses_equals_forms():
    """llama-server has no `--flag=value` form (tests/test_flag_parity.py checks it against the binary)."""
    with pytest.raises(BadInput, match="no '=' form"):
        parse_server_args(["-m", "m.gguf", "--ctx-size=4096"])
    flags = parse_server_args(["/opt/bin/llama-server", "-m", "m.gguf", "--ctx-size", "4096", "--jinja", "--port", "8081",
                               "-n", "32768", "--flash-attn", "on", "--cache-type-k", "bf16", "-kvu"])
    assert flags.ctx == 4096 and flags.port == 8081 and flags.flash_attn is FlashAttn.ON
    assert flags.type_k == "bf16" and flags.kv_unified is True
    assert "--jinja" in flags.ignored and "-n" in flags.ignored


def test_render_args_round_trip():
    flags = parse_server_args(["-m", "m.gguf", "-c", "65536", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "--swa-full",
                               "--fit", "off", "-fa", "on"])
    again = parse_server_args(render_args(flags))
    for field in ("ctx", "parallel", "type_k", "type_v", "swa_full", "fit", "flash_attn"):
        assert getattr(again, field) == getattr(flags, field)


def test_unknown_arch_and_missing_keys():
    with pytest.raises(ModelError, match="not modelled"):
        arch_of(meta("mamba"))
    broken = meta("llama")
    del broken["llama.embedding_length"]
    with pytest.raises(ModelError, match="embedding_length"):
        arch_of(broken)


def test_hf_config_mapping_matches_preset():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": 32, "max_position_embeddings": 131072, "intermediate_size": 14336,
           "vocab_size": 128256}
    a = arch_of(hf_to_metadata(cfg, "config.json"))
    preset = load_model("llama-3.1-8b")
    for field in ("n_layer", "n_embd", "n_head_kv", "head_k", "head_v", "n_ctx_train", "n_vocab"):
        assert getattr(a, field) == getattr(preset, field), field


def test_reference_figures_for_large_models():
    """llama.cpp's own figures (shared/reference/llama-cpp-memory.md section 10)."""
    qwen = load_model("qwen3.6-35b-a3b")
    big = plan_memory(qwen, parse_server_args(["-m", "q", "-c", "262144", "-ctk", "bf16", "-ctv", "bf16", "-fa", "on",
                                               "-ub", "2048", "-b", "4096"]))
    assert big.kv_bytes == 5120 * MiB and round(big.recurrent_bytes / MiB, 2) == 251.25
    small = plan_memory(qwen, parse_server_args(["-m", "q", "-c", "65536", "-np", "1"]))
    assert small.kv_bytes == 1280 * MiB and round(small.recurrent_bytes / MiB, 2) == 62.81
    llama = plan_memory(load_model("llama-3.1-8b"), parse_server_args(["-m", "l", "-c", "131072"]))
    assert llama.kv_bytes == 16384 * MiB
    for m, want in ((big, 1328.09), (small, 140.02), (llama, 252.02)):
        assert abs(m.compute.bytes / MiB - want) / want * 100 <= m.compute.error_pct


def test_plan_verdicts_and_alternatives():
    arch = load_model("llama-3.1-8b")
    flags = parse_server_args(["-m", "llama-3.1-8b", "-c", "131072", "-np", "1", "-cram", "0"])
    fits = make_plan(arch, flags, custom_budget(40))
    assert fits.verdict.value == "fits" and fits.max_ctx == 131072
    tight = make_plan(arch, flags, custom_budget(17))
    assert tight.verdict.value == "does not fit"
    assert 0 < tight.max_ctx < 131072
    changes = " | ".join(a.change for a in tight.alternatives)
    assert "shorter context" in changes and "q8_0 KV cache" in changes
    for alt in tight.alternatives:
        assert alt.verdict.value != "does not fit"
    assert tight.memory.start_bytes > 17 * GiB


def test_sweep_and_plan_max_ctx_agree():
    import numpy as np

    from kvbook.memory.sweep import largest_fitting_ctx, sweep

    arch = load_model("llama-3.1-8b")
    budget = 12 * GiB
    flags = parse_server_args(["-m", "x", "-np", "1", "-cram", "0", "-nr"])  # the sweep counts no CPU_REPACK copies
    plan = make_plan(arch, flags, custom_budget(12))
    res = sweep(arch, np.arange(256, 131073, 256), ("f16",), (1,), cache_ram_mib=0)
    assert largest_fitting_ctx(res, budget)[0, 0] == plan.max_ctx
    assert CacheKind.KV.value == "kv"


def test_shared_kv_layers_own_no_cache():
    """Gemma 4: layers past block_count - shared_kv_layers reuse earlier caches (has_kv false)."""
    pattern = [True, True, True, True, True, False] * 2
    m = meta("gemma4", block_count=12, **{"attention.sliding_window": 512, "attention.sliding_window_pattern": pattern,
                                          "attention.shared_kv_layers": 4, "attention.key_length_swa": 64,
                                          "attention.value_length_swa": 64})
    a = arch_of(m)
    assert a.n_layer_kv_from_start == 8
    full, swa = mem(m, "-c", "4096", "-np", "1").caches
    assert full.layers == 1 and swa.layers == 7  # layers 0-7 own caches: 5 SWA + 1 full + 2 SWA
    g3n = arch_of(meta("gemma3n", block_count=30, **{"attention.sliding_window": 512}))
    assert g3n.n_layer_kv_from_start == 20


def test_decode_bound_falls_with_context_and_moe_reads_less():
    from kvbook.memory.roofline import active_weight_bytes, decode_bound

    llama = load_model("llama-3.1-8b")
    short, long = decode_bound(llama, 1024, 400), decode_bound(llama, 131072, 400)
    assert short.tokens_per_s > long.tokens_per_s
    assert long.kv_read_bytes == 16 * GiB  # 128 KiB per token x 131072
    moe = load_model("qwen3.6-35b-a3b")
    assert active_weight_bytes(moe) < moe.weights_bytes / 4
    assert active_weight_bytes(llama) == llama.weights_bytes


def test_a_batch_reads_a_dense_model_once_and_more_experts_of_a_moe():
    """What the speculative speed estimate stands on: a verify batch's extra tokens are free for a dense model at
    the bandwidth bound and not for MoE; an MTP head reads one layer and the output matrix per drafted token."""
    from kvbook.memory.roofline import active_weight_bytes, batch_extra_bound, batch_weight_bytes, mtp_draft_cost

    llama, moe = load_model("llama-3.1-8b"), load_model("qwen3.6-35b-a3b-mtp")
    assert batch_extra_bound(llama, 4) == 0.0 and batch_weight_bytes(llama, 4) == llama.weights_bytes
    assert batch_weight_bytes(moe, 1) == pytest.approx(active_weight_bytes(moe), rel=1e-6)
    assert active_weight_bytes(moe) < batch_weight_bytes(moe, 4) < 4 * active_weight_bytes(moe)
    assert 0.1 < batch_extra_bound(moe, 4) < 1.0
    # one of 40 layers plus the output matrix: well under the whole model, above one layer
    assert 1 / 40 < mtp_draft_cost(moe) < 0.5


def test_real_hf_configs_with_nested_text_config_and_defaults(tmp_path):
    """google/gemma-3-27b-it's config.json keeps the text model under text_config and leaves out what
    transformers fills in (vocab_size, max_position_embeddings, the 5:1 window pattern); DeepSeek-V3's
    parameter count needs MLA, dense first layers and the shared expert (671B, not 755B)."""
    import json

    gemma = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
             "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                             "model_type": "gemma3_text", "num_attention_heads": 32, "num_hidden_layers": 62,
                             "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
                             "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
             "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}
    path = tmp_path / "gemma" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(gemma))
    args = ["-m", "x", "-c", "32768", "-np", "1"]
    from_config = plan_memory(load_model(str(path)), parse_server_args(args))
    from_preset = plan_memory(load_model("gemma-3-27b"), parse_server_args(args))
    assert from_config.caches == from_preset.caches and from_config.output_bytes == from_preset.output_bytes
    deepseek = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                "first_k_dense_replace": 3, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "vocab_size": 129280}
    path = tmp_path / "deepseek.json"
    path.write_text(json.dumps(deepseek))
    arch = load_model(str(path))
    assert "~671.25B params" in arch.weights_note
