"""Prefill and decode speed as a function of context depth, fitted from a few measured points.

Each token's cost grows with the context it attends to, so the time per token is close to affine in the
depth: 1/tps(d) = a + b*d, for prefill and for decode separately (llama-bench -d D -p P -n N measures both
at depth D). A turn that sends P prompt tokens of which C are already cached, then generates N, costs
the integral of that time over the new prompt tokens and over the generated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvbook.errors import BadInput


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
