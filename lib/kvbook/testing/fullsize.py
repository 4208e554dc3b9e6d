"""Full-size synthetic GGUFs of three reference models with a quant mix close to the published files, for
checking kvbook's per-device plans against llama.cpp's own accounting (llama-fit-params over RPC devices).

The metadata is the bundled preset's (params/models/<id>.yaml); the data region is a hole (testing/synthetic.py),
so even DeepSeek-V3's 400 GB cost a few MiB of disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from gguf import GGMLQuantizationType as T

from kvbook.paths import params_dir
from kvbook.testing.synthetic import write_synthetic_gguf


@dataclass(frozen=True)
class FullSize:
    """A preset and the quant mix that brings its synthetic file near the published size (`target_bytes`)."""

    preset: str
    weight_type: T
    overrides: tuple[tuple[str, T], ...]
    target_bytes: int
    note: str


FULL_SIZE: dict[str, FullSize] = {
    # unsloth UD-Q4_K_M: 22,134,528,992 B (model-facts.md 1.3); this mix gives 22,128,200,192 B of tensors
    "qwen3.6-35b-a3b": FullSize("qwen3.6-35b-a3b", T.Q4_K,
                                ((r"ffn_down_exps", T.Q5_K), (r"token_embd|output\.|attn|ssm|shexp", T.Q8_0)),
                                22_134_528_992, "Q4_K experts, Q5_K down experts, Q8_0 elsewhere (UD-Q4_K_M-like)"),
    # ggml-org MXFP4: 63,387,346,208 B (model-facts.md 2); MXFP4 experts, Q8_0 elsewhere: 63,374,323,968 B
    "gpt-oss-120b": FullSize("gpt-oss-120b", T.Q8_0, ((r"_exps", T.MXFP4),), 63_387_346_208,
                             "MXFP4 experts, Q8_0 elsewhere"),
    # Q4_K_M about 404 GB (model-facts.md 2, UNVERIFIED); Q4_K with Q6_K ffn_down in even layers
    # (llama-quant.cpp's use_more_bits gives about half the layers more bits)
    "deepseek-v3": FullSize("deepseek-v3", T.Q4_K, ((r"blk\.\d*[02468]\.ffn_down", T.Q6_K),), 404_000_000_000,
                            "Q4_K, Q6_K ffn_down in even layers (Q4_K_M-like)"),
}


def preset_metadata(preset: str) -> dict:
    """The GGUF metadata of a bundled preset."""
    return yaml.safe_load((params_dir() / "models" / f"{preset}.yaml").read_text())["metadata"]


def write_full_size(name: str, folder: Path) -> Path:
    """Write the full-size synthetic GGUF `name` (a FULL_SIZE key) into `folder` as a sparse file."""
    spec = FULL_SIZE[name]
    return write_synthetic_gguf(preset_metadata(spec.preset), Path(folder) / f"{name}.gguf", spec.weight_type,
                                spec.overrides)
