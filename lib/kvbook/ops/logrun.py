"""Read a llama.cpp log as users paste it (llama-server, llama-cli, llama-completion, llama-bench -v,
llama-fit-params; any backend; builds from about b6000): the build, the model's print_info hyperparameters,
the context, the offload, every buffer line per device, and the memory-breakdown table.

Pure text in, a frozen record out; kvbook.ops.check_log plans the same run and compares. Lines may carry a
timestamp and level letter (`0.01.166.263 I `) or none; every pattern is searched, not anchored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvbook.errors import BadInput
from kvbook.ops.logparse import LoggedCache

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_BUILD = (re.compile(r"build(?:\s*[:=]\s*|\s+)(\d{3,6}) \(([0-9a-f]{6,12})\)"),  # build: 8169 (4e76d24f2)
          re.compile(r"build(?:_info)?\s*:\s*b(\d{3,6})-([0-9a-f]{6,12})"),  # build      : b8110-237958db3, build_info: b8999-...
          re.compile(r"build:\s*([0-9a-f]{6,12}) \((\d{3,6})\)"))  # llama-bench: build: 4e76d24f2 (8169)
_GGUF_KV = re.compile(r"llama_model_loader: - kv\s+\d+:\s+(\S+)\s+(u8|i8|u16|i16|u32|i32|u64|i64|f32|f64|bool|str|"
                      r"arr\[\w+,\s*\d+\])\s+=\s+(.*?)\s*$")
_PRINT_INFO = re.compile(r"print_info:\s+([A-Za-z_][\w.]*(?: [\w.]+)?)\s+=\s+(.*?)\s*$")
_BUF = {
    "model": re.compile(r"load_tensors:\s+(\S+) model buffer size =\s*" + _NUM + " MiB"),
    "kv": re.compile(r"llama_kv_cache(?:_unified)?:\s+(\S+) KV buffer size =\s*" + _NUM + " MiB"),
    "rs": re.compile(r"llama_memory_recurrent:\s+(\S+) RS buffer size =\s*" + _NUM + " MiB"),
    "compute": re.compile(r"(?:sched_reserve|llama_context|graph_reserve):\s+(\S+) compute buffer size =\s*"
                          + _NUM + " MiB"),
    "output": re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s*" + _NUM + " MiB"),
}
_CTX = {key: re.compile(rf"llama_context:\s+{pat}\s+=\s+(\S+)") for key, pat in (
    ("n_ctx", "n_ctx"), ("n_ctx_seq", "n_ctx_(?:seq|per_seq)"), ("n_seq_max", "n_seq_max"), ("n_batch", "n_batch"),
    ("n_ubatch", "n_ubatch"), ("flash_attn", "flash_attn"), ("kv_unified", "kv_unified"),
    ("n_outputs_max", "n_outputs_max"))}
_FA_AUTO = re.compile(r"Flash Attention (?:was auto, set to )?(enabled|disabled)")
_OFFLOADED = re.compile(r"load_tensors: offloaded (\d+)/(\d+) layers to GPU")
_USING = re.compile(r"using device (\S+) \((.*?)\)(?: \([^)]*\))? - (\d+) MiB free")
_ISWA = re.compile(r"llama_kv_cache(?:_unified)?_iswa: creating\s+(non-SWA|SWA) KV cache, size = (\d+) cells")
_KV = re.compile(r"llama_kv_cache(?:_unified)?: size = \s*" + _NUM + r" MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+)"
                 r" seqs\), K \((\w+)\):\s*" + _NUM + r" MiB, V \((\w+)\):\s*" + _NUM + " MiB")
_RS = re.compile(r"llama_memory_recurrent: size = \s*" + _NUM + r" MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+) seqs"
                 r"[^)]*\), R \((\w+)\):\s*" + _NUM + r" MiB, S \((\w+)\):\s*" + _NUM + " MiB")
_RS_SEQ = re.compile(r"llama_memory_recurrent: size = .*seqs\s+(\d+) rs_seq")
_BREAKDOWN = re.compile(r"memory_breakdown_print:\s*\|\s*-\s*(.+?)\s*\|\s*(.*?)\s*\|\s*$")
_BD_DEVICE = re.compile(r"(\d+)\s*=\s*(\d+)\s*\+\s*\(\s*(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*\)\s*\+\s*(-?\d+)")
_BD_HOST = re.compile(r"(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)")
_DRAFT_MARKERS = ("loading draft model", "creating MTP draft context", "creating draft context")
_TOOLS = ("llama-server", "llama-cli", "llama-completion", "llama-bench", "llama-fit-params", "llama-mtmd-cli")
# old formats whose rules differ from the pinned build's (kvbook refuses them by name, see `era`)
_ERAS = (
    ("llm_load_print_meta", "a build before ~b5000 (llm_load_print_meta / llama_new_context_with_model era)"),
    ("llama_new_context_with_model", "a build before ~b5000 (llm_load_print_meta / llama_new_context_with_model era)"),
    ("llama_kv_cache_unified", "a build before ~b6230 (llama_kv_cache_unified era, ggml-org/llama.cpp#15467 "
                               "renamed it 2025-08-21): its cache padding and sliding-window cell rules differ"),
)


@dataclass(frozen=True)
class Buffer:
    """One `<name> <kind> buffer size = X MiB` line."""

    kind: str  # model, kv, rs, compute, output
    name: str  # as the log names it: CUDA0, CUDA_Host, CPU_Mapped, MTL0_Mapped, Vulkan_Host ...
    mib: float


@dataclass(frozen=True)
class BreakdownRow:
    """One row of llama.cpp's memory-breakdown table (integer MiB); totals and free only for devices."""

    name: str  # CUDA0, MTL0, Host, ...
    label: str  # the description in parentheses (RTX 3080, Apple M5), '' for Host
    self_mib: int
    model_mib: int
    context_mib: int
    compute_mib: int
    total_mib: int | None = None
    free_mib: int | None = None
    unaccounted_mib: int | None = None


@dataclass(frozen=True)
class LogRun:
    """What one log says about one model load and its (last) context."""

    build: int | None
    commit: str | None
    tool: str | None
    era: str | None  # why the build's rules differ from the pinned build's (None: comparable)
    hparams: dict[str, str] = field(default_factory=dict)  # print_info key -> value as printed
    gguf: dict[str, object] = field(default_factory=dict)  # the loader's metadata dump (kv N: key type = value), typed
    context: dict[str, str] = field(default_factory=dict)  # llama_context key -> value as printed
    flash_attn: bool | None = None  # as resolved (auto -> enabled/disabled)
    offloaded: tuple[int, int] | None = None
    devices: tuple[tuple[str, str, int], ...] = ()  # (name, description, free MiB) from "using device"
    buffers: tuple[Buffer, ...] = ()
    caches: tuple[LoggedCache, ...] = ()
    breakdown: tuple[BreakdownRow, ...] = ()
    rs_seq: int = 0  # extra recurrent rows per sequence (MTP speculative decoding: `N rs_seq` in the RS line)

    def ctx_int(self, key: str) -> int | None:
        value = self.context.get(key)
        return int(value) if value is not None and value.isdigit() else None

    def by_name(self, kind: str) -> dict[str, float]:
        """MiB per buffer name for one kind, lines of the same name summed (split files, SWA + non-SWA)."""
        out: dict[str, float] = {}
        for b in self.buffers:
            if b.kind == kind:
                out[b.name] = round(out.get(b.name, 0.0) + b.mib, 2)
        return out


def _build(text: str) -> tuple[int | None, str | None]:
    for i, pattern in enumerate(_BUILD):
        m = pattern.search(text)
        if m:
            return (int(m.group(2)), m.group(1)) if i == 2 else (int(m.group(1)), m.group(2))
    return None, None


def _tool(text: str) -> str | None:
    head = text[:20000]
    found = [(head.find(t), t) for t in _TOOLS if t in head]
    return min(found)[1] if found else None


def parse_run(text: str) -> LogRun:
    """The last model load and context in a log; BadInput when it is not a llama.cpp log or holds no buffer line."""
    if "\x00" in text[:4096]:
        raise BadInput("this is a binary file, not a llama.cpp log")
    build, commit = _build(text)
    # the target model's context: a draft or MTP context comes after these lines (its breakdown rows stay)
    for marker in _DRAFT_MARKERS:
        head, found, tail = text.partition(marker)
        if found:
            text = head + "\n".join(ln for ln in tail.splitlines() if "memory_breakdown_print" in ln)
    era = next((why for marker, why in _ERAS if marker in text), None)
    if era is None and re.search(r"ollama runner|source=runner\.go|msg=\"llama runner", text):
        # newer ollama starts upstream's llama-server (/usr/lib/ollama/llama-server): that one is planned
        era = "ollama's own runner (its vendored llama.cpp with its own context settings), not llama-server"
    rs_seq = 0
    hparams: dict[str, str] = {}
    gguf: dict[str, object] = {}
    context: dict[str, str] = {}
    buffers: list[Buffer] = []
    caches: list[LoggedCache] = []
    breakdown: dict[str, BreakdownRow] = {}
    devices: dict[str, tuple[str, str, int]] = {}
    flash: bool | None = None
    offloaded = None
    pending = "kv"
    in_model = False
    for line in text.splitlines():
        if "llama_context: constructing llama_context" in line:
            buffers = [b for b in buffers if b.kind == "model"]
            caches, context, flash, pending = [], {}, None, "kv"
        m = _PRINT_INFO.search(line)
        if m:
            hparams[m.group(1)] = m.group(2)
        if (m := _GGUF_KV.search(line)) and (value := _typed(m.group(2), m.group(3))) is not None:
            gguf[m.group(1)] = value
        if m := _USING.search(line):
            devices[m.group(1)] = (m.group(1), m.group(2), int(m.group(3)))
        if m := _OFFLOADED.search(line):
            offloaded = (int(m.group(1)), int(m.group(2)))
        model = _BUF["model"].search(line)
        if model and not in_model:  # a new run of model lines: another model load starts again
            buffers = [b for b in buffers if b.kind != "model"]
        in_model = bool(model)
        for kind, pattern in _BUF.items():
            if m := pattern.search(line):
                buffers.append(Buffer(kind, m.group(1), float(m.group(2))))
        for key, pattern in _CTX.items():
            if m := pattern.search(line):
                context[key] = m.group(1)
        if m := _FA_AUTO.search(line):
            flash = m.group(1) == "enabled"
        if m := _ISWA.search(line):
            pending = "swa" if m.group(1) == "SWA" else "kv"
        if m := _KV.search(line):
            caches.append(LoggedCache(pending, int(m.group(2)), int(m.group(3)), m.group(6), float(m.group(7)),
                                      m.group(8), float(m.group(9)), float(m.group(1))))
        if m := _RS_SEQ.search(line):
            rs_seq = int(m.group(1))
        if m := _RS.search(line):
            caches.append(LoggedCache("recurrent", int(m.group(2)), int(m.group(3)), m.group(5), float(m.group(6)),
                                      m.group(7), float(m.group(8)), float(m.group(1))))
        if m := _BREAKDOWN.search(line):
            row = _breakdown_row(m.group(1), m.group(2))
            if row is not None:
                breakdown[row.name] = row
    if flash is None and "flash_attn" in context:
        flash = {"1": True, "true": True, "enabled": True, "on": True}.get(context["flash_attn"].lower(),
                                                                         False if context["flash_attn"] != "auto" else None)
    if not buffers and not breakdown:
        what = "a llama.cpp log" if (hparams or build or "llama_" in text or "ggml_" in text) else "not a llama.cpp log:"
        raise BadInput(f"{what} without any buffer line ('... model/KV/compute buffer size = ... MiB') or memory "
                       "breakdown table; run llama-server with -lv 4 (or -v) and paste the whole log")
    return LogRun(build=build, commit=commit, tool=_tool(text), era=era, hparams=hparams, gguf=gguf, context=context,
                  flash_attn=flash, offloaded=offloaded, devices=tuple(devices.values()), buffers=tuple(buffers),
                  caches=tuple(caches), breakdown=tuple(breakdown.values()), rs_seq=rs_seq)


def _typed(kind: str, text: str) -> object:
    """A metadata value as the loader printed it; None for what the dump elides (long arrays, strings)."""
    try:
        if kind.startswith(("u", "i")):
            return int(text)
        if kind.startswith("f"):
            return float(text)
        if kind == "bool":
            return text == "true"
        if kind.startswith("arr") and "..." not in text and re.fullmatch(r"\[[-\d,\s]*\]", text):
            return [int(x) for x in text.strip("[]").split(",") if x.strip()]
    except ValueError:
        return None
    return text if kind == "str" else None


def _breakdown_row(who: str, numbers: str) -> BreakdownRow | None:
    """`MTL0 (Apple M5) | 18186 = 10905 + (7280 = 6095 + 786 + 398) + 0` or `Host | 5556 = 5440 + 0 + 116`."""
    name, _, label = who.partition(" (")
    label = label.rstrip(")")
    if m := _BD_DEVICE.search(numbers):
        total, free, self_, model, ctx, comp, unacc = (int(x) for x in m.groups())
        return BreakdownRow(name.strip(), label, self_, model, ctx, comp, total, free, unacc)
    if m := _BD_HOST.search(numbers):
        self_, model, ctx, comp = (int(x) for x in m.groups())
        return BreakdownRow(name.strip(), label, self_, model, ctx, comp)
    return None
