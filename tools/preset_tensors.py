"""Write a preset's tensor listing (params/models/<id>.tensors.tsv) from llama.cpp's own rules, and check it.

    python tools/preset_tensors.py ID --ftype Q4_K_M|MXFP4_MOE [--type REGEX=TYPE ...] [--source TEXT] [--check TEXT]
    python tools/preset_tensors.py ID --verify      # print the listing's totals against the preset's file size

The names and shapes are the tensors llama.cpp's loader creates for the preset's metadata
(kvbook.testing.synthetic, from the pinned src/models/<arch>.cpp). The types are those the pinned
llama-quantize gives each tensor for the file type (src/llama-quant.cpp llama_tensor_get_type: the
ftype's default type, its per-category rules, the shape fallbacks); `--type` adds the per-tensor
overrides a publisher used (llama-quantize --tensor-type), checked against that file's logged type counts.
The order is llama-quantize's (llama_model_loader::weight_name_comparer: tensors outside blocks, then
block by block, each by name), which decides the CPU_Mapped range. A listing made so is labelled
"derived"; one copied from a real header dump is labelled "listing".
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from kvbook.model.preset_tensors import listing_path, read_listing, write_listing  # noqa: E402
from kvbook.testing.synthetic import synthetic_tensors  # noqa: E402

BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "MXFP4": 32,
         "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def order_key(name: str) -> tuple[int, str]:
    """llama_model_loader::weight_name_comparer: the block index (-1 outside blocks), then the name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quant.cpp tensor_allows_quantization, the parts that touch these architectures."""
    n_dims = max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)
    if n_dims < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(s in name for s in ("ffn_gate_inp.weight", "ssm_conv1d", "position_embd"))


def category(name: str) -> str:
    """llama-quant.cpp tensor_get_category (substring tests, in its order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_types(tensors: list[tuple[str, tuple[int, ...]]], ftype: str, n_layer_all: int, n_expert: int,
                overrides: list[tuple[re.Pattern[str], str]]) -> list[str]:
    """llama_tensor_get_type for each tensor (in file order, as its counters run) for Q4_K_M or MXFP4_MOE."""
    tied = not any(n == "output.weight" for n, _ in tensors)
    n_wv = sum(category(n) == "attn_v" for n, _ in tensors)
    i_wv = i_down = 0
    out = []
    for name, ne in tensors:
        cat = category(name)
        manual = next((t for rx, t in overrides if rx.search(name)), None)
        if not allows_quantization(name, ne):
            out.append(manual or "F32")  # the converter keeps norms, biases, routers and convolutions in f32
            continue
        t = manual or ("Q4_K" if ftype == "Q4_K_M" else "MXFP4")
        if manual is None:
            if cat == "output" or (tied and cat == "token_embd"):
                t = "Q8_0" if ftype == "MXFP4_MOE" or ne[0] % BLOCK[t] else "Q6_K"
            elif ftype == "MXFP4_MOE":
                t = "MXFP4" if len(ne) > 2 and ne[2] > 1 else "Q8_0"
            elif cat == "attn_v":
                if use_more_bits(i_wv, n_wv):
                    t = "Q6_K"
                if n_expert == 8:
                    t = "Q8_0"
            elif cat == "attn_k" and n_expert == 8:
                t = "Q8_0"
            elif cat == "ffn_down":
                il = int(name.split(".")[1]) if n_expert > 1 else i_down
                if use_more_bits(il, n_layer_all):
                    t = "Q6_K"
            elif cat == "attn_output" and n_expert == 8:
                t = "Q5_K"
        if cat == "attn_v":
            i_wv += 1
        if cat == "ffn_down":
            i_down += 1
        if ne[0] % BLOCK[t]:  # tensor_type_fallback
            t = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(t, t)
            if ne[0] % BLOCK[t]:
                t = "F16"
        out.append(t)
    return out


def legacy_qkvz(tensors: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """attn_qkv + attn_gate of a delta-net layer as the one ssm_in (in_proj_qkvz) older qwen3next files hold."""
    out, gate = [], {n: ne for n, ne in tensors if n.endswith(".attn_gate.weight")}
    for name, ne in tensors:
        if name.endswith(".attn_gate.weight"):
            continue
        if name.endswith(".attn_qkv.weight"):
            g = gate[name.replace("attn_qkv", "attn_gate")]
            out.append((name.replace("attn_qkv", "ssm_in"), (ne[0], ne[1] + g[1])))
            continue
        out.append((name, ne))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("id")
    ap.add_argument("--ftype", choices=("Q4_K_M", "MXFP4_MOE"))
    ap.add_argument("--type", action="append", default=[], help="REGEX=TYPE, a publisher's --tensor-type override")
    ap.add_argument("--add", action="append", default=[], help="NAME=NE0,NE1..: a tensor the file has beyond the "
                    "loader's required ones (rope_freqs.weight of Llama 3.1)")
    ap.add_argument("--legacy-qkvz", action="store_true", help="qwen3next files converted before attn_qkv/attn_gate: "
                    "one fused ssm_in per delta-net layer (the pinned loader accepts both)")
    ap.add_argument("--source", default="", help="what the listing is derived from, with citations")
    ap.add_argument("--check", default="", help="what the totals were checked against")
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    preset = ROOT / "params" / "models" / f"{args.id}.yaml"
    doc = yaml.safe_load(preset.read_text())
    if args.verify:
        listing = read_listing(listing_path(preset))
        total = sum(t.nbytes for t in listing.tensors)
        counts: dict[str, int] = {}
        for t in listing.tensors:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        print(f"{len(listing.tensors)} tensors, {total:,} B of tensor data ({total / 2**30:.3f} GiB); types: {counts}")
        print(f"padded data {listing.data_bytes:,} B; preset file_bytes {doc['weights'].get('file_bytes', 'none')}")
        return 0
    meta = doc["metadata"]
    arch = meta["general.architecture"]
    tensors = synthetic_tensors(meta)
    if args.legacy_qkvz:
        tensors = legacy_qkvz(tensors)
    for spec in args.add:
        name, dims = spec.split("=")
        tensors.append((name, tuple(int(x) for x in dims.split(","))))
    tensors = sorted(tensors, key=lambda t: order_key(t[0]))
    overrides = [(re.compile(p), t) for p, t in (s.rsplit("=", 1) for s in args.type)]
    types = quant_types(tensors, args.ftype, int(meta[f"{arch}.block_count"]), int(meta.get(f"{arch}.expert_count", 0)),
                        overrides)
    extra = (["--legacy-qkvz"] if args.legacy_qkvz else []) + [f"--add {a}" for a in args.add] + \
        [f"--type {t}" for t in args.type]
    header = [f"derived: llama-quantize {args.ftype} rules of the pinned build (src/llama-quant.cpp "
              f"llama_tensor_get_type) on the tensors src/models/<arch>.cpp creates for this metadata"
              + (f"; tool options {' '.join(extra)}" if extra else ""),
              f"source: {args.source}", f"check: {args.check}"]
    path = write_listing(listing_path(preset), header, [(n, t, ne) for (n, ne), t in zip(tensors, types)])
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
