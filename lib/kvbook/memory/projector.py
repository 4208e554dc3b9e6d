"""The multimodal projector's memory: its weights (exact) and an estimate of its compute buffer.

llama.cpp's clip loader (tools/mtmd/clip.cpp) reads each tensor it uses into one weight buffer, and at
warm-up reserves a compute buffer for one image of the warm-up size (`get_dummy_batch`: image_size x
image_size for a fixed-resolution vision tower). The buffer is the largest of the ViT's phases held at once,
in f32; kvbook's estimate takes three: the input (the image, its patches unrolled at 2 bytes, the patch
embeddings), attention (Q, K, V and the output, plus the n_head x n_patch^2 scores when flash attention is
off) and the FFN (its hidden activations plus three embedding-wide tensors). The terms were fitted to, and
match to the printed 0.01 MiB, the real server's figure on four synthetic idefics3 towers (16 to 1024
patches, flash attention on and off: tests/test_projector.py); on synthetic gemma3 towers (not fitted) it
was 0 to 39% low. No real projector was measured, and real towers with extra stages (pooling, merger MLPs,
dynamic resolution, tiling) can need more: hence "estimate"."""

from __future__ import annotations

from kvbook.interface import ProjectorArch, ProjectorMemory

F32 = 4
# how the estimate compared with the real server, per projector type (tests/test_projector.py)
_CHECKED = {"idefics3": "matched the server on synthetic idefics3 towers",
            "gemma3": "up to 40% low on synthetic gemma3 towers"}


def projector_compute_bytes(p: ProjectorArch, flash_attn: bool) -> int:
    """The compute buffer for one warm-up image, estimated from the vision tower's shapes."""
    n_patch = (p.image_size // max(p.patch_size, 1)) ** 2
    inputs = F32 * 3 * p.image_size ** 2 + 2 * n_patch * 3 * p.patch_size ** 2 + F32 * n_patch * p.n_embd
    attention = F32 * 4 * n_patch * p.n_embd + (0 if flash_attn else F32 * p.n_head * n_patch ** 2)
    ffn = F32 * n_patch * (p.n_ff + 3 * p.n_embd)
    return max(inputs, attention, ffn)


def projector_memory(p: ProjectorArch, flash_attn: bool, on_gpu: bool) -> ProjectorMemory:
    return ProjectorMemory(
        weights_bytes=p.weights_bytes,
        compute_bytes=projector_compute_bytes(p, flash_attn),
        compute_note=(f"estimate: the {p.projector_type} vision tower's activations for one {p.image_size}x"
                      f"{p.image_size} warm-up image ({'with' if flash_attn else 'without'} flash attention); "
                      "reserved at start, or at the first image with --no-warmup; "
                      + _CHECKED.get(p.projector_type, "unchecked for this projector type (up to 40% low on "
                                                           "synthetic gemma3 towers)")),
        on_gpu=on_gpu,
    )
