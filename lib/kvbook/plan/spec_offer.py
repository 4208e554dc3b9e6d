"""The MTP set-up a plan offers where the model carries an MTP head its command line does not use.

Its memory is exact (plan/planner.py mtp_offer plans the same line with `--spec-type draft-mtp`, per device); its decode
speed-up is an estimate interval from the step model (memory/spec_speed.py) with bandwidth-bound costs
(memory/roofline.py): acceptance 0.6 to 0.8 per drafted token (public figures: about 0.75 with 3 drafts in upstream's
MTP pull request, ggml-org/llama.cpp#22673; 0.88 with 1 draft and about 0.8 with 2 on Qwen3.6-35B-A3B,
ikawrakow/ik_llama.cpp#1814), the low end with every verified token reading experts of its own, the high end with
a verify batch as cheap as one token. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbook.interface import Alternative, ModelArch, Note
from kvbook.memory.roofline import batch_extra_bound, mtp_draft_cost
from kvbook.memory.spec_speed import SpecDecode, spec_step

ACCEPTANCE = (0.6, 0.8)  # per drafted token; sources in the module docstring


@dataclass(frozen=True)
class SpecOffer:
    """The MTP line, what it adds on each device over the planned line, and its speed-up interval (an estimate)."""

    alternative: Alternative
    extra_bytes: tuple[tuple[str, int], ...]  # (pool, bytes added), pools in the device's order
    speedup: tuple[float, float]
    n_draft: int

    def note(self) -> Note:
        extra = ", ".join(f"{b / 2**20:+.0f} MiB on {pool}" for pool, b in self.extra_bytes if b)
        low, high = self.speedup
        return Note("speculative.mtp-offer", (
            f"the model has an MTP head: {self.alternative.change.split(' (')[0].split(': ', 1)[1]} ({self.n_draft} "
            f"drafted per step) {self.alternative.verdict.value} with {extra or 'no extra memory'} (exact, against the "
            f"same line without it); decode speed-up x{low:.2f} to x{high:.2f} (estimate: acceptance "
            f"{ACCEPTANCE[0]}-{ACCEPTANCE[1]} per draft from public reports, ggml-org/llama.cpp#22673, "
            f"ikawrakow/ik_llama.cpp#1814; verify batches from bandwidth-bound to free; measure it, "
            "benchmarks/bench_spec_speed.py). Prompt processing is not sped up"))


def speedup_interval(arch: ModelArch, n_draft: int) -> tuple[float, float]:
    """(low, high) decode speed-up of MTP with `n_draft` drafts: low at the lower acceptance and bandwidth-bound
    verify batches, high at the upper acceptance and verify batches that cost one token."""
    draft = mtp_draft_cost(arch)
    low = spec_step(SpecDecode(ACCEPTANCE[0], n_draft, draft, batch_extra_bound(arch, n_draft + 1))).speedup
    high = spec_step(SpecDecode(ACCEPTANCE[1], n_draft, draft, 0.0)).speedup
    return low, high
