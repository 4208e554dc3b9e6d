"""The one serialiser of a Plan: the flat JSON contract (`kvbook plan --json`, summaries) and its text form."""

from __future__ import annotations

from typing import Any

from kvbook.interface import FitOutcome, GiB, MiB, Plan, PoolUsage, to_dict
from kvbook.memory.rules import prompt_state_bytes, prompts_to_fill
from kvbook.plan.solver import Solution


def _size(n: int) -> str:
    """Bytes as a right-aligned GiB or MiB figure for the text plan."""
    return f"{n / GiB:9.2f} GiB" if abs(n) >= GiB else f"{n / MiB:9.2f} MiB"


# 2: "projector" and "draft"; 3: devices[].repack_bytes; 4: placement "experts"; 5: start_bytes, host_extras_bytes
# and total_bytes are the devices' sums (CPU_REPACK, weight copies and the draft's growth included); 6: "host_growth",
# pools[] and devices[] "includes"; 7: "fit" (what llama-server's --fit changes at start); 8: "notes" are
# {code, text} objects (codes in kvbook.interface.NOTE_CODES), solver.rejected[] gain "code"; bump on any change to the keys below;
# lib/kvbook/data/plan.schema.json describes them
SCHEMA_VERSION = 8


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as the flat JSON contract other tools and notebooks read (format_plan prints its totals)."""
    mem = plan.memory
    main = max((u for u in plan.pools if not u.includes), key=lambda u: u.need_bytes)  # Apple: Metal's, not RAM's
    held = _held(plan)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": plan.model.name,
        "arch": plan.model.arch,
        "source": plan.model.source,
        "device": plan.device.id,
        "n_ctx": mem.shape.n_ctx,
        "n_ctx_seq": mem.shape.n_ctx_seq,
        "n_seq": mem.shape.n_seq,
        "kv_unified": mem.shape.kv_unified,
        "n_batch": mem.shape.n_batch,
        "n_ubatch": mem.shape.n_ubatch,
        "flash_attn": mem.shape.flash_attn,
        "caches": [
            {"kind": c.kind.value, "cells": c.cells, "layers": c.layers, "k_type": c.k_type, "v_type": c.v_type,
             "k_bytes": c.k_bytes, "v_bytes": c.v_bytes, "bytes": c.bytes}
            for c in mem.caches
        ],
        "kv_bytes": mem.kv_bytes,
        "recurrent_bytes": mem.recurrent_bytes,
        "weights_bytes": mem.weights_bytes,
        "weights_exact": mem.weights_exact,
        "weights_note": plan.model.weights_note,
        "compute_bytes": mem.compute.bytes,
        "compute_error_pct": mem.compute.error_pct if plan.compute_calibrated else None,
        "compute_backend": plan.compute_backend,
        "accounting": plan.accounting,
        "compute_calibrated": plan.compute_calibrated,
        "output_bytes": mem.output_bytes,
        "projector": projector_entry(plan),
        "draft": draft_entry(plan),
        "host_extras_bytes": held["extras"],
        "start_bytes": held["start"],
        "total_bytes": held["total"],
        "budget_bytes": main.budget_bytes,
        "pools": [{"pool": u.pool, "need_bytes": u.need_bytes, "budget_bytes": u.budget_bytes,
                   "verdict": u.verdict.value, "headroom_bytes": u.headroom_bytes, "includes": list(u.includes)}
                  for u in plan.pools],
        "host_growth": host_growth_entry(plan),
        "devices": [device_entry(plan, u) for u in plan.pools],
        "placement": placement_entry(plan),
        "verdict": plan.verdict.value,
        "max_ctx": plan.max_ctx,
        "alternatives": to_dict(plan.alternatives),
        "llama_server_args": list(plan.flags.argv),
        "litellm_max_input_tokens": plan.litellm_max_input_tokens,
        "notes": [{"code": n.code, "text": n.text} for n in plan.notes],
        "flags_read": [{"flag": f, "source": src, "changes": what} for f, src, what in plan.flags.read],
        "fit": fit_entry(plan),
    }


def fit_entry(plan: Plan) -> dict[str, Any] | None:
    """What llama-server's --fit does at start (plan/fit.py); None where it was not looked at."""
    fit = plan.fit
    if fit is None:
        return None
    return {"status": fit.status, "changes": list(fit.changes), "reason": fit.reason,
            "given_args": list(fit.given_args), "adjusted_args": list(fit.adjusted_args),
            "devices": [{"name": _device_name(plan, n), "target_bytes": t, "used_bytes": dict(fit.used).get(n),
                         **_fit_layers(fit, n)} for n, t in fit.targets],
            "evaluations": fit.evaluations}


def _fit_layers(fit: FitOutcome, name: str) -> dict[str, str | int | None]:
    """The layers fit gives a device: how many, how many of them partial (experts on the CPU), and what the
    first partial one keeps (MOE: all but its experts; UP / GATE / ATTN: part of its dense FFN too)."""
    row = next((r for r in fit.layers if r[0] == name), None)
    return {"n_layer": row[1], "n_partial": row[2], "first_partial_keeps": row[3]} if row else {
        "n_layer": None, "n_partial": None, "first_partial_keeps": None}


def draft_entry(plan: Plan) -> dict[str, Any] | None:
    """The draft model's own context (-md), sized like the target's, or the MTP context on the model's own NextN
    layers (--spec-type draft-mtp: model "<name> (MTP)"); None without either."""
    arch, mem = plan.model.draft, plan.memory.draft
    mtp = arch is None and mem is not None
    arch = plan.model if mtp else arch
    if arch is None or mem is None:
        return None
    from kvbook.plan.planner import draft_pool, mtp_pool

    pool = (mtp_pool if mtp else draft_pool)(plan.model, plan.flags, plan.device)
    return {"model": f"{arch.name} (MTP)" if mtp else arch.name, "arch": arch.arch, "source": arch.source, "n_ctx": mem.shape.n_ctx,
            "n_ctx_seq": mem.shape.n_ctx_seq,
            "caches": [{"kind": c.kind.value, "cells": c.cells, "layers": c.layers, "k_type": c.k_type,
                        "v_type": c.v_type, "k_bytes": c.k_bytes, "v_bytes": c.v_bytes, "bytes": c.bytes}
                       for c in mem.caches],
            "weights_bytes": mem.weights_bytes, "kv_bytes": mem.kv_bytes, "recurrent_bytes": mem.recurrent_bytes,
            "compute_bytes": mem.compute.bytes, "output_bytes": mem.output_bytes, "start_bytes": mem.start_bytes,
            "device": _device_name(plan, pool)}


def projector_entry(plan: Plan) -> dict[str, Any] | None:
    """The multimodal projector llama-server loads with the model (None without one)."""
    proj, mem = plan.model.projector, plan.memory.projector
    if proj is None or mem is None:
        return None
    from kvbook.plan.planner import projector_pool

    return {"source": proj.source, "projector_type": proj.projector_type, "weights_bytes": mem.weights_bytes,
            "weights_exact": True, "compute_bytes": mem.compute_bytes, "compute_note": mem.compute_note,
            "device": _device_name(plan, projector_pool(plan.memory, plan.device) or "")}


def device_entry(plan: Plan, use: PoolUsage) -> dict[str, Any]:
    """One device as llama.cpp names it (the host pool is its CPU device) with what it must hold."""
    kind = next((p.kind for p in plan.device.pools if p.name == use.pool), "host")
    return {"name": _device_name(plan, use.pool), "kind": kind, "budget_bytes": use.budget_bytes,
            "weights_bytes": use.weights_bytes, "kv_bytes": use.kv_bytes, "recurrent_bytes": use.recurrent_bytes,
            "compute_bytes": use.compute_bytes, "output_bytes": use.output_bytes,
            "host_extras_bytes": use.host_extras_bytes, "repack_bytes": use.repack_bytes, "need_bytes": use.need_bytes,
            "includes": [_device_name(plan, p) for p in use.includes], "verdict": use.verdict.value}


GROWTH_PROMPT_TOKENS = 4096  # the prompt size the plan states the prompt cache's fill rate for


def host_growth_entry(plan: Plan) -> dict[str, Any]:
    """How host growth fills: each checkpoint and how many the slots keep, the prompt cache's bytes per cached
    token, what one distinct 4k-token prompt costs there, and how many such prompts fill --cache-ram."""
    h = plan.memory.host_extras
    return {"cache_ram_bytes": h.cache_ram_bytes, "checkpoint_bytes": h.checkpoint_bytes,
            "checkpoint_each_bytes": h.checkpoint_each_bytes, "checkpoints_max": h.checkpoints_max,
            "cache_token_bytes": h.cache_token_bytes, "cache_prompt_bytes": h.cache_prompt_bytes,
            "cache_prompt_checkpoints": h.cache_prompt_checkpoints, "prompt_tokens": GROWTH_PROMPT_TOKENS,
            "prompt_state_bytes": prompt_state_bytes(h, GROWTH_PROMPT_TOKENS),
            "prompts_to_fill": prompts_to_fill(h, GROWTH_PROMPT_TOKENS), "ngram_bytes": h.ngram_bytes,
            "spec_checkpoint_bytes": h.spec_checkpoint_bytes}


def _growth_text(plan: Plan) -> str:
    """The host growth line's explanation: the checkpoints' count and size, and the prompt cache's fill rate."""
    h = plan.memory.host_extras
    parts = []
    if h.checkpoints_max:
        parts.append(f"{h.checkpoints_max} checkpoints x {_size(h.checkpoint_each_bytes).strip()} "
                     f"(--ctx-checkpoints {plan.flags.ctx_checkpoints} per slot x {plan.memory.shape.n_seq} slot(s))")
    if plan.flags.cache_ram_mib < 0:
        parts.append("prompt cache without a limit (--cache-ram -1)")
    elif h.cache_ram_bytes:
        n = prompts_to_fill(h, GROWTH_PROMPT_TOKENS)
        each = _size(prompt_state_bytes(h, GROWTH_PROMPT_TOKENS)).strip()
        parts.append(f"prompt cache {_size(h.cache_ram_bytes).strip()} (--cache-ram), full after about {n} distinct "
                     f"{GROWTH_PROMPT_TOKENS // 1024}k-token prompts ({each} each: "
                     f"{h.cache_token_bytes:,} B per token" + (
                         f" + {h.cache_prompt_checkpoints} checkpoints" if h.cache_prompt_checkpoints else "") + ")")
    else:
        parts.append("no prompt cache (--cache-ram 0)")
    if h.spec_checkpoint_bytes:
        parts.append(f"speculative checkpoints {_size(h.spec_checkpoint_bytes).strip()} (one state per slot)")
    if h.spec_output_bytes:
        parts.append(f"speculative output rows {_size(h.spec_output_bytes).strip()} at the first long prompt (the "
                     "target's extracted layers per batch token, the draft's logits rows)")
    if h.ngram_bytes:
        parts.append(f"n-gram tables {_size(h.ngram_bytes).strip()} from start (--spec-type "
                     f"{','.join(t for t in plan.flags.spec_types if t.startswith('ngram'))})")
    return "; ".join(parts)


def _device_name(plan: Plan, pool: str) -> str:
    kind = next((p.kind for p in plan.device.pools if p.name == pool), "host")
    return "CPU" if kind == "host" else pool


def _runs(devices: list[str]) -> list[dict[str, Any]]:
    """Consecutive layers on the same device as {device, first, last} runs."""
    runs: list[dict[str, Any]] = []
    for il, name in enumerate(devices):
        if runs and runs[-1]["device"] == name and runs[-1]["last"] == il - 1:
            runs[-1]["last"] = il
        else:
            runs.append({"device": name, "first": il, "last": il})
    return runs


def placement_entry(plan: Plan) -> dict[str, Any]:
    """Which device holds which layers and tensor groups: input = token embeddings (always on the CPU); a layer's
    attention, dense FFN, norms, KV and recurrent state sit with the layer; its experts on the CPU where --cpu-moe,
    --n-cpu-moe or -ot keep them (`experts`, [] for a dense model); output = the output layer."""
    layers = [_device_name(plan, pool) for pool in plan.layers_on]
    experts = [_device_name(plan, pool) for pool in plan.experts_on]
    return {"input": "CPU", "layers": _runs(layers), "experts": _runs(experts),
            "output": _device_name(plan, plan.output_on) if plan.output_on else "CPU"}


def _held(plan: Plan) -> dict[str, int]:
    """What the devices hold in all, by kind (weights, compute, extras) and start / total: the sums of the
    per-device rows (CPU_REPACK copies included), so the plan's totals, in JSON and text, add up to its rows
    (several devices hold more than one would)."""
    out = {k: sum(getattr(u, f"{k}_bytes") for u in plan.pools) for k in ("weights", "compute", "host_extras")}
    inside = {name for u in plan.pools for name in u.includes}  # counted in a covering pool's need (Apple's RAM)
    total = sum(u.need_bytes for u in plan.pools if u.pool not in inside)
    return {"weights": out["weights"], "compute": out["compute"], "extras": out["host_extras"],
            "start": total - out["host_extras"], "total": total}


def _model_weights_compute(plan: Plan) -> tuple[int, int]:
    """The model's weights (LoRA, projector and draft included) and compute as one device would hold them."""
    mem = plan.memory
    weights = mem.weights_bytes + mem.lora_bytes + (mem.projector.weights_bytes if mem.projector else 0) + (
        mem.draft.weights_bytes if mem.draft else 0)
    compute = mem.compute.bytes + (mem.projector.compute_bytes if mem.projector else 0) + (
        mem.draft.compute.bytes if mem.draft else 0)
    return weights, compute


def _compute_note(plan: Plan, per_device: bool) -> str:
    """What the compute line stands for: the one estimate, or the sum of a buffer per device."""
    mem = plan.memory
    if plan.note_text("compute.gpu-intervals"):  # kvbook.memory.backends: each GPU backend's own model, fitted on public logs
        rows = ", ".join(f"{_device_name(plan, u.pool)} {_size(u.compute_bytes).strip()}" for u in plan.pools
                         if u.compute_bytes)
        return (f"a buffer per device and on the host side ({rows}), the high end of each backend's interval "
                "over public logs (docs/accuracy.md; the estimates are in the notes)")
    if per_device:
        rows = ", ".join(f"{_device_name(plan, u.pool)} {_size(u.compute_bytes).strip()}" for u in plan.pools
                         if u.compute_bytes)
        gpus = sorted({u.pool.rstrip("0123456789") for u in plan.pools if u.compute_bytes and any(
            p.name == u.pool and p.kind == "gpu" for p in plan.device.pools)})
        bounded = bool(plan.note_text("spread.dense-ops-bound"))
        return (f"a buffer on each device that runs layers and on the CPU ({rows}): "
                + ("an upper bound fitted to loopback RPC runs" if bounded else
                   "calibrated per device on the CPU backend over RPC")
                + (f", not calibrated for {'/'.join(gpus)}" if gpus else "")
                + f"; one device alone: {_size(mem.compute.bytes).strip()}")
    if plan.accounting != "kvbook":
        return "llama.cpp's own reservation (llama-fit-params, CPU backend)"
    if plan.compute_calibrated:
        return f"approximate, worst error seen {mem.compute.error_pct}% (calibrated on CPU)"
    return f"not calibrated for {plan.compute_backend}: the CPU estimate; {plan.compute_backend} buffers differ"


def format_plan(plan: Plan) -> str:
    """The plan as the text `kvbook plan` prints."""
    m, mem = plan.model, plan.memory
    s = mem.shape
    lines = [
        f"model    {m.name} ({m.arch}, {m.n_layer} layers) from {m.source}",
        f"device   {plan.device.name}",
        f"context  n_ctx={s.n_ctx} n_ctx_seq={s.n_ctx_seq} slots={s.n_seq} unified={str(s.kv_unified).lower()} "
        f"ubatch={s.n_ubatch} flash_attn={'on' if s.flash_attn else 'off'}",
        "",
        f"  weights      {_size(mem.weights_bytes)}  {m.weights_note}",
    ]
    for c in mem.caches:
        types = f"{c.k_type}/{c.v_type}" if c.v_type else f"{c.k_type} (K only, MLA)"
        label = {"kv": "KV cache", "swa": "SWA cache", "recurrent": "recurrent"}[c.kind.value]
        lines.append(f"  {label:<12} {_size(c.bytes)}  {c.cells} cells x {c.layers} layers, {types}")
    held, doc = _held(plan), plan_summary(plan)
    model_weights, model_compute = _model_weights_compute(plan)
    copies = held["weights"] - model_weights
    lines += [
        *([f"  weight copies{_size(copies)}  held beyond the file's tensors: the CPU maps the file from its first CPU "
           "tensor to the end of its last (tensors in between count), a tied output on a device holds a copy of the "
           "token embeddings"] if copies else []),
        *([f"  LoRA         {_size(mem.lora_bytes)}  adapters, next to the weights they adapt"] if mem.lora_bytes else []),
        f"  compute      {_size(held['compute'] - (model_compute - mem.compute.bytes))}  "
        + _compute_note(plan, held["compute"] != model_compute),
        f"  output       {_size(mem.output_bytes)}  logits",
        *([f"  projector    {_size(mem.projector.weights_bytes)}  weights, exact: {plan.model.projector.projector_type} "
           f"tensors of {plan.model.projector.source}",
           f"  proj compute {_size(mem.projector.compute_bytes)}  {mem.projector.compute_note}"]
          if mem.projector and plan.model.projector else []),
        *([f"  draft        {_size(mem.draft.start_bytes)}  {doc['draft']['model']}: weights "
           f"{_size(mem.draft.weights_bytes).strip()}, KV {_size(mem.draft.kv_bytes + mem.draft.recurrent_bytes).strip()}"
           f", compute {_size(mem.draft.compute.bytes).strip()}, logits {_size(mem.draft.output_bytes).strip()}"]
          if mem.draft and doc.get("draft") else []),
        f"  at start     {_size(doc['start_bytes'])}",
        f"  host growth  {_size(doc['host_extras_bytes'])}  {_growth_text(plan)}",
        f"  total        {_size(doc['total_bytes'])}" + ("  what the devices below hold in all" if len(plan.pools) > 1 else ""),
        "",
    ]
    for u in plan.pools:
        covers = f" (all of it: {', '.join(u.includes)} included)" if u.includes else ""
        lines.append(f"  {u.pool}: needs {_size(u.need_bytes).strip()} of {_size(u.budget_bytes).strip()} "
                     f"-> {u.verdict.value} (headroom {_size(u.headroom_bytes).strip()}){covers}")
        if len(plan.pools) > 1:
            rest = "".join(f", {label} {_size(n).strip()}" for label, n in (("output", u.output_bytes),
                                                                           ("host growth", u.host_extras_bytes)) if n)
            lines.append(f"      weights {_size(u.weights_bytes).strip()}, KV {_size(u.kv_bytes).strip()}, "
                         f"recurrent {_size(u.recurrent_bytes).strip()}, compute {_size(u.compute_bytes).strip()}{rest}")
    where = doc["placement"]
    if len({*plan.layers_on, plan.output_on}) > 1:
        lines.append("  layers: " + "; ".join(f"{r['first']}-{r['last']} on {r['device']}" for r in where["layers"])
                     + f"; output on {where['output']}")
    if where["experts"] and where["experts"] != where["layers"]:
        lines.append("  experts: " + "; ".join(f"{r['first']}-{r['last']} on {r['device']}" for r in where["experts"]))
    largest = str(plan.max_ctx) if plan.accounting == "kvbook" else "not searched (llama.cpp's accounting)"
    tight = [u.pool for u in plan.pools if u.verdict.value == "tight"]
    why = (f": it starts; host growth or the margin does not fit {', '.join(tight)}"
           if plan.verdict.value == "tight" else "")
    lines += ["", f"verdict  {plan.verdict.value.upper()}{why}", f"largest context that fits (start allocation): {largest}"]
    for alt in plan.alternatives:
        lines.append(f"  alternative: {alt.change} -> {_size(alt.total_bytes).strip()} ({alt.verdict.value})")
    lines.append(f"LiteLLM model_info.max_input_tokens: {plan.litellm_max_input_tokens}")
    lines += [f"note: {n.text}" for n in plan.notes]
    if plan.flags.read:
        lines.append("flags read:")
        lines += [f"  {f:<28} {what}" + ("  (from the environment)" if src == "environment" else "")
                  for f, src, what in plan.flags.read]
    return "\n".join(lines)


def solution_entry(solution: Solution, plan: Plan) -> dict[str, Any]:
    """The solver's answer for `kvbook plan --solve --json`: ranked placements with their argv and per-device
    rows (named as llama.cpp names devices), and every rejected option with its reason."""
    return {
        "objective": solution.objective,
        "fixed": list(solution.fixed),
        "searched": solution.searched,
        "fitting": solution.fitting,
        "placements": [
            {"rank": p.rank, "llama_server_args": list(p.argv), "n_ctx": p.n_ctx, "n_gpu_layers": p.n_gpu_layers,
             "n_cpu_moe": p.n_cpu_moe, "tensor_split": list(p.tensor_split), "cache_type": p.cache_type,
             "host_read_bytes_per_token": p.host_read_bytes, "verdict": p.verdict.value,
             "devices": [{"name": _device_name(plan, u.pool), "need_bytes": u.need_bytes, "budget_bytes": u.budget_bytes,
                          "verdict": u.verdict.value} for u in p.pools]}
            for p in solution.placements
        ],
        "rejected": [{"option": r.option, "code": r.reason.code, "reason": r.reason.text} for r in solution.rejected],
    }


def format_solution(solution: Solution, plan: Plan) -> str:
    """The solver's ranked table as text."""
    lines = [f"solver   objective {solution.objective}: {solution.fitting} of {solution.searched} placements start"
             + (f"; kept as given: {', '.join(solution.fixed)}" if solution.fixed else "")]
    for p in solution.placements:
        rows = ", ".join(f"{_device_name(plan, u.pool)} {_size(u.need_bytes).strip()}/{_size(u.budget_bytes).strip()}"
                         for u in p.pools)
        lines.append(f"  #{p.rank} -c {p.n_ctx}, host reads {_size(p.host_read_bytes).strip()}/token ({p.verdict.value}): {rows}")
        lines.append("      llama-server " + " ".join(p.argv))
    if not solution.placements:
        lines.append("  no placement starts on these devices")
    if solution.rejected:
        lines.append(f"  rejected: {len(solution.rejected)}")
        lines += [f"    {r.option}: {r.reason.text}" for r in solution.rejected]
    return "\n".join(lines)
