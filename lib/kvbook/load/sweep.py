"""Concurrency sweep against one route: measure levels, summarise each against the SLO, find the largest
concurrency that meets it (doubling, then bisection: kvbook.capacity.slo)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbook.capacity.slo import LevelResult, SearchResult, Slo, search_max_concurrency, summarize_level
from kvbook.capacity.workload import AgentShape, Workload
from kvbook.load.generator import LevelRun, ServerFacts, run_level
from kvbook.smoke.checks import Target


@dataclass(frozen=True)
class SweepConfig:
    slo: Slo = Slo()
    max_concurrency: int = 8
    sessions_min: int = 2  # sessions per level: max(concurrency, sessions_min)
    level_budget_s: float = 90.0
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Sweep:
    search: SearchResult
    runs: tuple[LevelRun, ...]


def sweep(target: Target, shape: AgentShape, workload: Workload, cfg: SweepConfig, *, facts: ServerFacts,
          prefix_tokens: int, nonce: str, label: str = "",
          progress: Callable[[LevelResult], None] | None = None) -> Sweep:
    runs: list[LevelRun] = []

    def measure(c: int) -> LevelResult:
        run = run_level(target, shape, workload, c, sessions=max(c, cfg.sessions_min), facts=facts,
                        prefix_tokens=prefix_tokens, nonce=nonce, time_budget_s=cfg.level_budget_s,
                        timeout_s=cfg.timeout_s, label=label)
        runs.append(run)
        level = summarize_level(c, [t.sample for t in run.turns], run.wall_s, cfg.slo)
        if progress:
            progress(level)
        return level

    return Sweep(search_max_concurrency(measure, cfg.max_concurrency), tuple(runs))
