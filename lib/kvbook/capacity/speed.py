"""Prefill and decode speed as a function of context depth, fitted from a few measured points.

Each token's cost grows with the context it attends to, so the time per token is close to affine in the
depth: 1/tps(d) = a + b*d, for prefill and for decode separately (llama-bench -d D -p P -n N measures both
at depth D). A turn that sends P prompt tokens of which C are already cached, then generates N, costs
the integral of that time over the new prompt tokens and over the generated ones. Speculative decoding divides
the decode part by the step model's speed-up (memory/spec_speed.py), its batch cost taken from these speeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvbook.errors import BadInput
from kvbook.memory.spec_speed import SpecDecode, spec_step


@dataclass(frozen=True)
class SpeedPoint:
    """One llama-bench measurement: tokens/s of a prompt chunk and of generation, both at `depth` tokens."""

    depth: int
    prefill_tps: float
    decode_tps: float


@dataclass(frozen=True)
class Affine:
    """Seconds per token at depth d: base + slope * d."""

    base: float
    slope: float

    def seconds_per_token(self, depth: float) -> float:
        return self.base + self.slope * depth

    def tps(self, depth: float) -> float:
        return 1.0 / self.seconds_per_token(depth)

    def seconds(self, start: float, tokens: float) -> float:
        """Time for `tokens` tokens from depth `start` on (the mean depth is start + tokens / 2)."""
        return tokens * self.seconds_per_token(start + tokens / 2)


def fit_affine(depths: Sequence[float], tps: Sequence[float]) -> Affine:
    """Least squares of 1/tps on depth; the slope is kept >= 0 (a longer context never speeds a token up)."""
    if len(depths) != len(tps) or len(depths) < 2 or len(set(depths)) < 2:
        raise BadInput("a speed fit needs at least two measurements at different depths")
    if any(t <= 0 for t in tps):
        raise BadInput("every measured tokens/s must be positive")
    ys = [1.0 / t for t in tps]
    mx, my = sum(depths) / len(depths), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in depths)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(depths, ys)) / sxx)
    base = my - slope * mx
    if base <= 0:
        base = min(ys)
    return Affine(base, slope)


@dataclass(frozen=True)
class SpeedModel:
    """Prefill and decode speed of one model and command line on one machine, from measured points."""

    prefill: Affine
    decode: Affine
    fitted_on: tuple[SpeedPoint, ...]

    def turn_seconds(self, prompt_tokens: int, cached_tokens: int = 0, output_tokens: int = 0) -> tuple[float, float]:
        """(prefill seconds, decode seconds) for one turn: the uncached part of the prompt is processed from
        depth `cached_tokens`, then `output_tokens` are generated from depth `prompt_tokens`."""
        if not 0 <= cached_tokens <= prompt_tokens or output_tokens < 0:
            raise BadInput("a turn needs 0 <= cached tokens <= prompt tokens and output tokens >= 0")
        return (self.prefill.seconds(cached_tokens, prompt_tokens - cached_tokens),
                self.decode.seconds(prompt_tokens, output_tokens))


def fit_speed(points: Sequence[SpeedPoint]) -> SpeedModel:
    depths = [p.depth for p in points]
    return SpeedModel(fit_affine(depths, [p.prefill_tps for p in points]),
                      fit_affine(depths, [p.decode_tps for p in points]), tuple(points))


def held_out_errors(model: SpeedModel, points: Sequence[SpeedPoint]) -> list[tuple[int, float, float]]:
    """(depth, prefill error %, decode error %) of the model's predictions at measured points."""
    return [(p.depth, 100 * (model.prefill.tps(p.depth) - p.prefill_tps) / p.prefill_tps,
             100 * (model.decode.tps(p.depth) - p.decode_tps) / p.decode_tps) for p in points]


# ------------------------------------------------------------------ speculative decoding (the step model is
# memory/spec_speed.py, shared with the planner's MTP offer; here it meets the measured speeds)


def batch_extra_from(speed: SpeedModel, depth: float) -> float:
    """The cost of each extra token in a small batch, from the fitted speeds at `depth`: a prompt token's time over
    a decode token's (a batch shares one pass over the weights; each token adds its own compute). A large prompt
    batch amortizes better than a verify batch of a few tokens, so this is a lower bound: measure pp(N+1) where
    it matters (benchmarks/bench_spec_speed.py does)."""
    return speed.prefill.seconds_per_token(depth) / speed.decode.seconds_per_token(depth)


def batch_extra_measured(decode_tps: float, batch_tps: float, batch: int) -> float:
    """The cost of each extra token in a batch of `batch` tokens from two measurements at one depth: single-token
    decode tokens/s and the batch's tokens/s (llama-bench -p `batch`), as batch_time = t1 * (1 + extra * (batch - 1))."""
    if decode_tps <= 0 or batch_tps <= 0 or batch < 2:
        raise BadInput("a batch cost needs positive tokens/s and a batch of at least two tokens")
    return max(0.0, (batch / batch_tps * decode_tps - 1.0) / (batch - 1))


def batch_extra_from_rejections(speedup: float, n_draft: int, draft_cost: float) -> float:
    """The batch cost that explains a measured speed-up when every draft is rejected (one token per step, so the
    step costs 1 / speedup): (1 + N*extra) * (1 + draft_cost) + N * draft_cost = 1 / speedup."""
    if speedup <= 0 or n_draft < 1:
        raise BadInput("a rejection-only speed-up must be positive and the draft at least one token")
    return max(0.0, ((1.0 / speedup - n_draft * draft_cost) / (1.0 + draft_cost) - 1.0) / n_draft)


def spec_decode_seconds(speed: SpeedModel, spec: SpecDecode, start: int, tokens: int) -> float:
    """Decode time of `tokens` tokens from depth `start` with speculation: the plain time over the speed-up."""
    return speed.decode.seconds(start, tokens) / spec_step(spec).speedup
