"""Decode speed with speculative decoding on the real llama-server, against the speed model's prediction.

Acceptance comes from the pinned build's benchmarking switch `--spec-synth-len L`: the server drafts as usual, then
accepts each drafted token at random with the rates that make the mean tokens per step L (common/speculative.cpp
common_speculative_synth_rates_resolve; tools/server/server-context.cpp server_sample_and_accept_synth), so the
output is not valid text but every cost of a step is real. It needs an initialized speculative context (a draft
model here). The prediction needs the draft's cost relative to the target (1 for a model drafting for itself) and the cost of
each extra token in a batch: fitted on a server whose drafts are all rejected (--spec-synth-len 1) and checked on
the others, or taken from llama-bench's (N+1)-token batches (batch_extras).
"""

from __future__ import annotations

import contextlib
import re
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.capacity.speed import batch_extra_measured
from kvbook.errors import BadInput, ServerError
from kvbook.memory.spec_speed import SpecDecode, acceptance_for_length, spec_step

# a prompt the servers decode from: plain prose, short enough that depth barely moves the speed
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle. Once upon a time,"


@dataclass(frozen=True)
class DecodeRun:
    """One /completion: generated tokens/s as the server times it, and its draft counters (timings.draft_n*)."""

    tokens_per_s: float
    predicted_n: int
    draft_n: int
    draft_accepted: int


@dataclass(frozen=True)
class SpecCase:
    """A speculative server line to measure: N drafted tokens per step and the synthetic mean tokens per step."""

    n_draft: int
    mean_length: float

    @property
    def acceptance(self) -> float:
        return acceptance_for_length(self.mean_length, self.n_draft)


@dataclass(frozen=True)
class SpecMeasurement:
    """Measured decode tokens/s with and without speculation (medians of alternating requests)."""

    case: SpecCase
    baseline_tps: float
    spec_tps: float
    realized_length: float  # 1 + accepted / steps, from the server's draft counters
    paired_speedup: float  # median over rounds of (speculative / plain) of two back-to-back requests

    @property
    def measured_speedup(self) -> float:
        """The paired median: each ratio is of two requests a moment apart, so load drift cancels in it."""
        return self.paired_speedup

    def predicted_speedup(self, draft_cost: float, batch_extra: float) -> float:
        """The speed model at the acceptance the server realized (synthetic draws scatter around the target)."""
        n = self.case.n_draft
        p = acceptance_for_length(min(max(self.realized_length, 1.0), n + 1.0), n)
        return spec_step(SpecDecode(p, n, draft_cost, batch_extra)).speedup


def decode_run(base_url: str, n_predict: int, *, seed: int = 1, timeout_s: float = 300.0) -> DecodeRun:
    """Generate `n_predict` tokens (EOS ignored, nothing cached) and read the server's own timings."""
    import requests

    resp = requests.post(f"{base_url}/completion", timeout=timeout_s, json={
        "prompt": PROMPT, "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
        "seed": seed})
    if resp.status_code != 200:
        raise ServerError(f"/completion answered HTTP {resp.status_code}: {resp.text[:160]}")
    t = resp.json().get("timings") or {}
    if not t.get("predicted_per_second"):
        raise ServerError(f"/completion returned no generation timings: {resp.text[:160]}")
    return DecodeRun(float(t["predicted_per_second"]), int(t.get("predicted_n", 0)), int(t.get("draft_n", 0)),
                     int(t.get("draft_n_accepted", 0)))


def realized_length(runs: Sequence[DecodeRun], n_draft: int) -> float:
    """Mean tokens per step the server realized: every step drafts n_draft tokens (no --spec-draft-p-min here)."""
    drafted = sum(r.draft_n for r in runs)
    if not drafted:
        raise ServerError("the speculative server drafted nothing: is the draft context initialized?")
    return 1.0 + sum(r.draft_accepted for r in runs) / (drafted / n_draft)


def batch_extras(model: Path, batches: Sequence[int], depth: int, threads: int | None) -> dict[int, float]:
    """Each extra token's cost in a batch of b tokens, per b, from llama-bench at `depth` (-p b, -n 32)."""
    from kvbook.ops.bench import measure_speed

    out = {}
    for b in sorted(set(batches)):
        (point,) = measure_speed(model, [depth], prompt_tokens=b, gen_tokens=32, repetitions=3, threads=threads)
        out[b] = batch_extra_measured(point.decode_tps, point.prefill_tps, b)
    return out


@contextlib.contextmanager
def spec_servers(model: Path, draft: Path, cases: Sequence[SpecCase], run_dir: Path, *, threads: int,
                 ctx: int = 1024) -> Iterator[tuple[str, dict[SpecCase, str]]]:
    """A plain server and one per case (draft-simple with `draft`, --spec-synth-len), all up at once on loopback,
    so requests can alternate between them: load on a shared machine drifts, the ratio within a pair does not."""
    from kvbook.ops.llama_server import start_llama_server

    if not cases:
        raise BadInput("no speculative cases to measure")
    base = ["-m", str(model), "-c", str(ctx), "-np", "1", "-t", str(threads), "--no-warmup"]
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(start_llama_server(base, run_dir=run_dir / "plain"))
        urls = {}
        for i, c in enumerate(cases):
            args = [*base, "-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(c.n_draft),
                    "--spec-synth-len", f"{c.mean_length:.6g}", "-td", str(threads)]
            urls[c] = stack.enter_context(start_llama_server(args, run_dir=run_dir / f"spec{i}")).base_url
        yield plain.base_url, urls


def measure_spec_speed(model: Path, draft: Path, cases: Sequence[SpecCase], run_dir: Path, *, threads: int = 1,
                       n_predict: int = 64, rounds: int = 3) -> list[SpecMeasurement]:
    """Per case: `rounds` back-to-back pairs of requests to the plain and the speculative server (rounds outside,
    cases inside) and the acceptance the server realized."""
    base_runs: dict[SpecCase, list[DecodeRun]] = {c: [] for c in cases}
    spec_runs: dict[SpecCase, list[DecodeRun]] = {c: [] for c in cases}
    with spec_servers(model, draft, cases, run_dir, threads=threads) as (plain, urls):
        for url in (plain, *urls.values()):
            decode_run(url, 4)  # first-request allocations, out of the timed runs
        for r in range(rounds):  # rounds outside, cases inside: each case's runs spread over the whole time
            for c in cases:
                base_runs[c].append(decode_run(plain, n_predict, seed=r))
                spec_runs[c].append(decode_run(urls[c], n_predict, seed=r))
    return [SpecMeasurement(
        case=c, baseline_tps=statistics.median(x.tokens_per_s for x in base_runs[c]),
        spec_tps=statistics.median(x.tokens_per_s for x in spec_runs[c]),
        realized_length=realized_length(spec_runs[c], c.n_draft),
        paired_speedup=statistics.median(s.tokens_per_s / b.tokens_per_s for s, b in zip(spec_runs[c], base_runs[c])))
        for c in cases]

# ------------------------------------------------------------------ n-gram drafts, where acceptance is real

# an agent-like turn where the reply repeats the context, as an agent re-emitting a file it read with an edit does:
# a tool result (a file), then the start of its copy; n-gram drafts find the rest in the context
_FILE = "".join(f"SETTING_{i} = {i * 7}  # setting number {i}\n" for i in range(60))
AGENT_PROMPT = ("Tool result (read_file config.py):\n" + _FILE + "\nAssistant: here is config.py with SETTING_59 "
                "set to 0:\n" + _FILE.splitlines(keepends=True)[0])

_ACCEPTANCE = re.compile(r"draft acceptance = ([\d.]+) \(\s*(\d+) accepted /\s*(\d+) generated\), mean len =\s*([\d.]+)")


@dataclass(frozen=True)
class NgramMeasurement:
    """Plain and n-gram decode tokens/s (medians of alternating requests) and the server's own acceptance line."""

    spec_type: str
    baseline_tps: float
    spec_tps: float
    acceptance: float  # accepted / drafted, summed over the runs
    drafted: int
    mean_length: float  # the last request's mean tokens per verification step, from the server log
    paired_speedup: float  # median over rounds of (speculative / plain) of two back-to-back requests

    @property
    def measured_speedup(self) -> float:
        return self.paired_speedup


def _agent_run(base_url: str, n_predict: int) -> DecodeRun:
    import requests

    resp = requests.post(f"{base_url}/completion", timeout=300, json={
        "prompt": AGENT_PROMPT, "n_predict": n_predict, "temperature": 0, "cache_prompt": False})
    t = resp.json().get("timings") or {} if resp.status_code == 200 else {}
    if not t.get("predicted_per_second"):
        raise ServerError(f"/completion answered HTTP {resp.status_code}: {resp.text[:160]}")
    return DecodeRun(float(t["predicted_per_second"]), int(t.get("predicted_n", 0)), int(t.get("draft_n", 0)),
                     int(t.get("draft_n_accepted", 0)))


def measure_ngram(model: Path, spec_type: str, run_dir: Path, *, threads: int = 1, n_predict: int = 256,
                  rounds: int = 3) -> NgramMeasurement:
    """The agent-like copy turn on a plain server and on one with `--spec-type spec_type` (both planned first),
    in back-to-back pairs."""
    from kvbook.ops.llama_server import start_llama_server

    base = ["-m", str(model), "-c", "2048", "-np", "1", "-t", str(threads), "--no-warmup"]
    with start_llama_server(base, run_dir=run_dir / "plain") as plain_server, \
            start_llama_server([*base, "--spec-type", spec_type], run_dir=run_dir / spec_type) as spec_server:
        plain, spec, log = plain_server.base_url, spec_server.base_url, spec_server.log_path
        base_runs, spec_runs = [], []
        for _ in range(rounds):
            base_runs.append(_agent_run(plain, n_predict))
            spec_runs.append(_agent_run(spec, n_predict))
        lines = _ACCEPTANCE.findall(log.read_text(errors="replace"))
    drafted = sum(r.draft_n for r in spec_runs)
    return NgramMeasurement(
        spec_type=spec_type, baseline_tps=statistics.median(r.tokens_per_s for r in base_runs),
        spec_tps=statistics.median(r.tokens_per_s for r in spec_runs),
        acceptance=sum(r.draft_accepted for r in spec_runs) / drafted if drafted else 0.0, drafted=drafted,
        mean_length=float(lines[-1][3]) if lines else 1.0,
        paired_speedup=statistics.median(s.tokens_per_s / b.tokens_per_s for s, b in zip(spec_runs, base_runs)))
