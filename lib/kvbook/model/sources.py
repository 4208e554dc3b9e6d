"""Turn what the user passes as `-m` (GGUF path, GGUF URL, preset name, config.json) into a ModelArch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput, ModelError
from kvbook.interface import ModelArch, TensorInfo
from kvbook.model.arch import arch_from_metadata
from kvbook.model.gguf_header import tensor_group
from kvbook.model.ggufio import is_gguf_file, read_local, read_remote, split_shard_urls, split_shards
from kvbook.model.preset_tensors import PresetListing, listing_path, read_listing
from kvbook.paths import params_dir
from kvbook.paths import preset_ids as preset_ids_of
from kvbook.yamlio import read_yaml

DEFAULT_BPW = 4.85  # Q4_K_M average bits per weight, used only for config.json estimates


def preset_ids() -> list[str]:
    return preset_ids_of("models")


def load_model(spec: str) -> ModelArch:
    """Resolve `-m`: an http(s) URL, a local GGUF, a config.json, a preset YAML, or a preset id."""
    if not spec or not spec.strip():
        raise BadInput("model is empty: pass a GGUF path, a GGUF URL, a preset name or a config.json")
    if spec.startswith(("http://", "https://")):
        return fetch_hf_config(spec) if spec.split("?")[0].endswith(".json") else _from_remote(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return load_preset_file(path)
        if path.name.endswith(".json"):
            return load_hf_config(path)
        if is_gguf_file(path) or path.suffix == ".gguf":
            return load_gguf(path)
        raise ModelError(f"{spec}: not a GGUF file, config.json or preset YAML")
    preset = params_dir() / "models" / f"{spec}.yaml"
    if preset.is_file():
        return load_preset_file(preset)
    if path.suffix in (".gguf", ".json", ".yaml", ".yml") or os.sep in spec:
        raise BadInput(f"model file not found: {spec}")
    raise BadInput(f"unknown model '{spec}': not a file and not a preset. Presets: {', '.join(preset_ids())}")


def _ranges(headers: list[Any]) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    return tuple(tuple((g, a, b) for g, (a, b) in sorted(h.tensor_ranges.items())) for h in headers)


def _tensors(headers: list[Any]) -> tuple[TensorInfo, ...]:
    """Every tensor of every file (shard), in file order, as placement reads them."""
    return tuple(TensorInfo(name, ggml_type, tuple(shape), nbytes, i, offset)
                 for i, h in enumerate(headers) for name, ggml_type, shape, nbytes, offset in h.tensors)


def _merged(groups: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in groups:
        for k, v in g.items():
            out[k] = out.get(k, 0) + v
    return out


def load_gguf(path: Path) -> ModelArch:
    header = read_local(path)
    shards = split_shards(path, header.metadata)
    others = [read_local(shard) for shard in shards[1:]]
    tensor_bytes = header.tensor_bytes + sum(h.tensor_bytes for h in others)
    note = "exact: sum of tensor sizes in the GGUF" + (f" ({len(shards)} shards)" if len(shards) > 1 else "")
    return arch_from_metadata(
        header.metadata,
        name=str(header.metadata.get("general.name") or path.stem),
        source=str(path),
        weights_bytes=tensor_bytes,
        weights_exact=True,
        weights_note=note,
        n_vocab=_vocab(header.metadata, header.n_vocab),
        tensor_groups=_merged([header.tensor_groups, *(h.tensor_groups for h in others)]),
        tensor_ranges=_ranges([header, *others]),
        tensors=_tensors([header, *others]),
    )


def _from_remote(url: str) -> ModelArch:
    """A remote GGUF from its header alone; a split model's every shard header is read and summed."""
    header = read_remote(url)
    shards = split_shard_urls(url, header.metadata)
    others = [read_remote(u) for u in shards[1:]]
    tensor_bytes = header.tensor_bytes + sum(h.tensor_bytes for h in others)
    where = f"{len(shards)} remote shards' headers" if len(shards) > 1 else "the remote GGUF header"
    return arch_from_metadata(
        header.metadata,
        name=str(header.metadata.get("general.name") or url.rsplit("/", 1)[-1]),
        source=url,
        weights_bytes=tensor_bytes,
        weights_exact=True,
        weights_note=f"exact: sum of tensor sizes in {where}",
        n_vocab=_vocab(header.metadata, header.n_vocab),
        tensor_groups=_merged([header.tensor_groups, *(h.tensor_groups for h in others)]),
        tensor_ranges=_ranges([header, *others]),
        tensors=_tensors([header, *others]),
    )


def _vocab(meta: dict[str, Any], n_tokens: int | None) -> int | None:
    arch = meta.get("general.architecture")
    explicit = meta.get(f"{arch}.vocab_size")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    return n_tokens


def load_preset_file(path: Path) -> ModelArch:
    doc = read_yaml(path, "the model preset")
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        raise ModelError(f"{path}: a preset needs a 'metadata' mapping of GGUF keys")
    weights = doc.get("weights") or {}
    if listing_path(path).is_file():
        return _preset_with_tensors(path, doc, read_listing(listing_path(path)))
    if "file_bytes" in weights:
        wbytes = int(weights["file_bytes"])
        note = f"approximate: GGUF file size ({weights.get('source', 'cited in the preset')})"
    elif "params" in weights and "bits_per_weight" in weights:
        wbytes = int(float(weights["params"]) * float(weights["bits_per_weight"]) / 8)
        note = f"approximate: {float(weights['params']):.3g} params x {weights['bits_per_weight']} bits per weight"
    else:
        raise ModelError(f"{path}: preset weights need file_bytes, or params and bits_per_weight")
    return arch_from_metadata(
        doc["metadata"],
        name=str(doc.get("name") or path.stem),
        source=f"preset:{path.stem}",
        weights_bytes=wbytes,
        weights_exact=False,
        weights_note=note,
    )


def _preset_with_tensors(path: Path, doc: dict[str, Any], listing: PresetListing) -> ModelArch:
    """A preset whose tensor listing (preset_tensors.py) is placed tensor by tensor, as its GGUF would be. The
    weights are exact where the listing reproduces the file (its 'check' line cites the log); `weights.exact: false`
    marks one that does not (a publisher's own quant mix): its tensors are then scaled to the cited file size
    (`file_bytes`, or `approx_file_bytes` when only a rounded size is known), so that the total is never below the
    file's and each device gets its share (labelled)."""
    weights = doc.get("weights") or {}
    tensors = listing.tensors
    total = sum(t.nbytes for t in tensors)
    exact = bool(weights.get("exact", True))
    what = f"{len(tensors)} tensors from {listing_path(path).name} ({listing.kind}"
    if exact:
        note = f"exact: {what}, checked against a public log of the file)"
    elif int(weights.get("file_bytes", weights.get("approx_file_bytes", 0))) > total:
        file_bytes = int(weights.get("file_bytes", weights.get("approx_file_bytes", 0)))
        tensors = _scaled(tensors, file_bytes, total)
        about = "" if "file_bytes" in weights else "about "
        note = (f"approximate: {what}; the cited file's own per-tensor mix is not public, so each tensor is scaled "
                f"x{file_bytes / total:.3f} to its {about}{file_bytes:,} B)")
    else:
        note = f"approximate: {what}; no exact size of the cited file is known)"
    groups: dict[str, int] = {}
    ranges: dict[str, list[int]] = {}
    for t in tensors:
        key = tensor_group(t.name)
        groups[key] = groups.get(key, 0) + t.nbytes
        first, end = ranges.get(key, [t.offset, t.offset])
        ranges[key] = [min(first, t.offset), max(end, t.offset + t.nbytes)]
    return arch_from_metadata(
        doc["metadata"],
        name=str(doc.get("name") or path.stem),
        source=f"preset:{path.stem}",
        weights_bytes=sum(t.nbytes for t in tensors),
        weights_exact=exact,
        weights_note=note,
        tensor_groups=groups,
        tensor_ranges=(tuple((g, a, b) for g, (a, b) in sorted(ranges.items())),),
        tensors=tensors,
    )


def _scaled(tensors: tuple[TensorInfo, ...], to: int, total: int) -> tuple[TensorInfo, ...]:
    """Every tensor's bytes x to/total (offsets follow, each 32-byte aligned as in the file)."""
    out, offset = [], 0
    for t in tensors:
        nbytes = t.nbytes * to // total
        out.append(TensorInfo(t.name, t.ggml_type, t.shape, nbytes, t.file, offset))
        offset += -(-nbytes // 32) * 32
    return tuple(out)


# ---------------------------------------------------------------- Hugging Face config.json

_HF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gpt_oss": "gpt-oss",
    "qwen3_next": "qwen3next",
    "qwen3_5": "qwen35",
    "qwen3_5_text": "qwen35",
    "qwen3_5_moe": "qwen35moe",
    "qwen3_5_moe_text": "qwen35moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}


# What transformers fills in when a config.json leaves a field out (each model type's config class
# defaults): the real Gemma 3 configs carry no vocab_size, max_position_embeddings or window pattern.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {"vocab_size": 262208, "max_position_embeddings": 131072, "sliding_window": 4096,
                    "sliding_window_pattern": 6, "head_dim": 256, "num_key_value_heads": 4,
                    "rms_norm_eps": 1e-6},
    "gemma3": {"vocab_size": 262208, "max_position_embeddings": 131072, "sliding_window": 4096,
               "sliding_window_pattern": 6, "head_dim": 256, "num_key_value_heads": 4, "rms_norm_eps": 1e-6},
}


def hf_to_metadata(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Map a transformers config.json to the GGUF keys llama.cpp's converter would write; a multimodal
    config's text model (`text_config`) is the one planned, with its class defaults filled in."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    cfg = {**_HF_DEFAULTS.get(str(cfg.get("model_type")), {}), **cfg}
    model_type = cfg.get("model_type")
    arch = _HF_ARCH.get(str(model_type))
    if arch is None:
        raise ModelError(f"{source}: model_type '{model_type}' has no mapping; supported: {', '.join(sorted(_HF_ARCH))}")

    def need(key: str) -> Any:
        if key not in cfg:
            raise ModelError(f"{source}: config.json lacks '{key}' needed for model_type {model_type}")
        return cfg[key]

    n_head = int(need("num_attention_heads"))
    n_embd = int(need("hidden_size"))
    n_layer = int(need("num_hidden_layers"))
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    meta: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.block_count": n_layer,
        f"{arch}.context_length": int(need("max_position_embeddings")),
        f"{arch}.embedding_length": n_embd,
        f"{arch}.feed_forward_length": int(cfg.get("intermediate_size") or 0),
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": int(cfg.get("num_key_value_heads") or n_head),
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.vocab_size": int(need("vocab_size")),
    }
    n_expert = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    if n_expert:
        meta[f"{arch}.expert_count"] = int(n_expert)
        meta[f"{arch}.expert_used_count"] = int(cfg.get("num_experts_per_tok") or 0)
        meta[f"{arch}.expert_feed_forward_length"] = int(cfg.get("moe_intermediate_size") or need("intermediate_size"))
    if cfg.get("sliding_window") and arch in ("gemma2", "gemma3", "gpt-oss"):
        meta[f"{arch}.attention.sliding_window"] = int(cfg["sliding_window"])
        layer_types = cfg.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == n_layer:
            meta[f"{arch}.attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        elif cfg.get("sliding_window_pattern"):
            meta[f"{arch}.attention.sliding_window_pattern"] = int(cfg["sliding_window_pattern"])
    if arch in ("qwen3next", "qwen35", "qwen35moe"):
        n_mtp = int(cfg.get("mtp_num_hidden_layers") or 0)
        meta[f"{arch}.block_count"] = n_layer + n_mtp
        meta[f"{arch}.nextn_predict_layers"] = n_mtp
        meta[f"{arch}.full_attention_interval"] = int(cfg.get("full_attention_interval") or 4)
        meta[f"{arch}.ssm.conv_kernel"] = int(need("linear_conv_kernel_dim"))
        meta[f"{arch}.ssm.state_size"] = int(need("linear_key_head_dim"))
        meta[f"{arch}.ssm.group_count"] = int(need("linear_num_key_heads"))
        meta[f"{arch}.ssm.time_step_rank"] = int(need("linear_num_value_heads"))
        meta[f"{arch}.ssm.inner_size"] = int(need("linear_value_head_dim")) * int(need("linear_num_value_heads"))
    if arch == "deepseek2":
        rope = int(need("qk_rope_head_dim"))
        kv_lora = int(need("kv_lora_rank"))
        meta[f"{arch}.attention.head_count_kv"] = 1
        meta[f"{arch}.attention.key_length"] = kv_lora + rope
        meta[f"{arch}.attention.value_length"] = kv_lora
        meta[f"{arch}.attention.key_length_mla"] = int(need("qk_nope_head_dim")) + rope
        meta[f"{arch}.attention.value_length_mla"] = int(need("v_head_dim"))
        meta[f"{arch}.attention.kv_lora_rank"] = kv_lora
        meta[f"{arch}.leading_dense_block_count"] = int(cfg.get("first_k_dense_replace") or 0)
        meta[f"{arch}.expert_shared_count"] = int(cfg.get("n_shared_experts") or 0)
        if cfg.get("q_lora_rank"):
            meta[f"{arch}.attention.q_lora_rank"] = int(cfg["q_lora_rank"])
    return meta


def _mla_attention_params(g: Any, n_embd: int, n_head: int) -> int:
    """Multi-head latent attention (DeepSeek): low-rank Q, the shared KV latent, its up-projection, output."""
    q_lora, kv_lora = g("attention.q_lora_rank"), g("attention.kv_lora_rank")
    rope = g("rope.dimension_count")
    qk, v = g("attention.key_length_mla"), g("attention.value_length_mla")
    q = n_embd * q_lora + q_lora * n_head * qk if q_lora else n_embd * n_head * qk
    kv = n_embd * (kv_lora + rope) + kv_lora * n_head * (qk - rope + v)
    return int(q + kv + n_head * v * n_embd)


def estimate_params(meta: dict[str, Any]) -> int:
    """A rough parameter count from shapes (attention, dense FFN or routed + shared experts, embeddings);
    for labelled estimates only."""
    arch = meta["general.architecture"]

    def g(key: str, default: Any = 0) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_embd, n_layer, vocab = g("embedding_length"), g("block_count"), g("vocab_size")
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    if g("attention.kv_lora_rank"):
        attn = _mla_attention_params(g, n_embd, n_head)
    else:
        hk = g("attention.key_length", n_embd // max(n_head, 1))
        attn = n_embd * hk * (2 * n_head + 2 * (n_kv if isinstance(n_kv, int) else n_head))
    ff = g("feed_forward_length")
    dense = 3 * n_embd * (max(ff) if isinstance(ff, list) else ff)
    n_dense = g("leading_dense_block_count") if g("expert_count") else n_layer
    moe = 3 * n_embd * g("expert_feed_forward_length") * (g("expert_count") + g("expert_shared_count")) \
        + n_embd * g("expert_count")
    return int(n_layer * attn + n_dense * dense + (n_layer - n_dense) * moe + 2 * vocab * n_embd)


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config.json is a few KB


def fetch_hf_config(url: str, *, timeout: float = 30.0) -> ModelArch:
    """A config.json by URL (a hub's `resolve/main/config.json` or any server), at most 4 MiB read."""
    import requests

    try:
        with requests.get(url, timeout=timeout, stream=True) as resp:
            if resp.status_code != 200:
                raise ModelError(f"{url}: HTTP {resp.status_code} {resp.reason}")
            body = resp.raw.read(MAX_CONFIG_BYTES + 1, decode_content=True)
    except requests.RequestException as exc:
        raise ModelError(f"{url}: cannot fetch ({type(exc).__name__}: {exc})") from None
    if len(body) > MAX_CONFIG_BYTES:
        raise ModelError(f"{url}: larger than {MAX_CONFIG_BYTES} bytes; that is not a config.json")
    return _from_config_text(body.decode("utf-8", errors="replace"), url, url.rstrip("/").rsplit("/", 2)[-2])


def load_hf_config(path: Path, bits_per_weight: float = DEFAULT_BPW) -> ModelArch:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelError(f"{path}: not a readable config.json ({type(exc).__name__})") from None
    return _from_config_text(text, str(path), path.parent.name, bits_per_weight)


def _from_config_text(text: str, source: str, folder: str, bits_per_weight: float = DEFAULT_BPW) -> ModelArch:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source}: not a readable config.json ({type(exc).__name__})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{source}: config.json must hold a JSON object")
    meta = hf_to_metadata(cfg, source)
    params = estimate_params(meta)
    return arch_from_metadata(
        meta,
        name=str(cfg.get("_name_or_path") or folder),
        source=source,
        weights_bytes=int(params * bits_per_weight / 8),
        weights_exact=False,
        weights_note=f"approximate: ~{params / 1e9:.2f}B params estimated from config.json x {bits_per_weight} bits per weight",
    )
