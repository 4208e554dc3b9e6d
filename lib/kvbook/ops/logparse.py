"""Parse what llama-server (and llama-fit-params) log about allocations at `-lv 4` into a record.

Formats are those of the pinned build (shared/reference/llama-cpp-memory.md section 8): every
line carries a timestamp and level prefix, numbers are MiB with two decimals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvbook.interface import MiB

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_RE = {
    "n_ctx": re.compile(r"llama_context: n_ctx\s+= (\d+)"),
    "n_ctx_seq": re.compile(r"llama_context: n_ctx_seq\s+= (\d+)"),
    "n_seq_max": re.compile(r"llama_context: n_seq_max\s+= (\d+)"),
    "n_batch": re.compile(r"llama_context: n_batch\s+= (\d+)"),
    "n_ubatch": re.compile(r"llama_context: n_ubatch\s+= (\d+)"),
    "flash_attn": re.compile(r"llama_context: flash_attn\s+= (\w+)"),
    "kv_unified": re.compile(r"llama_context: kv_unified\s+= (\w+)"),
    "model_buf": re.compile(r"load_tensors:\s+(\S+) model buffer size =\s*" + _NUM + " MiB"),
    "output_buf": re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s*" + _NUM + " MiB"),
    "compute_buf": re.compile(r"sched_reserve:\s+(\S+) compute buffer size =\s*" + _NUM + " MiB"),
    "clip_model": re.compile(r"load_hparams: model size:\s+" + _NUM + " MiB"),
    "clip_compute": re.compile(r"reserve_compute_meta:\s+(\S+) compute buffer size =\s*" + _NUM + " MiB"),
    "lora_buf": re.compile(r"llama_adapter_lora_init_impl:\s+(\S+) LoRA buffer size =\s*" + _NUM + " MiB"),
    "kv_buf": re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s*" + _NUM + " MiB"),
    "rs_buf": re.compile(r"llama_memory_recurrent:\s+(\S+) RS buffer size =\s*" + _NUM + " MiB"),
    "iswa": re.compile(r"llama_kv_cache_iswa: creating\s+(non-SWA|SWA) KV cache, size = (\d+) cells"),
    "kv": re.compile(
        r"llama_kv_cache: size = \s*" + _NUM + r" MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\), "
        r"K \((\w+)\):\s*" + _NUM + r" MiB, V \((\w+)\):\s*" + _NUM + " MiB"
    ),
    "rs": re.compile(
        r"llama_memory_recurrent: size = \s*" + _NUM + r" MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+) seqs"
        r"[^)]*\), R \((\w+)\):\s*" + _NUM + r" MiB, S \((\w+)\):\s*" + _NUM + " MiB"
    ),
}


@dataclass(frozen=True)
class LoggedCache:
    """One `llama_kv_cache: size = ...` or `llama_memory_recurrent: size = ...` line (MiB as printed)."""

    kind: str
    cells: int
    layers: int
    k_type: str
    k_mib: float
    v_type: str | None
    v_mib: float
    total_mib: float


@dataclass(frozen=True)
class LoggedMemory:
    """What the server said it allocated; MiB values keep the log's two-decimal precision."""

    n_ctx: int | None = None
    n_ctx_seq: int | None = None
    n_seq_max: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    flash_attn: str | None = None
    kv_unified: bool | None = None
    model_mib: dict[str, float] = field(default_factory=dict)
    output_mib: float | None = None
    compute_mib: dict[str, float] = field(default_factory=dict)
    caches: tuple[LoggedCache, ...] = ()
    kv_buffer_mib: dict[str, float] = field(default_factory=dict)  # per buffer type, every cache summed
    # the multimodal projector (tools/mtmd/clip.cpp): its weights, and its compute buffer per buffer type
    projector_model_mib: float | None = None
    projector_compute_mib: dict[str, float] = field(default_factory=dict)
    lora_mib: float = 0.0  # every LoRA adapter buffer, summed

    @property
    def compute_bytes(self) -> int:
        return round(sum(self.compute_mib.values()) * MiB)

    @property
    def weights_mib(self) -> float:
        """Every model buffer added up, CPU_REPACK included: the repacked tensors' bytes stay inside the mapped
        range too (llama-model-loader.cpp load_all_data reads them from the mapping and unmaps only what lies
        outside it), and llama.cpp's memory breakdown lists CPU_REPACK as a row of its own."""
        return round(sum(self.model_mib.values()), 2)


DRAFT_MARKER = "loading draft model"  # common/speculative.cpp logs it before it loads the -md model
MTP_MARKER = "creating MTP draft context"  # ... and this before the MTP context (--spec-type draft-mtp)


def _split_draft(text: str) -> tuple[str, str, str]:
    """(before, marker, after) at the first draft or MTP marker."""
    at = [(i, m) for m in (DRAFT_MARKER, MTP_MARKER) if (i := text.find(m)) >= 0]
    if not at:
        return text, "", ""
    i, m = min(at)
    return text[:i], m, text[i + len(m):]


def parse_log(text: str) -> LoggedMemory:
    """The target model's context in a llama-server log (the last one created before a draft model is loaded;
    fit probes log none at -lv 4), and the projector's lines wherever they are."""
    head, marker, _ = _split_draft(text)
    if not marker:
        return _parse(text)
    clip = "\n".join(ln for ln in text.splitlines() if "load_hparams: model size" in ln or "reserve_compute_meta" in ln)
    return _parse(head + "\n" + clip)


def parse_draft_log(text: str) -> LoggedMemory | None:
    """The draft model's context (-md) or the MTP context: everything the log says after it starts."""
    _, marker, tail = _split_draft(text)
    return _parse(tail) if marker else None


def _parse(text: str) -> LoggedMemory:
    values: dict[str, object] = {}
    model_mib: dict[str, float] = {}
    compute_mib: dict[str, float] = {}
    caches: list[LoggedCache] = []
    kv_buffers: dict[str, float] = {}
    pending_kind = "kv"
    in_model_run = False
    clip_compute: dict[str, float] = {}
    for line in text.splitlines():
        if "llama_context: constructing llama_context" in line:
            caches, compute_mib, kv_buffers, pending_kind = [], {}, {}, "kv"
            values.pop("output_mib", None)
        for key in ("n_ctx", "n_ctx_seq", "n_seq_max", "n_batch", "n_ubatch"):
            m = _RE[key].search(line)
            if m:
                values[key] = int(m.group(1))
        if m := _RE["flash_attn"].search(line):
            values["flash_attn"] = m.group(1)
        if m := _RE["kv_unified"].search(line):
            values["kv_unified"] = m.group(1) == "true"
        model_line = _RE["model_buf"].search(line)
        if model_line:
            # a split model logs one line per file and buffer type, in one run: summed; a later run (another
            # model load) starts again
            if not in_model_run:
                model_mib = {}
            name = model_line.group(1)
            model_mib[name] = round(model_mib.get(name, 0.0) + float(model_line.group(2)), 2)
        in_model_run = bool(model_line)
        if m := _RE["clip_model"].search(line):
            values["projector_model_mib"] = float(m.group(1))
        if m := _RE["clip_compute"].search(line):
            clip_compute[m.group(1)] = float(m.group(2))
        if m := _RE["lora_buf"].search(line):
            values["lora_mib"] = round(float(values.get("lora_mib", 0.0)) + float(m.group(2)), 2)  # type: ignore[arg-type]
        if m := _RE["output_buf"].search(line):
            values["output_mib"] = float(m.group(2))
        if m := _RE["compute_buf"].search(line):
            compute_mib[m.group(1)] = float(m.group(2))
        for key in ("kv_buf", "rs_buf"):
            if m := _RE[key].search(line):
                kv_buffers[m.group(1)] = round(kv_buffers.get(m.group(1), 0.0) + float(m.group(2)), 2)
        if m := _RE["iswa"].search(line):
            pending_kind = "swa" if m.group(1) == "SWA" else "kv"
        if m := _RE["kv"].search(line):
            caches.append(
                LoggedCache(
                    kind=pending_kind,
                    cells=int(m.group(2)),
                    layers=int(m.group(3)),
                    k_type=m.group(6),
                    k_mib=float(m.group(7)),
                    v_type=m.group(8),
                    v_mib=float(m.group(9)),
                    total_mib=float(m.group(1)),
                )
            )
        if m := _RE["rs"].search(line):
            caches.append(
                LoggedCache(
                    kind="recurrent",
                    cells=int(m.group(2)),
                    layers=int(m.group(3)),
                    k_type=m.group(5),
                    k_mib=float(m.group(6)),
                    v_type=m.group(7),
                    v_mib=float(m.group(8)),
                    total_mib=float(m.group(1)),
                )
            )
    return LoggedMemory(model_mib=model_mib, compute_mib=compute_mib, caches=tuple(caches), kv_buffer_mib=kv_buffers,
                        projector_compute_mib=clip_compute, **values)  # type: ignore[arg-type]


def mib2(n_bytes: int) -> float:
    """Bytes as the log prints them: MiB rounded to two decimals."""
    return round(n_bytes / MiB, 2)
