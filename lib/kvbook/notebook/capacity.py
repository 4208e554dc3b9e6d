"""What notebook 05-capacity calls: the speed model on this machine, a Claude-Code-shaped sweep against a
real llama-server, prefix-cache accounting with and without the attribution header, slot options from the
planner, and (optionally) two servers behind one LiteLLM model group. Each step returns plain rows."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbook.capacity.cache import CAUSES, cache_summary, miss_cause
from kvbook.capacity.slo import LevelResult, Slo, summarize_level
from kvbook.capacity.speed import SpeedModel, batch_extra_from, fit_speed, spec_decode_seconds
from kvbook.capacity.workload import AgentShape, Workload, run_nonce, scale_shape, shape_from_capture, shared_prefix_body
from kvbook.errors import BadInput
from kvbook.memory.spec_speed import SpecDecode
from kvbook.load.client import count_tokens
from kvbook.load.generator import LevelRun, ServerFacts, TurnRecord, run_level
from kvbook.load.serverlog import with_log_causes
from kvbook.load.sweep import Sweep, SweepConfig, sweep
from kvbook.smoke.checks import Target

# ------------------------------------------------------------------ speed

def speed_points(model: Path, depths: Sequence[int], fit_depths: Sequence[int], *, threads: int | None = None,
                 extra: Sequence[str] = ()) -> tuple[SpeedModel, list[dict[str, Any]]]:
    """Measure every depth with llama-bench, fit on `fit_depths` only, predict all: held-out error is honest."""
    from kvbook.ops.bench import measure_speed

    if not set(fit_depths) <= set(depths) or len(set(fit_depths)) < 2:
        raise BadInput("speed_fit_depths must be at least two of speed_depths")
    points = measure_speed(model, sorted(set(depths)), threads=threads, extra=extra)
    fitted = fit_speed([p for p in points if p.depth in fit_depths])
    rows = [{"depth": p.depth, "held_out": p.depth not in fit_depths,
             "prefill_tps_measured": round(p.prefill_tps, 1), "prefill_tps_predicted": round(fitted.prefill.tps(p.depth), 1),
             "decode_tps_measured": round(p.decode_tps, 2), "decode_tps_predicted": round(fitted.decode.tps(p.depth), 2)}
            for p in points]
    return fitted, rows


def held_out_median_error(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    held = [r for r in rows if r["held_out"]]

    def err(kind: str) -> float | None:
        errs = [abs(r[f"{kind}_tps_predicted"] - r[f"{kind}_tps_measured"]) / r[f"{kind}_tps_measured"] for r in held]
        return round(100 * statistics.median(errs), 1) if errs else None

    return {"prefill_pct": err("prefill"), "decode_pct": err("decode"), "held_out_depths": [r["depth"] for r in held]}


def turn_time_rows(speed: SpeedModel, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                   spec: SpecDecode | None = None) -> list[dict[str, Any]]:
    """A turn of `prompt_tokens`, cold and with `cached_tokens` already cached; with `spec`, each also with
    speculative decoding (the same prefill, decode divided by the step model's speed-up: an estimate)."""
    rows = []
    for label, cached in (("cold (nothing cached)", 0), ("system prompt + tools cached", cached_tokens)):
        cached = min(cached, prompt_tokens)
        pre, dec = speed.turn_seconds(prompt_tokens, cached, output_tokens)
        variants = [(label, dec)]
        if spec is not None:
            variants.append((f"{label}, speculative: acceptance {spec.acceptance:g}, {spec.n_draft} drafted, draft "
                             f"cost {spec.draft_cost:g} (estimate)",
                             spec_decode_seconds(speed, spec, prompt_tokens, output_tokens)))
        rows += [{"turn": name, "prompt tokens": prompt_tokens, "cached": cached, "output tokens": output_tokens,
                  "prefill s": round(pre, 2), "decode s": round(d, 2), "total s": round(pre + d, 2)}
                 for name, d in variants]
    return rows


def spec_setup(speed: SpeedModel, acceptance: float, n_draft: int, draft_cost: float, depth: int) -> SpecDecode:
    """The notebook's speculative set-up: the batch cost from this machine's fitted prefill and decode speeds at
    `depth` (a lower bound: a long prompt batch amortizes better than N + 1 tokens, so the speed-up is high-side)."""
    return SpecDecode(acceptance=acceptance, n_draft=n_draft, draft_cost=draft_cost,
                      batch_extra=batch_extra_from(speed, depth))


def decode_bound_rows(model: Path, depths: Sequence[int]) -> list[dict[str, Any]]:
    """Decode tokens/s upper bounds (bandwidth / bytes read per token) on every device preset with a bandwidth
    figure: bounds, not predictions. Presets carry no FLOPS figure, so prefill has no bound here."""
    from kvbook.memory.roofline import decode_bound
    from kvbook.model.sources import load_model
    from kvbook.ops.host import detect_host
    from kvbook.plan.devices import device_ids, load_device

    arch, host = load_model(str(model)), detect_host()
    rows = []
    for device_id in device_ids():
        pool = load_device(device_id, host).main_pool
        if pool.bandwidth_gbps:
            rows.append({"device": device_id, "bandwidth GB/s": pool.bandwidth_gbps,
                         **{f"decode bound t/s @ {d}": round(decode_bound(arch, d, pool.bandwidth_gbps).tokens_per_s, 1)
                            for d in depths}})
    return rows


# ------------------------------------------------------------------ the client's shape

def capture_shapes(scale: float, timeout_s: float = 90.0) -> tuple[AgentShape, AgentShape, AgentShape]:
    """(full shape without the header, scaled with the header, scaled without) from two real `claude -p` requests."""
    from kvbook.claude.client import claude_version
    from kvbook.claude.e2e import capture_request
    from kvbook.ops.components import find_claude

    claude = find_claude()
    version = claude_version(claude)
    with_header = shape_from_capture(capture_request(claude, attribution=True, timeout_s=timeout_s), version)
    without = shape_from_capture(capture_request(claude, attribution=False, timeout_s=timeout_s), version)
    if not with_header.attribution:
        raise BadInput(f"Claude Code {version} sent no attribution header by default; the header contrast needs one")
    return without, scale_shape(with_header, scale), scale_shape(without, scale)


# ------------------------------------------------------------------ the server

@dataclass(frozen=True)
class Served:
    target: Target
    facts: ServerFacts
    log_path: Path
    plan: Any


@contextlib.contextmanager
def serve(model: Path, server_args: Sequence[str], run_dir: Path, *, port: int | None = None) -> Iterator[Served]:
    """llama-server with the given flags (planned first), its slots and per-slot context read from /props."""
    import requests

    from kvbook.notebook.ops_support import repo_paths
    from kvbook.ops.llama_server import start_llama_server

    argv = ["-m", str(model), *repo_paths(list(server_args))]
    with start_llama_server(argv, run_dir=run_dir, port=port) as server:
        props = requests.get(server.base_url + "/props", timeout=10).json()
        slots = int(props.get("total_slots") or 1)
        ctx = int((props.get("default_generation_settings") or {}).get("n_ctx") or 0)
        arch = server.plan.model if server.plan else None
        swa = bool(arch and (arch.has_swa and not server.flags.swa_full or arch.is_hybrid))
        yield Served(Target("direct", server.base_url, "local"), ServerFacts(slots, ctx, swa), server.log_path, server.plan)


def prefix_tokens(served: Served, shape: AgentShape, nonce: str) -> int:
    return count_tokens(served.target, shared_prefix_body(shape, served.target.model, nonce))


# ------------------------------------------------------------------ sweep and cache

def level_rows(levels: Sequence[LevelResult]) -> list[dict[str, Any]]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    rows = []
    for lv in sorted(levels, key=lambda x: x.concurrency):
        p95 = {m: next(q for q in getattr(lv, m) if q.q == 0.95) for m in ("ttft", "itl", "e2e")}
        rows.append({"concurrency": lv.concurrency, "requests": lv.requests, "failed": lv.failed,
                     "ttft_p50_ms": ms(lv.p("ttft", 0.5)), "ttft_p95_ms": ms(p95["ttft"].value),
                     "ttft_p95_ci_ms": [ms(p95["ttft"].low), ms(p95["ttft"].high)],
                     "itl_p50_ms": ms(lv.p("itl", 0.5)), "itl_p95_ms": ms(p95["itl"].value),
                     "e2e_p50_ms": ms(lv.p("e2e", 0.5)), "e2e_p95_ms": ms(p95["e2e"].value),
                     "e2e_p95_ci_ms": [ms(p95["e2e"].low), ms(p95["e2e"].high)],
                     "e2e_p99_ms": ms(lv.p("e2e", 0.99)),
                     "tokens_per_s": round(lv.tokens_per_s, 2), "attained": round(lv.attained, 3),
                     "goodput_rps": round(lv.goodput_rps, 3), "meets_slo": lv.meets_slo})
    return rows


def warm_up(target: Target, shape: AgentShape, nonce: str) -> None:
    """One request with the run's shared system prompt and tools, not measured: a server in service is warm."""
    from kvbook.load.client import stream_message

    body = {**shared_prefix_body(shape, target.model, nonce), "max_tokens": 1, "stream": True}
    done = stream_message(target, body)
    if not done.ok:
        raise BadInput(f"the warm-up request to {target.base_url} failed: {done.error}")


def run_sweep(served: Served, shape: AgentShape, workload: Workload, cfg: SweepConfig, nonce: str,
              progress: bool = True) -> Sweep:
    def say(level: LevelResult) -> None:
        if progress:
            print(f"  concurrency {level.concurrency}: {level.requests} requests, goodput {level.goodput_rps:.2f}/s, "
                  f"{'meets' if level.meets_slo else 'misses'} the SLO", flush=True)

    warm_up(served.target, shape, nonce)
    return sweep(served.target, shape, workload, cfg, facts=served.facts,
                 prefix_tokens=prefix_tokens(served, shape, nonce), nonce=nonce, label="sweep-", progress=say)


def cache_sessions(served: Served, shapes: dict[str, AgentShape], workload: Workload, *, sessions: int,
                   concurrency: int = 1, nonce: str) -> list[TurnRecord]:
    """Sessions of each shape (e.g. with / without the attribution header), every miss explained from the log."""
    records: list[TurnRecord] = []
    offset = served.log_path.stat().st_size  # only this phase's tasks are matched
    for name, shape in shapes.items():
        run = run_level(served.target, shape, workload, concurrency, sessions=sessions, facts=served.facts,
                        prefix_tokens=prefix_tokens(served, shape, nonce), nonce=nonce, label=f"{name}-")
        records += run.turns
    with served.log_path.open("rb") as fh:
        fh.seek(offset)
        log = fh.read().decode(errors="replace")
    return with_log_causes(records, log)


def cache_rows(records: Sequence[TurnRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.cache is None:
            continue
        cause = miss_cause(r.cache)
        rows.append({"variant": r.session.split("-")[0], "session": r.session, "turn": r.turn, "kind": r.kind,
                     "prompt_n": r.cache.prompt_n, "cache_n": r.cache.cache_n, "reusable_n": r.cache.reusable_n,
                     "hit_ratio": round(r.cache.hit_ratio, 3), "miss_cause": cause or "",
                     "fix": CAUSES[cause] if cause else "", "ttft_ms": round(1000 * (r.streamed.ttft_s or 0), 1)})
    return rows


def cache_block(records: Sequence[TurnRecord]) -> dict[str, Any]:
    turns = [r.cache for r in records if r.cache is not None]
    out = cache_summary(turns)
    variants = sorted({r.session.split("-")[0] for r in records})
    out["by_variant"] = {v: cache_summary([r.cache for r in records if r.cache and r.session.startswith(v + "-")])
                         for v in variants}
    return out


# ------------------------------------------------------------------ memory: slot options

def predict_level(speed: SpeedModel, turn: tuple[int, int, int], agents: int, slo: Slo) -> dict[str, Any]:
    """A level predicted from the speed model for a typical (prompt, cached, output) turn, as on a CPU: agents
    share the cores, so with n agents a turn takes n times as long (batched decode makes this pessimistic)."""
    prompt, cached, out = turn
    pre, dec = speed.turn_seconds(prompt, min(cached, prompt), out)
    ttft_ms, e2e_ms = 1000 * agents * pre, 1000 * agents * (pre + dec)
    itl_ms = 1000 * agents * dec / max(1, out)
    meets = all(want is None or got <= want for got, want in
                ((ttft_ms, slo.ttft_ms), (itl_ms, slo.itl_ms), (e2e_ms, slo.e2e_ms)))
    return {"predicted ttft ms": round(ttft_ms, 1), "predicted e2e ms": round(e2e_ms, 1),
            "predicted goodput (req/s)": round(agents / (e2e_ms / 1000), 3) if meets else 0.0,
            "predicted meets SLO": meets}


def typical_turn(records: Sequence[TurnRecord], max_tokens: int) -> tuple[int, int, int]:
    """Median prompt and cached tokens of the measured turns, and the reply length."""
    with_cache = [r.cache for r in records if r.cache]
    if not with_cache:
        return (0, 0, max_tokens)
    return (int(statistics.median(c.prompt_n for c in with_cache)), int(statistics.median(c.cache_n for c in with_cache)),
            max_tokens)


def slot_options(model: Path, server_args: Sequence[str], per_slot_ctx: int, slot_counts: Sequence[int],
                 device: str = "this-machine", predicted: Any = None) -> list[dict[str, Any]]:
    """For each -np: the planner's verdict and need at -c = np x per-slot context (what these sessions need),
    and, given `predicted(n)`, the speed model's level with n agents."""
    from kvbook.notebook.ops_support import repo_paths
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import detect_host, local_request
    from kvbook.plan.api import plan as make_plan
    from kvbook.plan.devices import load_device
    from kvbook.plan.flags import parse_server_args

    host = detect_host()
    base = parse_server_args(["-m", str(model), *repo_paths(list(server_args))], {})
    request = local_request(base, load_device(device, host), host=host)
    rows = []
    for n in slot_counts:
        plan = make_plan(request.with_flags(dataclasses.replace(base, parallel=n, ctx=n * per_slot_ctx)),
                         fit_fallback=FIT_PARAMS)
        start = plan.memory.start_bytes
        need = plan.memory.total_bytes
        rows.append({"slots (-np)": n, "-c": n * per_slot_ctx, "per-slot context": per_slot_ctx,
                     "verdict": plan.verdict.value, "start GiB": round(start / 2**30, 2),
                     "with host growth GiB": round(need / 2**30, 2), **(predicted(n) if predicted else {})})
    return rows


def recommend(rows: Sequence[dict[str, Any]], levels: Sequence[LevelResult], slots: int, max_ok: int,
              max_output: int) -> dict[str, Any]:
    """How many agents this server (its -np) holds under the SLO, whether a larger -np fits, and the client
    settings for that per-slot context. Only the measured -np has a measured goodput."""
    if max_ok < 1:
        return {"np": slots, "agents": 0, "why": "no concurrency met the SLO: relax it, shorten the prompts, "
                                                 "or use a faster machine"}
    best = max((lv for lv in levels if lv.concurrency == max_ok), key=lambda lv: lv.goodput_rps)
    fitting = [r["slots (-np)"] for r in rows if r["verdict"] != "does not fit"]
    ctx = rows[0]["per-slot context"] if rows else 0
    window = max(1024, ctx - max_output)
    more = [n for n in fitting if slots < n <= max_ok]
    why = (f"-np {slots} served {max_ok} concurrent agent(s) within the SLO at {best.goodput_rps:.2f} req/s; "
           + (f"-np {max(more)} also fits in memory: sweep it to see whether it holds more" if more else
              "agents beyond the slots queue for a slot"))
    return {"np": slots, "agents": max_ok, "goodput_rps": round(best.goodput_rps, 3), "per_slot_ctx": ctx, "why": why,
            "claude_code_env": {"CLAUDE_CODE_ATTRIBUTION_HEADER": "0", "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(window),
                                "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output)},
            "litellm_max_input_tokens": window}


# ------------------------------------------------------------------ scale-out behind LiteLLM

def scale_out(model: Path, server_args: Sequence[str], run_dir: Path, shape: AgentShape, workload: Workload,
              slo: Slo, levels: Sequence[int], *, servers: int = 2, sessions_min: int = 2,
              routing: str = "least-busy") -> list[dict[str, Any]]:
    """The same levels against 1 and against `servers` llama-servers (-t 1 each) behind one LiteLLM model group."""
    from kvbook.notebook.ops_support import repo_paths
    from kvbook.ops.litellm import ANTHROPIC, Route, start_proxy
    from kvbook.ops.llama_server import start_llama_server
    argv = ["-m", str(model), *_one_thread(repo_paths(list(server_args)))]
    rows: list[dict[str, Any]] = []
    nonce = run_nonce()
    with contextlib.ExitStack() as stack:
        backends = [stack.enter_context(start_llama_server(argv, run_dir=run_dir)) for _ in range(servers)]
        import requests

        props = requests.get(backends[0].base_url + "/props", timeout=10).json()
        facts = ServerFacts(int(props.get("total_slots") or 1), int(props["default_generation_settings"]["n_ctx"]))
        sizes = (1, servers)
        # one LiteLLM, one model group per size: kvbook-group-1 is backend 0, kvbook-group-N all N backends
        groups = tuple(Route(f"kvbook-group-{n}", ANTHROPIC, "local", b.base_url) for n in sizes for b in backends[:n])
        proxy = stack.enter_context(start_proxy(groups, run_dir=run_dir / "litellm", routing_strategy=routing))
        ptoks = count_tokens(Target("direct", backends[0].base_url, "local"), shared_prefix_body(shape, "local", nonce))
        with concurrent.futures.ThreadPoolExecutor(len(backends)) as pool:  # requests only: one thread per server
            list(pool.map(lambda b: warm_up(Target("direct", b.base_url, "local"), shape, nonce), backends))
        for n in sizes:
            target = Target(f"litellm-group-{n}", proxy.base_url, f"kvbook-group-{n}",
                            {"authorization": f"Bearer {proxy.master_key}"})
            for c in levels:
                run: LevelRun = run_level(target, shape, workload, c, sessions=max(c, sessions_min), facts=facts,
                                          prefix_tokens=ptoks, nonce=nonce, label=f"so{n}-")
                lv = summarize_level(c, [t.sample for t in run.turns], run.wall_s, slo)
                rows.append({"servers": n, **level_rows([lv])[0]})
    return rows


# ------------------------------------------------------------------ the whole measurement

@dataclass(frozen=True)
class CapacityParams:
    """The notebook's parameters, checked once before anything starts."""

    model: str
    server_args: tuple[str, ...]
    speed_depths: tuple[int, ...]
    speed_fit_depths: tuple[int, ...]
    prompt_scale: float
    workload: Workload
    slo: Slo
    max_concurrency: int
    sessions_min: int
    level_budget_s: float
    cache_sessions: int
    slot_counts: tuple[int, ...]
    per_slot_ctx: int
    scale_out: bool
    scale_out_levels: tuple[int, ...]
    spec_acceptance: float = 0.75
    spec_draft_n: int = 3
    spec_draft_cost: float = 0.2

    def __post_init__(self) -> None:
        if not self.speed_depths or any(d < 0 for d in self.speed_depths):
            raise BadInput("speed_depths must be non-negative token counts")
        if not 1 <= self.max_concurrency <= 64:
            raise BadInput(f"max_concurrency must be 1..64, got {self.max_concurrency}")
        if not 1 <= self.cache_sessions <= 16:
            raise BadInput(f"cache_sessions must be 1..16, got {self.cache_sessions}")
        if not self.slot_counts or any(not 1 <= n <= 64 for n in self.slot_counts):
            raise BadInput("slot_counts must be slot numbers 1..64")
        if self.per_slot_ctx < 0:
            raise BadInput("per_slot_ctx must be >= 0 (0: from the prompts the sweep saw)")
        if any(not 1 <= c <= 64 for c in self.scale_out_levels):
            raise BadInput("scale_out_levels must be concurrencies 1..64")
        SpecDecode(self.spec_acceptance, self.spec_draft_n, self.spec_draft_cost, 0.0)  # one clear line if out of range


def capacity_params(*, model: str, server_args: Sequence[str], speed_depths: Sequence[int], speed_fit_depths: Sequence[int],
                    prompt_scale: float, turns: int, turn_words: int, max_tokens: int, reminder: str, subagent_every: int,
                    slo_ttft_ms: float, slo_itl_ms: float, slo_e2e_ms: float, slo_attainment: float, max_concurrency: int,
                    sessions_min: int, level_budget_s: float, cache_sessions: int, slot_counts: Sequence[int],
                    per_slot_ctx: int, scale_out: bool, scale_out_levels: Sequence[int], spec_acceptance: float = 0.75,
                    spec_draft_n: int = 3, spec_draft_cost: float = 0.2) -> CapacityParams:
    """Notebook literals -> CapacityParams (a target of 0 means no target)."""
    return CapacityParams(
        model=model, server_args=tuple(map(str, server_args)), speed_depths=tuple(speed_depths),
        speed_fit_depths=tuple(speed_fit_depths), prompt_scale=prompt_scale,
        workload=Workload(turns=turns, turn_words=turn_words, max_tokens=max_tokens, reminder=reminder,
                          subagent_every=subagent_every),
        slo=Slo(ttft_ms=slo_ttft_ms or None, itl_ms=slo_itl_ms or None, e2e_ms=slo_e2e_ms or None,
                attainment=slo_attainment),
        max_concurrency=max_concurrency, sessions_min=sessions_min, level_budget_s=level_budget_s,
        cache_sessions=cache_sessions, slot_counts=tuple(slot_counts), per_slot_ctx=per_slot_ctx, scale_out=scale_out,
        scale_out_levels=tuple(scale_out_levels), spec_acceptance=spec_acceptance, spec_draft_n=spec_draft_n,
        spec_draft_cost=spec_draft_cost)


@dataclass(frozen=True)
class CapacityResult:
    speed_rows: list[dict[str, Any]]
    speed_error: dict[str, Any]
    turn_rows: list[dict[str, Any]]
    client: str
    full_prefix_tokens: int
    levels: list[dict[str, Any]]
    max_ok: int
    capped: bool
    cache_rows: list[dict[str, Any]]
    cache: dict[str, Any]
    slots: list[dict[str, Any]]
    recommendation: dict[str, Any]
    scale_out: list[dict[str, Any]]
    facts: ServerFacts
    bounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _per_slot_ctx(records: Sequence[TurnRecord], max_tokens: int) -> int:
    peak = max((r.cache.prompt_n for r in records if r.cache), default=0) + max_tokens
    return max(1024, -(-peak // 1024) * 1024)


def measure_capacity(p: CapacityParams, run_dir: Path, progress: bool = True) -> CapacityResult:
    """Speed model, then one llama-server: sweep and cache sessions; then slot options and scale-out."""
    from kvbook.notebook.ops_support import resolve_model

    model = resolve_model(p.model)
    say = print if progress else (lambda *a, **k: None)
    say("speed: llama-bench at depths", list(p.speed_depths), flush=True)
    speed, speed_rows = speed_points(model, p.speed_depths, p.speed_fit_depths,
                                     threads=_threads_arg(p.server_args))
    say("client: capturing Claude Code's requests (with and without the attribution header)", flush=True)
    full, with_header, without = capture_shapes(p.prompt_scale)
    nonce = run_nonce()
    cfg = SweepConfig(slo=p.slo, max_concurrency=p.max_concurrency, sessions_min=p.sessions_min,
                      level_budget_s=p.level_budget_s)
    with serve(model, p.server_args, run_dir) as served:
        full_prefix = prefix_tokens(served, full, nonce)
        say(f"sweep: up to {p.max_concurrency} concurrent agents against {served.facts.slots} slot(s)", flush=True)
        swept = run_sweep(served, without, p.workload, cfg, nonce, progress)
        say("cache: sessions with and without the attribution header", flush=True)
        records = cache_sessions(served, {"header": with_header, "noheader": without}, p.workload,
                                 sessions=p.cache_sessions, nonce=nonce)
        crowded = served.facts.slots + 1
        records += cache_sessions(served, {"crowded": without}, p.workload, sessions=crowded, concurrency=crowded,
                                  nonce=nonce)
        facts = served.facts
    levels = list(swept.search.levels)
    sweep_records = [t for run in swept.runs for t in run.turns]
    per_slot = p.per_slot_ctx or _per_slot_ctx(sweep_records, p.workload.max_tokens)
    turn = typical_turn(sweep_records, p.workload.max_tokens)
    slots = slot_options(model, p.server_args, per_slot, p.slot_counts,
                         predicted=lambda n: predict_level(speed, turn, n, p.slo))
    by_c = {lv.concurrency: lv for lv in levels}
    for row in slots:  # measured on this server (its own -np) at that many agents, where the sweep went
        lv = by_c.get(row["slots (-np)"])
        row["measured goodput with that many agents (req/s)"] = round(lv.goodput_rps, 3) if lv else None
    rec = recommend(slots, levels, facts.slots, swept.search.max_concurrency_meeting_slo, p.workload.max_tokens)
    scaled = []
    if p.scale_out:
        say("scale-out: one and two llama-servers (-t 1 each) behind one LiteLLM model group", flush=True)
        scaled = scale_out(model, p.server_args, run_dir / "scale-out", without, p.workload, p.slo, p.scale_out_levels,
                           sessions_min=p.sessions_min)
    return CapacityResult(
        speed_rows=speed_rows, speed_error=held_out_median_error(speed_rows),
        turn_rows=turn_time_rows(speed, full_prefix + 200, full_prefix, p.workload.max_tokens,
                                 spec_setup(speed, p.spec_acceptance, p.spec_draft_n, p.spec_draft_cost,
                                            full_prefix + 200)), client=full.client,
        full_prefix_tokens=full_prefix, levels=level_rows(levels), max_ok=swept.search.max_concurrency_meeting_slo,
        capped=swept.search.capped, cache_rows=cache_rows(records), cache=cache_block(records), slots=slots,
        recommendation=rec, scale_out=scaled, facts=facts,
        bounds=decode_bound_rows(model, sorted({min(p.speed_depths), max(p.speed_depths)})))


def _one_thread(args: Sequence[str]) -> list[str]:
    """The flags with -t/--threads set to 1 (two servers must not fight over the same cores)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-t", "--threads"):
            skip = True
            continue
        out.append(a)
    return [*out, "-t", "1"]


def _threads_arg(args: Sequence[str]) -> int | None:
    for flag in ("-t", "--threads"):
        if flag in args and args.index(flag) + 1 < len(args):
            return int(args[args.index(flag) + 1])
    return None


def capacity_summary(p: CapacityParams, r: CapacityResult, *, label: str, build: str) -> dict[str, Any]:
    """summary.json: the keys the issue names (speed.points, goodput, cache) plus what the index charts."""
    goodput_levels = [{k: row[k] for k in ("concurrency", "ttft_p95_ms", "itl_p95_ms", "e2e_p95_ms", "goodput_rps",
                                           "meets_slo")} for row in r.levels]
    best = next((row for row in r.levels if row["concurrency"] == r.max_ok), None)
    return {
        "kind": "capacity", "label": label, "model": p.model, "llama_build": build, "client": r.client,
        "server_args": list(p.server_args), "slots": r.facts.slots, "ctx_per_slot": r.facts.ctx_per_slot,
        "speed": {"points": [{k: row[k] for k in ("depth", "prefill_tps_measured", "prefill_tps_predicted",
                                                  "decode_tps_measured", "decode_tps_predicted", "held_out")}
                             for row in r.speed_rows],
                  "held_out_median_error": r.speed_error, "claude_code_turn": r.turn_rows,
                  "full_prefix_tokens": r.full_prefix_tokens, "decode_bounds": r.bounds},
        "goodput": {"slo": {"ttft_ms": p.slo.ttft_ms, "itl_ms": p.slo.itl_ms, "e2e_ms": p.slo.e2e_ms,
                            "attainment": p.slo.attainment},
                    "levels": goodput_levels, "max_concurrency_meeting_slo": r.max_ok, "capped": r.capped},
        "cache": r.cache,
        "memory": {"slot_options": r.slots, "recommendation": r.recommendation},
        "scale_out": r.scale_out,
        # flat figures for the runs index and the regression gate
        "trend": {"goodput_rps": best["goodput_rps"] if best else 0.0,
                  "tokens_per_s": max((row["tokens_per_s"] for row in r.levels), default=0.0),
                  "ttft_p50_ms": r.levels[0]["ttft_p50_ms"] if r.levels else None,
                  "decode_tps": r.speed_rows[0]["decode_tps_measured"] if r.speed_rows else None,
                  "prefill_tps": r.speed_rows[0]["prefill_tps_measured"] if r.speed_rows else None},
        "verdict": f"{r.max_ok} concurrent agent(s) meet the SLO" if r.max_ok else "no concurrency meets the SLO",
    }
