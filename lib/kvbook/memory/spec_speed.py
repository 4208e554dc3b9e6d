"""Speculative decoding's speed per step: pure arithmetic, shared by the planner's MTP offer (costs at the
bandwidth bound, memory/roofline.py) and the measured speed model (capacity/speed.py, benchmarks/bench_spec_speed.py).

What one step costs in the pinned llama-server (tools/server/server-context.cpp update_slots, common/speculative.cpp):
the draft proposes N tokens, one forward pass each (common_speculative_impl_draft_simple::draft and the MTP head
alike: a decode of the last sampled token, then one per drafted token until --spec-draft-n-max; --spec-draft-p-min
defaults to 0, so drafting stops early only where a user sets it); the target verifies the N + 1 tokens in one
batch; and the draft context re-evaluates that same batch (common_speculative_process after every target batch:
TAG_SPEC_AVOID_DRAFT_REEVAL). Each accepted token extends the step; the first rejection ends it with the target's
own token, so a step yields 1 + (accepted drafts) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbook.errors import BadInput


@dataclass(frozen=True)
class SpecDecode:
    """One speculative set-up as the speed model sees it; costs are in units of one target decode token's time.

    acceptance: the chance each drafted token is accepted given the ones before it were (i.i.d.);
    n_draft: tokens drafted per step (--spec-draft-n-max);
    draft_cost: one drafted token's time (an MTP head: about its bytes read over the target's; a draft model: its own);
    batch_extra: each token after the first in a batch of the target (and, scaled by draft_cost, of the draft).
    """

    acceptance: float
    n_draft: int
    draft_cost: float
    batch_extra: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.acceptance <= 1.0:
            raise BadInput(f"the acceptance rate must be within [0, 1], got {self.acceptance}")
        if self.n_draft < 1:
            raise BadInput(f"speculative decoding drafts at least one token, got {self.n_draft}")
        if self.draft_cost < 0 or self.batch_extra < 0:
            raise BadInput("draft and batch costs must be non-negative")


def expected_tokens_per_step(acceptance: float, n_draft: int) -> float:
    """Tokens one step yields when each draft is accepted with probability p until the first rejection:
    1 + p + ... + p^N = (1 - p^(N+1)) / (1 - p)."""
    if acceptance >= 1.0:
        return float(n_draft + 1)
    return (1.0 - acceptance ** (n_draft + 1)) / (1.0 - acceptance)


def acceptance_for_length(mean_length: float, n_draft: int) -> float:
    """The per-token acceptance p whose expected tokens per step is `mean_length` (what --spec-synth-len L sets:
    common_speculative_synth_rates_resolve bisects the same sum)."""
    if not 1.0 <= mean_length <= n_draft + 1:
        raise BadInput(f"a mean acceptance length must be within [1, {n_draft + 1}], got {mean_length}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_step(mid, n_draft) < mean_length else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class SpecStep:
    """One step of speculative decoding, in units of one target decode token's time."""

    tokens: float  # expected tokens it yields
    verify: float  # the target's batch of N + 1
    draft: float  # N drafted tokens and the draft's re-evaluation of the verified batch

    @property
    def cost(self) -> float:
        return self.verify + self.draft

    @property
    def speedup(self) -> float:
        """Decode tokens/s with speculation over without (below 1: it slows decoding down)."""
        return self.tokens / self.cost


def spec_step(spec: SpecDecode) -> SpecStep:
    batch = 1.0 + spec.batch_extra * spec.n_draft  # a batch of N + 1 tokens
    return SpecStep(tokens=expected_tokens_per_step(spec.acceptance, spec.n_draft), verify=batch,
                    draft=spec.draft_cost * (spec.n_draft + batch))
