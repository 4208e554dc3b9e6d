"""`kvbook check-log`: rebuild the model, context, offload and devices from a pasted llama.cpp log, plan the same
run with kvbook's rules, and put the logged and planned weights, KV, recurrent state and compute side by side per
device (as the log names it).

Weights are taken as logged (a log has no tensor list; the per-buffer model sizes are the truth); KV and recurrent
state are planned by kvbook's rules and must match to the log's two decimals; compute is the per-backend model of
kvbook.memory.backends. A log whose build's rules differ from the pinned build's is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass, field

from kvbook.errors import BadInput, ModelError
from kvbook.interface import Device, FlashAttn, MemoryPlan, MiB, ModelArch, Plan, Pool, ServerFlags
from kvbook.memory.backends import DeviceCompute, backend_of
from kvbook.memory.rules import plan_memory
from kvbook.model.arch import UnknownArchitecture, arch_from_metadata
from kvbook.ops.logrun import LogRun, parse_run

# builds from this number on reserve min(n_ubatch, n_outputs_max) logits rows and feed an f16 KQ mask under flash
# attention (ggml-org/llama.cpp#23861 and #23764, merged 2026-05-28..30; b9272 is documented before them in #23527).
# Their logs print `llama_context: n_outputs_max`, which decides when present; the number decides otherwise.
NEW_GRAPH_BUILD = 9400
# builds from this number carry the embeddings input (inp_embd) in every graph (ggml-org/llama.cpp#18898, merged
# 2026-01-18; b7868 was released 2026-01-29): a second f32 n_embd x n_ubatch tensor on the host side. Corpus logs
# b6699 and b7342 have one, b8110 on two; a build in b7700-b7867 may fall either side of this number.
EMBD_INPUT_BUILD = 7800
# upstream passed b5000 before any log format check-log reads (llama_kv_cache without _unified is ~b6230): a smaller
# number with this era's lines is a fork's or a packager's own counter, not comparable, so it is not used
FORK_BUILD_BELOW = 5000
# the mixed tokens+embeddings path (two more host inputs): in the pinned build's source, not in b9849 (corpus 046/050
# exact without it); 062, a master clone of about 2026-10, has it. Builds b9850-b11433 are planned without it, wrong
# for part of that range (which part is not known here)
MIXED_INPUT_BUILD = 11434
_HOST = re.compile(r"^(CPU|Host|.*_Host)")
# print_info key -> GGUF metadata key (without the `{arch}.` prefix)
_KEYS = {
    "n_ctx_train": "context_length", "n_embd": "embedding_length", "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv", "n_embd_head_k": "attention.key_length",
    "n_embd_head_v": "attention.value_length", "n_embd_head_k_swa": "attention.key_length_swa",
    "n_embd_head_v_swa": "attention.value_length_swa", "n_embd_head_k_mla": "attention.key_length_mla",
    "n_embd_head_v_mla": "attention.value_length_mla", "n_swa": "attention.sliding_window",
    "n_swa_pattern": "attention.sliding_window_pattern", "n_ff": "feed_forward_length", "n_expert": "expert_count",
    "n_expert_used": "expert_used_count", "n_ff_exp": "expert_feed_forward_length", "ssm_d_conv": "ssm.conv_kernel",
    "ssm_d_inner": "ssm.inner_size", "ssm_d_state": "ssm.state_size", "ssm_n_group": "ssm.group_count",
    "n_vocab": "vocab_size", "n_lora_kv": "attention.kv_lora_rank",
}


@dataclass(frozen=True)
class Figures:
    """Bytes of one device's buffers; None where the log (or the plan) has none of that kind."""

    weights_bytes: int | None = None
    kv_bytes: int | None = None
    recurrent_bytes: int | None = None
    compute_bytes: int | None = None
    compute_low_bytes: int | None = None  # the backend's interval around the compute estimate (planned: its high end)
    compute_high_bytes: int | None = None


@dataclass(frozen=True)
class DeviceRow:
    """One device as the log names it, logged beside planned."""

    name: str
    backend: str
    logged: Figures
    planned: Figures


@dataclass(frozen=True)
class LogCheck:
    """check-log's answer: the log's build, each device's rows, the exact cache checks and what was assumed."""

    build: int | None
    tool: str | None
    model: str
    devices: tuple[DeviceRow, ...]
    kv_mismatches: tuple[str, ...]
    notes: tuple[str, ...]
    refused: str | None = None  # why kvbook does not plan this log (rules differ, no print_info, unknown arch)
    plan: Plan | None = field(default=None, repr=False)


def _mib(x: float | None) -> int | None:
    return None if x is None else round(x * MiB)


def _value(text: str) -> int | list[int] | str:
    """A print_info value as metadata: an int, a per-layer array, or the text."""
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        return int(t)
    if re.fullmatch(r"\[[\d,\s]+\]", t):
        return [int(x) for x in t.strip("[]").split(",") if x.strip()]
    return t


def arch_from_log(run: LogRun) -> ModelArch:
    """The model as llama.cpp printed it (print_info), interpreted by kvbook's architecture rules; weights are the
    log's model buffers (no tensor list in a log)."""
    h = run.hparams
    arch = h.get("arch")
    if not arch:
        raise BadInput("the log has no print_info lines (the model's hyperparameters): kvbook cannot rebuild the model; "
                       "paste the whole load log (llama-server -lv 4 or -v)")
    meta: dict[str, object] = {"general.architecture": arch}
    for key, gguf in _KEYS.items():
        if key in h:
            meta[f"{arch}.{gguf}"] = _value(h[key])
    n_all = h.get("n_layer_all") or h.get("n_layer")
    if n_all is None:
        raise BadInput("the log's print_info has no n_layer line; paste the whole load log")
    meta[f"{arch}.block_count"] = int(n_all)
    if "n_layer_all" in h and "n_layer" in h:
        meta[f"{arch}.nextn_predict_layers"] = int(h["n_layer_all"]) - int(h["n_layer"])
    elif "n_layer_nextn" in h:
        meta[f"{arch}.nextn_predict_layers"] = int(h["n_layer_nextn"])
    # the loader's own metadata dump, where the log has it, is the GGUF's keys as they are (nextn layers,
    # full_attention_interval, sliding_window_pattern... that print_info does not show)
    meta.update({k: v for k, v in run.gguf.items() if k.startswith(f"{arch}.") and k != f"{arch}.vocab_size"})
    weights = round(sum(b.mib for b in run.buffers if b.kind == "model") * MiB)
    try:
        return arch_from_metadata(meta, name=h.get("general.name", arch), source="the log's print_info",
                                  weights_bytes=weights, weights_exact=False,
                                  weights_note="the log's model buffers, taken as logged (a log has no tensor list)")
    except UnknownArchitecture:
        raise BadInput(f"architecture '{arch}' has no kvbook rule, so its caches cannot be planned from the log") from None
    except ModelError as e:
        raise BadInput(f"the log's print_info does not describe a model kvbook can rebuild: {e}") from None


def new_graph(run: LogRun) -> bool:
    """Whether the build reserves min(n_ubatch, n_outputs_max) outputs and feeds f16 masks (see NEW_GRAPH_BUILD)."""
    return "n_outputs_max" in run.context or (run.build is not None and run.build >= NEW_GRAPH_BUILD)


def _device_name(buffer_name: str) -> str:
    """The device a buffer belongs to, as the log names it: MTL0_Mapped -> MTL0; host buffers keep their name
    except the CPU's mapped/repacked weights, which are the CPU's."""
    if buffer_name.startswith("CPU"):
        return "CPU"
    return buffer_name.removesuffix("_Mapped")


def is_host_name(name: str) -> bool:
    """Whether a device name of a log is the host side: CPU, Host (the breakdown table), CUDA_Host, Vulkan_Host..."""
    return bool(_HOST.match(name))


_is_host = is_host_name


def _experts_on_cpu(run: LogRun, arch: ModelArch) -> int:
    """--n-cpu-moe N as the buffers show it: with every layer offloaded, CPU weights beyond the token embeddings are
    routed experts kept on the CPU; their share of the file per layer gives N (0 for a dense model)."""
    if not arch.n_expert or not arch.n_ff_exp:
        return 0
    cpu = sum(b.mib for b in run.buffers if b.kind == "model" and _is_host(_device_name(b.name))) * MiB
    params = _params(run)
    if not params:
        return 0
    per_param = arch.weights_bytes / params
    embd = arch.n_vocab * arch.n_embd * max(per_param, 34 / 32)  # token embeddings, at q8_0 or more
    per_layer = 3 * arch.n_embd * arch.n_ff_exp * arch.n_expert * per_param
    n = int((cpu - embd) / per_layer + 0.25) if per_layer else 0
    return max(0, min(arch.n_layer, n))


def _params(run: LogRun) -> float:
    m = re.match(r"([\d.]+)\s*([KMBT])", run.hparams.get("model params", ""))
    return float(m.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)] if m else 0.0


def _layer_split(run: LogRun, gpus: list[str]) -> tuple[float, ...]:
    """-ts as the KV buffers show it: the attention layers each GPU holds (from each cache's bytes per layer)."""
    per_dev = dict.fromkeys(gpus, 0.0)
    kv_lines = [b for b in run.buffers if b.kind == "kv"]
    idx = 0
    for cache in (c for c in run.caches if c.kind != "recurrent" and c.layers):
        per_layer = cache.total_mib / cache.layers
        acc = 0.0
        while idx < len(kv_lines) and acc < cache.total_mib - 0.02:
            b = kv_lines[idx]
            idx += 1
            acc += b.mib
            if b.name in per_dev and per_layer:
                per_dev[b.name] += b.mib / per_layer
    return tuple(round(v, 3) for v in per_dev.values())


def flags_from_log(run: LogRun, arch: ModelArch, gpus: list[str]) -> tuple[ServerFlags, list[str]]:
    """The llama-server flags that give this log's context and offload, with what had to be inferred."""
    notes: list[str] = []
    n_ctx, n_seq = run.ctx_int("n_ctx"), run.ctx_int("n_seq_max") or 1
    ubatch, batch = run.ctx_int("n_ubatch"), run.ctx_int("n_batch")
    if not n_ctx or not ubatch:
        raise BadInput("the log has no llama_context lines (n_ctx, n_ubatch): it is truncated before the context "
                       "was created; paste the whole load log")
    unified = run.context.get("kv_unified", "false") == "true"
    attn = next((c for c in run.caches if c.kind != "recurrent"), None)
    flash = run.flash_attn
    if flash is None:
        flash = bool(gpus)
        notes.append(f"flash attention: the log does not say how 'auto' resolved; assumed {'on' if flash else 'off'}")
    if run.offloaded:
        ngl = "all" if run.offloaded[0] >= run.offloaded[1] else str(run.offloaded[0])
    else:
        ngl = "all" if gpus else "0"
    moe = _experts_on_cpu(run, arch) if gpus and ngl == "all" else 0
    if moe:
        notes.append(f"experts of about {moe} layer(s) stay on the CPU (the host weights say so): planned as "
                     f"--n-cpu-moe {moe}")
    split = _layer_split(run, gpus) if len(gpus) > 1 else ()
    if split:
        notes.append("layers per GPU from the KV buffers: -ts " + ",".join(f"{x:g}" for x in split))
    flags = ServerFlags(model="(from the log)", ctx=n_ctx, parallel=n_seq, kv_unified=unified,
                        type_k=attn.k_type if attn else "f16", type_v=(attn.v_type or "f16") if attn else "f16",
                        flash_attn=FlashAttn.ON if flash else FlashAttn.OFF, batch=batch or n_ctx, ubatch=ubatch,
                        gpu_layers=ngl, fit=False, cpu_moe_layers=moe,
                        tensor_split=split, cache_ram_mib=0, ctx_checkpoints=0)
    return flags, notes


def device_from_log(run: LogRun) -> tuple[Device, list[str]]:
    """The devices the log used: each GPU by its log name (budget from 'using device ... MiB free' when given) and
    the host as CPU. Metal is planned as a GPU beside the CPU so each side's buffers compare."""
    names = [_device_name(b.name) for b in run.buffers] or [r.name for r in run.breakdown]
    gpus = list(dict.fromkeys(n for n in names if not _is_host(n)))
    free = {name: mib for name, _, mib in run.devices}
    big = 1 << 50
    pools = tuple(Pool(name=g, kind="gpu", budget_bytes=free.get(g, big // MiB) * MiB,
                       total_bytes=free.get(g, big // MiB) * MiB) for g in gpus)
    host = Pool(name="CPU", kind="host", budget_bytes=big, total_bytes=big)
    if not pools:
        return Device(id="log", name="the log's CPU", unified=True, pools=(host,)), []
    return Device(id="log", name="the log's devices: " + ", ".join(gpus), unified=False, pools=(*pools, host)), gpus


def plan_from_log(arch: ModelArch, flags: ServerFlags, device: Device, memory: MemoryPlan
                  ) -> tuple[Plan, dict[str, DeviceCompute] | None]:
    """The one call into the planner (kvbook.plan.planner.make_plan today; its successor takes the same inputs),
    with the GPU-backend compute estimates and intervals behind the plan's pools."""
    from kvbook.plan.planner import device_computes, make_plan

    plan = make_plan(arch, flags, device, memory=memory)
    return plan, device_computes(arch, flags, memory, plan.device)


def _memory(arch: ModelArch, flags: ServerFlags, run: LogRun) -> MemoryPlan:
    """kvbook's memory plan with the build's graph rules (outputs reserved, mask type)."""
    memory = plan_memory(arch, flags)
    shape = dataclasses.replace(memory.shape, embd_input=run.build is None or run.build >= EMBD_INPUT_BUILD,
                                mixed_input=run.build is not None and run.build >= MIXED_INPUT_BUILD)
    if not new_graph(run):
        shape = dataclasses.replace(shape, reserve_outputs=shape.n_ubatch, mask_f32_input=True)
    return dataclasses.replace(memory, shape=shape)


def _context_refusal(run: LogRun, memory: MemoryPlan) -> str | None:
    """Why the log's context differs from what kvbook's rules give for its own numbers (padding rule changes)."""
    n_ctx, n_ctx_seq = run.ctx_int("n_ctx"), run.ctx_int("n_ctx_seq")
    if n_ctx and n_ctx % 256:
        return (f"n_ctx {n_ctx} is not a multiple of 256: this build pads the context by another rule than the pinned "
                "build (256 cells); its caches are not comparable")
    if n_ctx_seq and n_ctx_seq != memory.shape.n_ctx_seq:
        return f"n_ctx_seq {n_ctx_seq} where kvbook's rules give {memory.shape.n_ctx_seq}: this build splits the context otherwise"
    for logged, planned in zip([c for c in run.caches if c.layers or c.kind == "recurrent"], memory.caches):
        if logged.kind == "swa" and logged.cells != planned.cells:
            return (f"the sliding-window cache has {logged.cells} cells where the pinned build's rule gives "
                    f"{planned.cells}: this build sizes the window otherwise")
    return None


def kv_mismatches(run: LogRun, memory: MemoryPlan, rows: Sequence[DeviceRow] = ()) -> tuple[str, ...]:
    """Each cache line (cells, layers, types, K, V, total MiB to two decimals) kvbook does not reproduce; an excerpt
    that leaves a cache's size line out is checked by its buffer lines per device (`rows`) instead."""
    from kvbook.ops.logparse import mib2

    seen = [c for c in run.caches if c.layers or c.kind == "recurrent"]
    out = []
    planned_kinds = [c.kind.value for c in memory.caches]
    if [c.kind for c in seen] != planned_kinds:
        if not all(c.kind in planned_kinds for c in seen) or len(seen) >= len(planned_kinds):
            out.append(f"caches: logged {[c.kind for c in seen]}, planned {planned_kinds}")
            return tuple(out)
        lines = sum(1 for b in run.buffers if b.kind in ("kv", "rs"))
        out += _device_kv_mismatches(rows, 0.006 * MiB * max(1, lines))
    by_kind = {c.kind.value: c for c in memory.caches}
    for got in seen:
        want = by_kind[got.kind]
        tag = f"{want.kind.value} cache"
        pairs = [("cells", want.cells, got.cells), ("K MiB", mib2(want.k_bytes), got.k_mib),
                 ("V MiB", mib2(want.v_bytes), got.v_mib), ("MiB", mib2(want.bytes), got.total_mib)]
        if want.kind.value != "recurrent":
            pairs.append(("layers", want.layers, got.layers))
        out += [f"{tag} {what}: logged {g}, planned {w}" for what, w, g in pairs if w != g]
    return tuple(out)


def check_log(text: str, model: ModelArch | None = None, server_args: Sequence[str] = (),
              build: int | None = None) -> LogCheck:
    """Parse, rebuild, plan and compare one log (BadInput for a text that is not a usable llama.cpp log). A log
    without print_info lines (only the memory-breakdown table, as llama-cli and llama-fit-params print it, or an
    excerpt) is planned when the model (a GGUF, preset, or another log's ModelArch) and the command line's flags are
    given; otherwise its logged figures alone. `build` stands in when the log does not print its build."""
    run = parse_run(text)
    if run.build is not None and run.build < FORK_BUILD_BELOW:  # a fork's or a packager's own counter (b484-...)
        run = dataclasses.replace(run, build=None)
    if run.build is None and build is not None:
        run = dataclasses.replace(run, build=build)
    logged = _logged_rows(run)
    name = run.hparams.get("general.name") or run.hparams.get("arch") or (model.name if model else "unknown model")
    refused = run.era
    from_log = bool(run.hparams.get("arch")) and bool(run.buffers)
    if refused is None and run.rs_seq:
        refused = (f"the recurrent cache holds {run.rs_seq} extra rows per sequence for MTP speculative decoding "
                   "(rs_seq), which kvbook does not plan from a log yet")
    if refused is None and not from_log and model is None:
        refused = ("no print_info lines (the model's hyperparameters) and buffer lines in the log: logged figures only; "
                   "give the model and its flags (kvbook check-log LOG --model GGUF|PRESET -- FLAGS), or paste the "
                   "whole load log (llama-server -lv 4 / -v)")
    if refused:
        return LogCheck(run.build, run.tool, name, tuple(logged.values()), (), (), refused=refused)
    if from_log:
        arch = arch_from_log(run)
        device, gpus = device_from_log(run)
        flags, notes = flags_from_log(run, arch, gpus)
    else:
        assert model is not None
        arch = model
        device, gpus = device_from_log(run)
        flags, notes = _given_flags(run, server_args), [f"model and flags as given ({model.source}); the log has "
                                                        "only the breakdown table (integer MiB)"]
    memory = _memory(arch, flags, run)
    refused = _context_refusal(run, memory) if from_log else None
    if refused:
        return LogCheck(run.build, run.tool, name, tuple(logged.values()), (), tuple(notes), refused=refused)
    plan, computes = plan_from_log(arch, flags, device, memory)
    rows = _rows(run, plan, logged, computes)
    notes.append("weights: the log's model buffers, taken as logged (a log has no tensor list)")
    notes.append("graph rules: " + ("this build's (min(n_ubatch, slots) logits rows, f16 masks under flash attention)"
                                    if new_graph(run) else "before ggml-org/llama.cpp#23861/#23764 (logits for "
                                    "n_ubatch rows, f32 masks cast for flash attention)"))
    if text := plan.note_text("compute.gpu-intervals"):
        notes.append(text)
    mismatches = kv_mismatches(run, memory, rows) if run.caches else _device_kv_mismatches(rows)
    return LogCheck(run.build, run.tool, name, rows, mismatches, tuple(notes), plan=plan)


def _given_flags(run: LogRun, server_args: Sequence[str]) -> ServerFlags:
    """The given command line, with what the log says of the context (n_ctx, slots, ubatch) where it says it."""
    from kvbook.plan.flags import parse_server_args

    flags = parse_server_args(["llama-server", "-m", "(given)", *server_args])
    changes: dict[str, object] = {}
    if n_ctx := run.ctx_int("n_ctx"):
        changes["ctx"] = n_ctx
    if n_seq := run.ctx_int("n_seq_max"):
        changes["parallel"] = n_seq
        changes["kv_unified"] = run.context.get("kv_unified", "false") == "true"
    if ub := run.ctx_int("n_ubatch"):
        changes["ubatch"] = ub
    if run.flash_attn is not None:
        changes["flash_attn"] = FlashAttn.ON if run.flash_attn else FlashAttn.OFF
    if run.offloaded:
        changes["gpu_layers"] = "all" if run.offloaded[0] >= run.offloaded[1] else str(run.offloaded[0])
    return dataclasses.replace(flags, fit=False, **changes)  # type: ignore[arg-type]


def _device_kv_mismatches(rows: Sequence[DeviceRow], tolerance: float = MiB) -> tuple[str, ...]:
    """KV and recurrent state per device against the plan within `tolerance` bytes (the breakdown table's context
    column is integer MiB of both together; buffer lines are MiB to two decimals)."""
    out = []
    for r in rows:
        for what, logged, planned in (("KV", r.logged.kv_bytes, r.planned.kv_bytes),
                                      ("recurrent", r.logged.recurrent_bytes, r.planned.recurrent_bytes)):
            if logged is None and not planned:
                continue
            if abs((planned or 0) - (logged or 0)) > tolerance:
                out.append(f"{r.name} {what}: logged {(logged or 0) / MiB:.2f} MiB, planned {(planned or 0) / MiB:.2f} MiB")
    return tuple(out)


def _logged_rows(run: LogRun) -> dict[str, DeviceRow]:
    """Logged figures per device name (buffer lines; the breakdown table where there are none)."""
    acc: dict[str, dict[str, float]] = {}
    kinds = {"model": "weights_bytes", "kv": "kv_bytes", "rs": "recurrent_bytes", "compute": "compute_bytes"}
    for b in run.buffers:
        if b.kind in kinds:
            row = acc.setdefault(_device_name(b.name), {})
            row[kinds[b.kind]] = row.get(kinds[b.kind], 0.0) + b.mib
    if not run.buffers:
        for r in run.breakdown:
            acc[r.name] = {"weights_bytes": r.model_mib, "kv_bytes": r.context_mib, "compute_bytes": r.compute_mib}
    order = sorted(acc, key=lambda n: (_is_host(n), n != "CPU"))
    return {n: DeviceRow(n, backend_of(n), Figures(**{k: _mib(v) for k, v in acc[n].items()}), Figures())
            for n in order}


def _rows(run: LogRun, plan: Plan, logged: dict[str, DeviceRow],
          computes: dict[str, DeviceCompute] | None) -> tuple[DeviceRow, ...]:
    """Planned figures beside the logged ones: GPU pools by name; the host pool's compute on the log's host-side
    compute buffer (CUDA_Host, Vulkan_Host or CPU), its KV and recurrent state on CPU; weights as logged. Compute is
    the backend model's estimate with its interval (the pools hold its high end)."""
    host_compute = next((n for n in logged if _is_host(n) and logged[n].logged.compute_bytes is not None), "CPU")
    host_kv = "CPU" if "CPU" in logged or "Host" not in logged else "Host"
    rows = dict(logged)
    for name in (host_kv, host_compute):
        rows.setdefault(name, DeviceRow(name, backend_of(name), Figures(), Figures()))
    out = []
    for name, row in rows.items():
        pool = next((u for u in plan.pools if u.pool == name or (u.pool == "CPU" and _is_host(name))), None)
        if pool is None:
            out.append(row)
            continue
        host = _is_host(name)
        gpu = (computes or {}).get("CPU" if host else name)
        compute = gpu.estimate if gpu else pool.compute_bytes
        kv_here = not host or name == host_kv
        table = not run.buffers  # the breakdown's context column is KV and recurrent state together
        planned = Figures(
            weights_bytes=row.logged.weights_bytes,
            kv_bytes=(pool.kv_bytes + (pool.recurrent_bytes if table else 0) if kv_here else None),
            recurrent_bytes=(pool.recurrent_bytes if kv_here and not table else None),
            compute_bytes=(compute if not host or name == host_compute else None),
            compute_low_bytes=(gpu.low if gpu and (not host or name == host_compute) else None),
            compute_high_bytes=(gpu.high if gpu and (not host or name == host_compute) else None),
        )
        if not any((row.logged.weights_bytes, row.logged.kv_bytes, row.logged.recurrent_bytes,
                    row.logged.compute_bytes, planned.kv_bytes, planned.recurrent_bytes, planned.compute_bytes)):
            continue
        out.append(dataclasses.replace(row, planned=planned))
    return tuple(out)


def error_pct(planned: int | None, logged: int | None) -> float | None:
    if planned is None or not logged:
        return None
    return round(100 * (planned - logged) / logged, 1)


def summary(check: LogCheck) -> dict:
    """The JSON answer: build, devices with logged and planned bytes, notes."""
    def figs(f: Figures) -> dict:
        out = {"weights_bytes": f.weights_bytes, "kv_bytes": f.kv_bytes, "recurrent_bytes": f.recurrent_bytes,
               "compute_bytes": f.compute_bytes}
        if f.compute_high_bytes is not None:
            out.update(compute_low_bytes=f.compute_low_bytes, compute_high_bytes=f.compute_high_bytes)
        return out

    return {"build": check.build, "tool": check.tool, "model": check.model, "refused": check.refused,
            "devices": [{"name": r.name, "backend": r.backend, "logged": figs(r.logged),
                         "planned": None if check.refused else figs(r.planned)} for r in check.devices],
            "kv_mismatches": list(check.kv_mismatches), "notes": list(check.notes)}


def format_check(check: LogCheck) -> str:
    """The text answer: one line per device and kind, logged / planned / error."""
    lines = [f"check-log: {check.model}, build {check.build if check.build is not None else 'unknown'}"
             + (f" ({check.tool})" if check.tool else "")]
    if check.refused:
        lines.append(f"not planned: {check.refused}")
    for r in check.devices:
        for kind, label in (("weights_bytes", "weights"), ("kv_bytes", "KV"), ("recurrent_bytes", "recurrent"),
                            ("compute_bytes", "compute")):
            lg, pl = getattr(r.logged, kind), getattr(r.planned, kind)
            if lg is None and not pl:
                continue
            err = error_pct(pl, lg)
            lines.append(f"  {r.name:<12} {label:<9} logged {_fmt(lg):>12}  planned {_fmt(pl):>12}"
                         + (f"  {err:+.1f}%" if err is not None else "")
                         + (f"  (interval {_fmt(r.planned.compute_low_bytes)} - {_fmt(r.planned.compute_high_bytes)})"
                            if kind == "compute_bytes" and r.planned.compute_high_bytes is not None else "")
                         + ("  (as logged)" if kind == "weights_bytes" and pl is not None else ""))
    if check.kv_mismatches:
        lines.append("KV differs: " + "; ".join(check.kv_mismatches))
    elif not check.refused:
        lines.append("KV: every cache line reproduced exactly")
    lines += [f"note: {n}" for n in check.notes]
    return "\n".join(lines)


def _fmt(b: int | None) -> str:
    return "-" if b is None else f"{b / MiB:.2f} MiB"


def model_of(spec: str) -> ModelArch:
    """--model: a GGUF, preset or config (kvbook.model.sources), or another llama.cpp log whose print_info lines
    describe the same model file."""
    from kvbook.model.sources import load_model

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix not in (".gguf", ".yaml", ".yml", ".json"):
        text = path.read_text(errors="replace")
        if "print_info:" in text:
            return arch_from_log(parse_run(text))
    return load_model(spec)


def corpus_checks(log_dir: Path) -> Iterator[tuple[dict, LogCheck]]:
    """check_log over a folder of logs indexed by INDEX.jsonl (one JSON object per log: file, source_url, build,
    backend...); a log with only the breakdown table is planned with the model and flags plans.json gives for it."""
    plans = json.loads((log_dir / "plans.json").read_text()) if (log_dir / "plans.json").is_file() else {}
    for line in (log_dir / "INDEX.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        given = plans.get(entry["file"]) or {}
        model = None
        if "model" in given:  # a preset, or a model file kept beside the logs (models/*.config.json)
            here = log_dir / given["model"]
            model = model_of(str(here) if here.is_file() else given["model"])
        elif "model_log" in given:  # another log of the same model file prints its print_info
            model = model_of(str(log_dir / given["model_log"]))
        text = (log_dir / entry["file"]).read_text(errors="replace")
        # the index's build text names a build number as "b8169" or leads with it; dates and commit hashes do not count
        build = re.search(r"(?:^|\bb)(\d{4,5})\b", str(entry.get("build") or ""))
        try:
            yield entry, check_log(text, model, given.get("args", ()), int(build.group(1)) if build else None)
        except BadInput as e:  # what the CLI would print as its one line
            yield entry, LogCheck(None, None, entry["file"], (), (), (), refused=str(e))


MIN_COMPUTE_MIB = 5.0  # smaller buffers are rounding noise in a breakdown table (integer MiB): not compared


def compute_samples(log_dir: Path) -> list[dict]:
    """One sample per logged GPU-backend compute buffer of the corpus (>= MIN_COMPUTE_MIB): file, device, backend,
    side (device / host), its graph terms, the masks as fed, and the logged bytes (tools/fit_backend_compute.py
    fits on these; tests check the shipped coefficients against them)."""
    from kvbook.plan.planner import compute_offload, gpu_terms

    out = []
    for entry, check in corpus_checks(log_dir):
        if check.refused or check.plan is None:
            continue
        plan = check.plan
        offload = compute_offload(plan.model, plan.flags, plan.device)
        found = gpu_terms(plan.model, plan.flags, plan.memory, offload) if offload else None
        if not found:
            continue
        backend, terms = found
        shape = plan.memory.shape
        for row in check.devices:
            logged = row.logged.compute_bytes
            key = "CPU" if is_host_name(row.name) else row.name
            if not logged or logged < MIN_COMPUTE_MIB * MiB or key not in terms:
                continue
            out.append({"file": entry["file"], "device": row.name, "backend": backend,
                        "side": "host" if key == "CPU" else "device", "terms": terms[key],
                        "mask_input": terms[key]["mask"] * (2 if shape.flash_attn and shape.mask_f32_input else 1),
                        "embd_input": shape.embd_input,
                        "logged": logged})
    return out


def sample_estimate(sample: dict, coef: dict) -> int:
    """kvbook.memory.backends' estimate for one compute sample under the given coefficients."""
    from kvbook.memory.backends import gpu_device_bytes, host_bytes

    if sample["side"] == "host":
        return host_bytes(sample["terms"], coef, sample["mask_input"], embd_input=sample.get("embd_input", True))
    return gpu_device_bytes(sample["terms"], coef, sample["mask_input"])
