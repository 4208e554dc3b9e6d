"""Issue #22 item 4: presets carry their GGUF's tensor listing, so weights per device are placed tensor by tensor
(plan/weights.py, the path a real GGUF takes) without the file.

Each listing (params/models/<id>.tensors.tsv) is derived by tools/preset_tensors.py from the pinned llama-quantize's
rules; the figures checked here are what public llama.cpp logs of those files print (cited in each listing's
'check' line): type counts, `file size` / `model size`, and for gpt-oss-20b the per-buffer sizes of a real
`-ngl 99 --n-cpu-moe 99` run. Pure planning: no server is started, except the bundled Gemma 3 270M whose real
header is compared with the rules' derivation.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from kvbook import cli
from kvbook.errors import ModelError
from kvbook.model.preset_tensors import listing_path, read_listing
from kvbook.model.sources import load_model
from kvbook.paths import params_dir
from kvbook.testing.synthetic import synthetic_tensors

MiB, GiB = 2**20, 2**30
MODELS = params_dir() / "models"
LISTED = sorted(p.name.removesuffix(".tensors.tsv") for p in MODELS.glob("*.tensors.tsv"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import preset_tensors as tool  # noqa: E402

# What public logs of the cited files print (see each listing's 'check' line): ggml type counts, and the size
# print_info / llm_load_print_meta rounds (GiB, with its number of decimals)
LOGGED = {
    "gpt-oss-20b": ({"F32": 289, "Q8_0": 98, "MXFP4": 72}, 11.27, 2),  # ikawrakow/ik_llama.cpp #822
    "gpt-oss-120b": ({"F32": 433, "Q8_0": 146, "MXFP4": 108}, 59.02, 2),  # LM Studio log, lmstudio-community
    "deepseek-v3": ({"F32": 361, "Q5_0": 61, "Q4_K": 606, "Q6_K": 58}, 376.710, 3),  # ik_llama.cpp #383
    "qwen3-30b-a3b": ({"F32": 241, "Q4_K": 289, "Q6_K": 49}, 17.28, 2),  # ggml-org/llama.cpp #14235
    "qwen3-next-80b-a3b": ({"F32": 313, "F16": 48, "Q4_K": 391, "Q6_K": 55}, 45.08, 2),  # lmstudio-bug-tracker #1266
    "llama-3.1-8b": ({"F32": 66, "Q4_K": 193, "Q6_K": 33}, 4.58, 2),  # an ollama llama3.1:8b log
}
# presets whose cited file is a publisher's own mix: the listing is plain Q4_K_M and falls short of the file by
# at most this fraction (the YAML says weights.exact: false, and the plan says "approximate")
SHORT_OF_FILE = {"qwen3.5-27b": 0.013, "qwen3.6-35b-a3b": 0.045, "qwen3.6-35b-a3b-mtp": 0.045}


def _counts(arch) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in arch.tensors:
        out[t.ggml_type] = out.get(t.ggml_type, 0) + 1
    return out


def test_every_large_preset_has_a_listing():
    assert set(LISTED) == {p.stem for p in MODELS.glob("*.yaml")} - {"smollm2-135m", "gemma3-270m"}


@pytest.mark.parametrize("model", sorted(LOGGED))
def test_listing_reproduces_the_logged_file(model):
    arch = load_model(model)
    counts, size, decimals = LOGGED[model]
    assert _counts(arch) == counts
    assert round(arch.weights_bytes / GiB, decimals) == size
    assert arch.weights_exact and arch.weights_bytes == sum(t.nbytes for t in arch.tensors)
    file_bytes = yaml.safe_load((MODELS / f"{model}.yaml").read_text())["weights"].get("file_bytes")
    if file_bytes:  # the rest of the file is its header: metadata and the vocabulary (MBs, never GBs)
        assert 4 * MiB < file_bytes - arch.weights_bytes < 16 * MiB


@pytest.mark.parametrize("model", sorted(SHORT_OF_FILE))
def test_publisher_mix_is_labelled_and_scaled_to_the_file(model):
    """A plain Q4_K_M listing falls short of a publisher's own mix; its tensors are scaled to the cited file's
    size, so a plan never counts less than the file (as the file size alone did before), and it says so."""
    arch = load_model(model)
    listing = read_listing(listing_path(MODELS / f"{model}.yaml"))
    weights = yaml.safe_load((MODELS / f"{model}.yaml").read_text())["weights"]
    file_bytes = weights.get("file_bytes") or weights["approx_file_bytes"]
    assert 0 < 1 - sum(t.nbytes for t in listing.tensors) / file_bytes < SHORT_OF_FILE[model]
    assert 0 <= file_bytes - arch.weights_bytes < len(arch.tensors)  # each tensor rounded down
    assert not arch.weights_exact and arch.weights_note.startswith("approximate") and "scaled" in arch.weights_note


@pytest.mark.parametrize("model", LISTED)
def test_listing_has_the_loaders_tensors(model):
    """Names and shapes are those the pinned loader creates for the preset's metadata (the synthetic writer, which
    test_synthetic loads in llama.cpp), plus the variants the listing's header names."""
    listing = read_listing(listing_path(MODELS / f"{model}.yaml"))
    meta = yaml.safe_load((MODELS / f"{model}.yaml").read_text())["metadata"]
    expected = synthetic_tensors(meta)
    header = " ".join(listing.header)
    if "--legacy-qkvz" in header:
        expected = tool.legacy_qkvz(expected)
    if "--add rope_freqs.weight=64" in header:
        expected.append(("rope_freqs.weight", (64,)))
    assert sorted((t.name, t.shape) for t in listing.tensors) == sorted(expected)
    assert [t.name for t in listing.tensors] == sorted((t.name for t in listing.tensors), key=tool.order_key)
    assert listing.kind == "derived" and any(h.startswith("check: ") and len(h) > 40 for h in listing.header)


def plan(capsys, device: list[str], *server: str) -> dict:
    code = cli.main(["plan", "--json", *device, "--", "llama-server", *server])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def weights(doc: dict) -> dict[str, int]:
    return {d["name"]: d["weights_bytes"] for d in doc["devices"]}


def test_gpt_oss_20b_n_cpu_moe_matches_the_logged_buffers(capsys):
    """ik_llama.cpp issue #822 (llama.cpp b6699, RTX 3070 8 GB): `-ngl 99 --n-cpu-moe 99 -c 131072 -fa on` logs
    CUDA0 model buffer 1242.03 MiB (the output layer, Q8_0, is on the GPU) and CPU_Mapped 10949.33 MiB."""
    doc = plan(capsys, ["--gpu-gib", "8", "--host-gib", "32"], "-m", "gpt-oss-20b", "-ngl", "99", "--n-cpu-moe", "99",
               "-c", "131072", "-fa", "on", "-np", "1")
    w = weights(doc)
    assert abs(w["CUDA0"] / MiB - 1242.03) < 0.05  # CUDA pads a few rows of quantized tensors (KiBs)
    assert round(w["CPU"] / MiB, 2) == 10949.33
    assert doc["weights_exact"] and doc["verdict"] == "fits"


def test_deepseek_v3_cpu_moe_fits_a_4090(capsys):
    """The usual 24 GB recipe: every layer on the GPU, routed experts in RAM. What stays on the GPU (MLA attention,
    3 dense FFNs, shared experts, output) is about 9.3 GiB at Q4_K_M, not the 32.89 GiB the shape estimate gave."""
    doc = plan(capsys, ["--device", "rtx-4090", "--host-gib", "512"], "-m", "deepseek-v3", "-ngl", "999",
               "--cpu-moe", "-c", "32768", "-fa", "on", "-np", "1")
    w = weights(doc)
    gpu = next(n for n in w if n != "CPU")
    assert 9 * GiB < w[gpu] < 10 * GiB
    assert doc["verdict"] == "fits"


def test_qwen36_experts_on_cpu_gpu_share(capsys):
    """Qwen3.6-35B-A3B with `-ot exps=CPU`: the GPU holds attention, delta-net, shared experts and the output
    (785 MiB by the shape estimate); the listing is plain Q4_K_M scaled to unsloth's UD file, and the plan says the
    weights are approximate."""
    doc = plan(capsys, ["--device", "rtx-4090"], "-m", "qwen3.6-35b-a3b", "-ngl", "99", "-ot", "exps=CPU",
               "-c", "65536", "-fa", "on", "-np", "1")
    w = weights(doc)
    gpu = next(n for n in w if n != "CPU")
    assert 1.2 * GiB < w[gpu] < 2 * GiB
    assert not doc["weights_exact"] and any(n["code"] == "weights.approximate" and "approximate" in n["text"] for n in doc["notes"])


def test_rules_reproduce_a_real_header(gemma3):
    """The derivation (tools/preset_tensors.py quant_types) against a real Q4_K_M header, tensor by tensor: the
    bundled Gemma 3 270M, read by kvbook's GGUF reader."""
    from kvbook.model.sources import load_gguf

    real = load_gguf(gemma3)
    tensors = [(t.name, t.shape) for t in real.tensors]
    assert [n for n, _ in tensors] == sorted((n for n, _ in tensors), key=tool.order_key)  # llama-quantize's order
    derived = tool.quant_types(tensors, "Q4_K_M", real.n_layer, real.n_expert, [])
    assert [(t.name, t.ggml_type) for t in real.tensors] == [(n, t) for (n, _), t in zip(tensors, derived)]


@pytest.mark.parametrize("model, flags", [
    ("gpt-oss-20b", ("-c", "8192", "-np", "1", "-ngl", "all", "--n-cpu-moe", "99", "-fa", "on")),
    ("deepseek-v3", ("-c", "4096", "-np", "1", "-ngl", "all", "--cpu-moe", "-fa", "on")),
    ("qwen3-next-80b-a3b", ("-c", "8192", "-np", "1", "-ngl", "20", "-fa", "on")),
])
def test_listing_as_a_file_is_placed_by_llama_cpp_as_planned(tmp_path, rpc_endpoints, model, flags):
    """The listing written as a sparse GGUF (write_listed_gguf) reads back tensor for tensor (so the preset plans as
    that file does), and the pinned llama-fit-params over a loopback RPC device puts on each device the weights
    kvbook plans, to its whole MiB (ops/fit_devices.py)."""
    from kvbook.model.sources import load_gguf
    from kvbook.ops.fit_devices import compare_devices
    from kvbook.testing.synthetic import write_listed_gguf

    preset = load_model(model)
    meta = yaml.safe_load((MODELS / f"{model}.yaml").read_text())["metadata"]
    path = write_listed_gguf(meta, tmp_path / f"{model}.gguf", [(t.name, t.shape, t.ggml_type) for t in preset.tensors])
    key = lambda t: (t.name, t.ggml_type, t.shape, t.nbytes, t.offset)  # noqa: E731
    assert [key(t) for t in load_gguf(path).tensors] == [key(t) for t in preset.tensors]
    case = compare_devices(path, rpc_endpoints[:1], flags)
    assert case.log_complete and [d.fit.name for d in case.devices] == ["RPC0", "Host"]
    for d in case.devices:
        assert d.weights_exact, (d.fit, d.weights_bytes / MiB)
    path.unlink()


@pytest.mark.parametrize("line, message", [
    ("blk.0.attn_q.weight\tQ4_K", "expected 'name<TAB>type<TAB>ne0,ne1,...'"),
    ("blk.0.attn_q.weight\tQ9_X\t256,256", "unknown ggml type 'Q9_X'"),
    ("blk.0.attn_q.weight\tQ4_K\t100,256", "ne0=100 is not a multiple of Q4_K's block of 256"),
    ("blk.0.attn_q.weight\tQ4_K\t256,0", "bad shape"),
])
def test_bad_listing_is_one_clear_error(tmp_path, line, message):
    path = tmp_path / "m.tensors.tsv"
    path.write_text(f"# derived: test\n{line}\n")
    with pytest.raises(ModelError, match=re.escape("m.tensors.tsv:2: " + message)):
        read_listing(path)
