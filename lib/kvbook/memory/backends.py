"""Compute buffers on GPU backends (CUDA, ROCm, Metal, Vulkan, SYCL): the device's own and the host-side one
(`CUDA_Host`, `Vulkan_Host`, the CPU beside Metal), from llama.cpp's graph rules, with each backend's measured
spread over real public logs as a low/high interval. Plans use the high end.

What the rules say (llama-context.cpp sched_reserve / graph_reserve, ggml-backend.cpp's scheduler, ggml-alloc):
- every graph input (tokens, positions, the KQ masks, out_ids) is a CPU-backend tensor, so it lives in the host-side
  buffer (the GPU's pinned host buffer type when there is one): the masks are n_kv x n_ubatch per attention cache,
  f16 under flash attention in builds with ggml-org/llama.cpp#23764, f32 before it (cast to f16 on the device);
- the token embeddings stay on the CPU, so get_rows puts one ubatch of the residual stream (f32 n_embd) there and
  the device receives a copy; builds with ggml-org/llama.cpp#18898 (llama-graph.cpp build_inp_embd: `inp_embd`, the
  vector-embeddings path every graph now carries beside the token path) add one more f32 n_embd x n_ubatch input
  there (host side: 2 x the residual stream from b7800, 1 before; logs b6699/b7342 vs b8110 on); the mixed
  tokens+embeddings path (`has_mixed` there: `inp_mixed_embd` and its ggml_dup copy, in the pinned build, not in b9849)
  adds two more (4 x in all: lavapipe runs of the pinned build, corpus 062);
- the device holds each layer's activations and, without flash attention, the f32 KQ scores; ggml-alloc frees a
  tensor after its last use, so the logits (f32 n_vocab x reserved output rows: n_ubatch before
  ggml-org/llama.cpp#23861, min(n_ubatch, slots) since) reuse the layers' memory: the buffer is the larger of the two;
- experts kept on the CPU (--n-cpu-moe, -ot exps=CPU) run there: the host-side buffer holds their activations.
The coefficients per backend (data/backend_compute.json) are fitted by tools/fit_backend_compute.py over the logs
in tests/data/logs; `low`/`high` are the smallest and largest logged/estimated ratios there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from statistics import median
from typing import Any

from kvbook.interface import ComputeCalibration, ModelArch
from kvbook.memory.compute import activation_width
from kvbook.memory.xp import PY

GPU_BACKENDS = ("CUDA", "ROCm", "Metal", "Vulkan", "SYCL")
_FAMILY = {"CUDA": "CUDA", "ROCm": "ROCm", "HIP": "ROCm", "MTL": "Metal", "Metal": "Metal", "Vulkan": "Vulkan",
           "SYCL": "SYCL", "RPC": "RPC", "CPU": "CPU", "Host": "CPU", "Budget": "CPU"}


def backend_of(name: str) -> str:
    """The backend of a device or buffer name as llama.cpp prints it: CUDA0 -> CUDA, MTL0 / Metal -> Metal,
    Vulkan_Host -> Vulkan, RPC0[host:port] -> RPC, CPU_Mapped -> CPU."""
    base = name.split("[", 1)[0].split(" ", 1)[0]
    for suffix in ("_Mapped", "_REPACK", "_Host", "_Split"):
        base = base.removesuffix(suffix)
    return _FAMILY.get(base.rstrip("0123456789"), "CPU")


@cache
def coefficients() -> dict[str, Any]:
    """The fitted per-backend coefficients and intervals (data/backend_compute.json, tools/fit_backend_compute.py)."""
    table: dict[str, Any] = json.loads(resources.files("kvbook").joinpath("data/backend_compute.json").read_text())
    return table


def backend_coefficients(backend: str) -> tuple[dict[str, Any], str]:
    """(coefficients, label) for a GPU backend; one without logs of its own borrows another's, said so."""
    table = coefficients()["backends"]
    if backend in table and table[backend].get("n_logs"):
        c = table[backend]
        if c.get("fitted_on", backend) != backend:  # too few logs of its own: every GPU log's coefficients
            return c, (f"{backend}: {c['n_logs']} public log(s), too few to fit: coefficients fitted on "
                       f"{c['fitted_on']}, interval widened to hold its own log(s)")
        return c, f"{backend}: fitted on {c['n_logs']} public log(s)"
    borrowed = coefficients()["borrow"].get(backend, "CUDA")
    if borrowed not in table:
        borrowed = next(iter(table))
    return table[borrowed], (f"{backend}: no public log measured; {borrowed}'s coefficients "
                             f"({table[borrowed].get('n_logs', 0)} log(s)) and interval")


@dataclass(frozen=True)
class DeviceCompute:
    """One backend's compute buffer: the estimate and the interval its backend's logs put around it."""

    estimate: int
    low: int
    high: int
    note: str


def gpu_device_bytes(t: Mapping[str, Any], c: Mapping[str, float], mask_input: Any, xp: Any = PY) -> Any:
    """A GPU device's buffer from its graph terms (kvbook.plan.placement.compute_terms): the residual stream copied
    in, then the largest of the layers' work (the masks as copied in, their f16 cast in builds that feed f32 masks to
    flash attention, activations, scores, CPU weights copied for op offload), the logits with what feeds them, and,
    in builds that feed f32 masks to flash attention, the cast itself: ggml_cast's f32 source copied in and its f16
    result are live together while it runs (llama-graph.cpp build_attn_inp_kv: self_kq_mask_cnv), before any layer;
    ggml-alloc frees the f32 copy after its one use (ggml-alloc.c ggml_gallocr_free_node once n_children is 0)."""
    cast = (mask_input - t["mask"]) // 1  # the f16 cast is as large as the f16 mask (f32 input: twice it)
    layers = (c["mask"] * mask_input + cast + c["act"] * t["act"] + c["scores"] * t["scores"]
              + c.get("wcopy", 0.0) * t.get("wcopy", 0))
    out = (t["logits"] + c["out"] * t["act"]) * (t["logits"] > 0)
    casting = (mask_input + cast) * (cast > 0)
    return xp.to_int(c["embd"] * t["embd"] + xp.maximum(xp.maximum(layers, out), casting))


OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda / ggml-vulkan offload_op: a batch at least this large runs on the GPU


def cpu_matrix_bytes(arch: ModelArch, experts_on_cpu: bool, layers_on_cpu: bool) -> int:
    """The largest weight the first GPU copies in to run a CPU-resident layer's matmul on a big batch (the
    backend's offload_op, on by default: --no-op-offload turns it off): one layer's expert tensor (every expert)
    when experts stay on the CPU, else a dense FFN matrix; bytes from the model's average bytes per parameter."""
    params = _params(arch)
    if not params or not (experts_on_cpu or layers_on_cpu):
        return 0
    per_param = arch.weights_bytes / params
    exps = arch.n_embd * arch.n_ff_exp * arch.n_expert if arch.n_expert and arch.n_ff_exp else 0
    dense = arch.n_embd * arch.n_ff
    return int(per_param * max(exps if experts_on_cpu else 0, dense if layers_on_cpu else 0))


def _params(arch: ModelArch) -> int:
    """Parameters as the shapes give them (embeddings and output, attention, FFN or experts)."""
    embd = arch.n_vocab * arch.n_embd
    attn = sum(arch.n_embd * arch.head_k * (2 * h + 2 * kv) for h, kv in zip(arch.n_head, arch.n_head_kv))
    exps = 3 * arch.n_embd * arch.n_ff_exp * arch.n_expert if arch.n_expert and arch.n_ff_exp else 0
    return 2 * embd + attn + arch.n_layer * (exps or 3 * arch.n_embd * arch.n_ff)


def _mask_input(t: Mapping[str, int], flash_attn: bool, mask_f32_input: bool) -> int:
    """The masks as the host feeds them: compute_terms counts f16 under flash attention; older builds feed f32."""
    return t["mask"] * (2 if flash_attn and mask_f32_input else 1)


def host_bytes(t: Mapping[str, Any], c: Mapping[str, float], mask_input: Any, xp: Any = PY,
               embd_input: bool = True) -> Any:
    """The host-side buffer beside GPUs: the graph inputs (the masks as fed, the embeddings input where the build has
    it), the residual stream built by get_rows, and whatever the CPU runs (experts kept there, layers left there, the
    logits when the output stays there)."""
    cpu_work = xp.maximum(xp.maximum(c["moe"] * t["moe"], c.get("h_act", 1.0) * t["act"] + t["scores"]), t["logits"])
    embd = c["h_embd"] + (1 if embd_input else 0)
    # the mixed path's input and its copy (t["mixed"], planner.gpu_terms): once, not per pipeline copy (two Vulkan
    # devices on lavapipe: 32.62 MiB logged, 32.5 planned this way)
    return xp.to_int(embd * t["embd"] + t.get("mixed", 0) + xp.maximum(c["h_mask"] * mask_input, cpu_work))


def one_gpu_bytes(xp: Any, arch: ModelArch, backend: str, *, flash_attn: bool, n_ubatch: Any, cells_sum: Any,
                  cells_max: Any, n_seq: Any, mask_f32_input: bool = False) -> tuple[Any, Any]:
    """(device, host side) compute bytes at the interval's high end when every layer runs on one GPU of `backend`:
    compute_terms' terms in closed form, so the vectorised sweep and the planner give the same figure."""
    c, _ = backend_coefficients(backend)
    mask = (2 if flash_attn else 4) * n_ubatch * cells_sum
    t = {"mask": mask, "embd": 4 * arch.n_embd * n_ubatch, "act": 4 * n_ubatch * activation_width(arch),
         "scores": 0 if flash_attn else 4 * max(arch.n_head, default=0) * cells_max * n_ubatch,
         "logits": 4 * arch.n_vocab * xp.minimum(n_ubatch, n_seq), "moe": 0, "wcopy": 0}
    host_t = {**t, "act": 0, "scores": 0, "logits": 0, "mixed": 2 * t["embd"]}  # the pinned build's mixed path
    mask_input = mask * (2 if flash_attn and mask_f32_input else 1)
    device = gpu_device_bytes(t, c, mask_input, xp)
    host = host_bytes(host_t, c, mask_input, xp)
    return xp.to_int(device * c["high"]), xp.to_int(host * c["host_high"])


CALIBRATED_SPREAD = 0.10  # a saved calibration is exact for its own run; other settings of the same model: +-10%


def backend_compute(terms: Mapping[str, Mapping[str, int]], backend: str, *, flash_attn: bool,
                    mask_f32_input: bool, host: str = "CPU", arch: str = "",
                    calibrations: Sequence[ComputeCalibration] = (), embd_input: bool = True
                    ) -> dict[str, DeviceCompute]:
    """Every busy device's compute buffer and the host side's for one GPU backend; `terms` from compute_terms
    (per device, the CPU's under `host`). The CPU's mask term is f16 under flash attention; builds before #23764
    feed it as f32 (twice the bytes). A saved calibration of this backend and model family (`arch`) scales the
    estimate by its logged/estimated ratio instead of the corpus interval."""
    c, label = backend_coefficients(backend)
    mine = [k for k in calibrations if k.backend == backend and k.arch == arch]
    if mine:
        dev_r, host_r = median([k.device_ratio for k in mine]), median([k.host_ratio for k in mine])
        note = (f"{backend}: calibrated on your log(s) {', '.join(k.source for k in mine)} for {arch} "
                f"(x{dev_r:.3f} device, x{host_r:.3f} host side; +-{CALIBRATED_SPREAD:.0%} for other settings)")
        out = {}
        for dev, t in terms.items():
            r = host_r if dev == host else dev_r
            mask = _mask_input(t, flash_attn, mask_f32_input)
            est = int(r * (host_bytes(t, c, mask, embd_input=embd_input) if dev == host
                           else gpu_device_bytes(t, c, mask)))
            out[dev] = DeviceCompute(est, int(est * (1 - CALIBRATED_SPREAD)), int(est * (1 + CALIBRATED_SPREAD)), note)
        return out
    out = {}
    for dev, t in terms.items():
        if dev == host:
            est = host_bytes(t, c, _mask_input(t, flash_attn, mask_f32_input), embd_input=embd_input)
            lo, hi = c["host_low"], c["host_high"]
        else:
            est = gpu_device_bytes(t, c, _mask_input(t, flash_attn, mask_f32_input))
            lo, hi = c["low"], c["high"]
        out[dev] = DeviceCompute(est, int(est * lo), int(est * hi), label)
    return out
