"""Parse a real llama-server command line into ServerFlags, and render ServerFlags back to argv.

Every spelling llama-server knows, and the LLAMA_ARG_* variable that sets it, is in
data/llama_server_flags.json (generated from the pinned build's --help by tools/gen_server_flags.py).
The parser reads a command line as the pinned server's does (common/arg.cpp): variables first, the
command line wins; `--a_b` means `--a-b`; no `--flag=value` form; numbers read like std::stoi, within
int32. A flag that changes memory and is not modelled is an error naming it; flags that do not change
memory are accepted and listed in `ignored`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import PurePath
from typing import Any

from kvbook.errors import BadInput
from kvbook.interface import FlashAttn, ServerFlags
from kvbook.memory.rules import CACHE_TYPE_LAYOUT
from kvbook.memory.speculative import UNMODELLED_TYPES, spec_type_names

CACHE_TYPES = tuple(CACHE_TYPE_LAYOUT)  # every -ctk/-ctv value the pinned server accepts

# Flags that change what llama-server allocates but that kvbook does not model (yet).
UNMODELLED = {
    "--control-vector": "control vectors",
    "--control-vector-scaled": "control vectors",
    "--override-kv": "metadata overrides that can change the architecture",
    # kvbook places a draft whole, with -ngld on the GPU or the CPU (planner.py draft_pool)
    "--spec-draft-device": "the draft's own device list; kvbook places a draft whole with -ngld (0 or all)",
    "--spec-draft-cpu-moe": "the draft's experts kept on the CPU; kvbook places a draft whole with -ngld (0 or all)",
    "--spec-draft-n-cpu-moe": "the draft's experts kept on the CPU; kvbook places a draft whole with -ngld (0 or all)",
    "--spec-draft-override-tensor": "the draft's tensors moved between devices; kvbook places a draft whole with "
                                    "-ngld (0 or all)",
    "-mmdev": "the projector's device",
    "--image-min-tokens": "the projector's warm-up image size (its compute buffer)",
    "--image-max-tokens": "the projector's warm-up image size (its compute buffer)",
    "-dr": "a model pulled from a registry at start (pass the GGUF path instead)",
    "--embedding": "embedding outputs",
    "--rerank": "reranking outputs",
    "--pooling": "pooled outputs",
}
# options whose value is a secret: never echoed in a plan (notes, flags_read)
SECRET_OPTIONS = {"-hft", "--api-key"}
# Spellings refused although their option's other spellings are fine.
UNMODELLED_SPELLINGS: dict[str, str] = {}
# Options the pinned build removed: it refuses them with this advice (common/arg.cpp arg_removed)
REMOVED = {"--draft": "use --spec-draft-n-max or --spec-ngram-mod-n-max",
           "--draft-min": "use --spec-draft-n-min or --spec-ngram-mod-n-min",
           "--spec-ngram-size-n": "use the respective --spec-ngram-*-size-n",
           "--spec-ngram-size-m": "use the respective --spec-ngram-*-size-m",
           "--spec-ngram-min-hits": "use the respective --spec-ngram-*-min-hits"}
# The pinned build's presets (common/arg.cpp, "// presets"): each sets these options, in this order, where it
# stands on the command line (a later flag overrides it, an earlier one is overridden). Where arg.cpp computes
# n_ctx as a multiple of the n_parallel it has just set, the product is written out. Sampling and template
# settings are listed too (they change no memory); n_cache_reuse is --cache-reuse.
_OAI = (("--temp", "1.0"), ("--top-p", "1.0"), ("--top-k", "0"), ("--min-p", "0.01"), ("--jinja", None))
_FIM = (("--port", "8012"), ("-ub", "1024"), ("-b", "1024"), ("-c", "0"), ("--cache-reuse", "256"))
_QWEN_DRAFT = (("-hfd", "ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF"),)  # plus the draft file (PRESET_DRAFT_FILE)
PRESETS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "--embd-gemma-default": (("-hf", "ggml-org/embeddinggemma-300M-qat-q4_0-GGUF"),
                             ("-hff", "embeddinggemma-300M-qat-Q4_0.gguf"), ("--port", "8011"), ("-ub", "2048"),
                             ("-b", "2048"), ("-np", "32"), ("-c", "65536"), ("--embedding", None)),
    "--fim-qwen-1.5b-default": (("-hf", "ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF"),
                                ("-hff", "qwen2.5-coder-1.5b-q8_0.gguf"), *_FIM),
    "--fim-qwen-3b-default": (("-hf", "ggml-org/Qwen2.5-Coder-3B-Q8_0-GGUF"), ("-hff", "qwen2.5-coder-3b-q8_0.gguf"),
                              *_FIM),
    "--fim-qwen-7b-default": (("-hf", "ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF"), ("-hff", "qwen2.5-coder-7b-q8_0.gguf"),
                              *_FIM),
    "--fim-qwen-7b-spec": (("-hf", "ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF"), ("-hff", "qwen2.5-coder-7b-q8_0.gguf"),
                           *_QWEN_DRAFT, *_FIM),
    "--fim-qwen-14b-spec": (("-hf", "ggml-org/Qwen2.5-Coder-14B-Q8_0-GGUF"), ("-hff", "qwen2.5-coder-14b-q8_0.gguf"),
                            *_QWEN_DRAFT, *_FIM),
    "--fim-qwen-30b-default": (("-hf", "ggml-org/Qwen3-Coder-30B-A3B-Instruct-Q8_0-GGUF"),
                               ("-hff", "qwen3-coder-30b-a3b-instruct-q8_0.gguf"), *_FIM),
    "--gpt-oss-20b-default": (("-hf", "ggml-org/gpt-oss-20b-GGUF"), ("-hff", "gpt-oss-20b-mxfp4.gguf"),
                              ("--port", "8013"), ("-ub", "2048"), ("-b", "32768"), ("-np", "2"), ("-c", "262144"),
                              *_OAI),
    "--gpt-oss-120b-default": (("-hf", "ggml-org/gpt-oss-120b-GGUF"), ("--port", "8013"), ("-ub", "2048"),
                               ("-b", "32768"), ("-np", "2"), ("-c", "262144"), *_OAI),
    "--vision-gemma-4b-default": (("-hf", "ggml-org/gemma-3-4b-it-qat-GGUF"), ("--port", "8014"), ("-c", "0"),
                                  ("--jinja", None)),
    "--vision-gemma-12b-default": (("-hf", "ggml-org/gemma-3-12b-it-qat-GGUF"), ("--port", "8014"), ("-c", "0"),
                                   ("--jinja", None)),
    "--spec-default": (("--spec-type", "ngram-mod"), ("--spec-ngram-mod-n-match", "24"),
                       ("--spec-ngram-mod-n-min", "48"), ("--spec-ngram-mod-n-max", "64")),
}
# what a preset sets that llama-server has no flag for (and that changes no memory)
PRESET_UNFLAGGED = {"--embd-gemma-default": "verbose_prompt"}
# the draft's file in its -hfd repo, which a preset sets and no flag does
PRESET_DRAFT_FILE = {"--fim-qwen-7b-spec": "qwen2.5-coder-0.5b-q8_0.gguf",
                     "--fim-qwen-14b-spec": "qwen2.5-coder-0.5b-q8_0.gguf"}
INT32 = (-(2**31), 2**31 - 1)
_DEFAULTS = ServerFlags(model="")  # the server's defaults


@cache
def _options() -> list[dict[str, Any]]:
    doc: dict[str, list[dict[str, Any]]] = json.loads(
        resources.files("kvbook").joinpath("data/llama_server_flags.json").read_text())
    return doc["options"]


@cache
def _spellings() -> dict[str, tuple[str, bool]]:
    """Every llama-server spelling -> (canonical first spelling, takes a value)."""
    return {name: (entry["names"][0], bool(entry["takes_value"])) for entry in _options() for name in entry["names"]}


@cache
def _env_names() -> dict[str, str]:
    """LLAMA_ARG_* variable -> the canonical spelling of the option it sets."""
    return {entry["env"]: entry["names"][0] for entry in _options() if entry.get("env")}


_STOI = re.compile(r"\s*([+-]?\d+)")


def _int(flag: str, value: str, minimum: int) -> int:
    """A number as llama-server reads it (std::stoi: leading digits, int32), then kvbook's lower bound."""
    match = _STOI.match(value)
    if not match:
        raise BadInput(f"{flag} expects a whole number, got '{value}'")
    digits = match.group(1).lstrip("+-").lstrip("0")
    number = int(match.group(1)) if len(digits) <= 12 else INT32[1] + 1  # past int32 either way; no huge int()
    if not INT32[0] <= number <= INT32[1]:
        raise BadInput(f"{flag} {value}: out of range for llama-server (a 32-bit integer)")
    if number < minimum:
        raise BadInput(f"{flag} must be >= {minimum}, got {number}")
    return number


def _slots(flag: str, value: str) -> int:
    number = _int(flag, value, INT32[0])
    if number == 0:
        raise BadInput(f"{flag} 0: llama-server refuses it (invalid value for n_parallel); use 1 or more, or -1 for auto")
    return -1 if number < 0 else number  # server.cpp: any negative -np means auto


def _choice(flag: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise BadInput(f"{flag}: unknown value '{value}'; choose one of {', '.join(choices)}")
    return value


# common/arg.cpp's value sets, exact and case-sensitive
TRUTHY = ("on", "enabled", "true", "1")
FALSEY = ("off", "disabled", "false", "0")
AUTOY = ("auto", "-1")


def _fa(flag: str, value: str) -> FlashAttn:
    if value in TRUTHY:
        return FlashAttn.ON
    if value in FALSEY:
        return FlashAttn.OFF
    if value in AUTOY:
        return FlashAttn.AUTO
    raise BadInput(f"{flag}: unknown value '{value}'; choose one of {', '.join((*TRUTHY, *FALSEY, *AUTOY))}")


def _bool_value(flag: str, value: str) -> bool:
    if value in TRUTHY or value in FALSEY:
        return value in TRUTHY
    raise BadInput(f"{flag}: unknown value '{value}'; choose one of {', '.join((*TRUTHY, *FALSEY))}")


def _fit_target(flag: str, value: str) -> tuple[int, ...]:
    """--fit-target MiB0,MiB1,...: MiB --fit leaves free per device, one value for every device (common/arg.cpp)."""
    return tuple(_int(flag, v, 0) for v in value.split(","))


def _rpc(flag: str, value: str) -> tuple[str, ...]:
    """--rpc host:port[,host:port...], each one checked."""
    out = []
    for entry in value.split(","):
        if entry != entry.strip():  # common/arg.cpp add_rpc_devices passes each entry on verbatim
            raise BadInput(f"{flag}: '{entry}' has spaces around it; llama-server takes each entry verbatim and cannot "
                           "connect to it: write host:port,host:port")
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise BadInput(f"{flag}: '{entry}' is not host:port (e.g. 127.0.0.1:50052)")
        out.append(f"{host}:{int(port)}")
    return tuple(out)


def _split(flag: str, value: str) -> tuple[float, ...]:
    """-ts 3,1 (or 3/1): one non-negative share per device."""
    try:
        shares = tuple(float(x) for x in value.replace("/", ",").split(","))
    except ValueError:
        raise BadInput(f"{flag}: '{value}' is not a list of numbers such as 3,1") from None
    if any(x < 0 for x in shares):
        raise BadInput(f"{flag}: '{value}' needs non-negative shares")
    return shares  # all zero is the default split by free memory (src/llama-model.cpp load_tensors)


def _device_list(flag: str, value: str) -> tuple[str, ...]:
    """-dev A,B (or none): device names as llama.cpp's parse_device_list reads them; each is checked against
    the plan's devices (plan/devices.py effective_device), since which devices exist depends on the machine."""
    names = tuple(value.split(","))
    if not value or any(not n for n in names):
        raise BadInput(f"{flag}: '{value}' is not a comma-separated list of devices (or none)")
    if "none" in names and names != ("none",):
        raise BadInput(f"{flag} {value}: invalid device: none (none stands alone: no offload devices)")
    if "CPU" in names:
        raise BadInput(f"{flag} {value}: invalid device: CPU (llama-server refuses the CPU here: it is always used)")
    return names


_NOT_ECMASCRIPT = re.compile(r"\(\?(P|<|#|[aiLmsux-]+[:)])")  # Python-only regex syntax llama.cpp's std::regex refuses
_RPC_BUFT = re.compile(r"^RPC\d+\[(.+)\]$")


def _overrides(flag: str, value: str, rpc: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """-ot PATTERN=BUFT,...: llama.cpp's checks (common/arg.cpp parse_tensor_buffer_overrides: each entry
    PATTERN=BUFT, BUFT a device buffer type registered so far: CPU, RPC0[host:port] for an --rpc given earlier on
    the line, a local GPU's), the pattern one std::regex (ECMAScript) accepts. Returns the (pattern, buffer type)
    pairs in order; which tensors each moves is placement's (plan/weights.py), once the model's tensors are known."""
    known = ["CPU", *(f"RPC0[{ep}]" for ep in rpc)]
    out = []
    for entry in value.split(","):
        pattern, eq, buft = entry.partition("=")
        if not eq:
            raise BadInput(f"{flag} '{entry}': invalid value (llama-server expects PATTERN=BUFFER_TYPE, e.g. exps=CPU)")
        if buft not in known and not (buft.startswith(("CUDA", "Metal", "Vulkan", "ROCm", "SYCL")) and buft[-1:].isdigit()):
            rpc_match = _RPC_BUFT.match(buft)
            hint = (f"; --rpc {rpc_match[1]} must come before {flag} on the line" if rpc_match else "")
            raise BadInput(f"{flag} {entry}: unknown buffer type '{buft}' (llama-server refuses it; available: "
                           f"{', '.join(known)}{hint})")
        if _NOT_ECMASCRIPT.search(pattern):
            raise BadInput(f"{flag} {entry}: the pattern uses syntax std::regex (ECMAScript) does not have (named groups, "
                           "lookbehind, inline flags or comments); llama-server fails to load the model with it")
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise BadInput(f"{flag} {entry}: the pattern does not compile as a regular expression ({exc}); "
                           "llama-server fails to load the model with it") from None
        out.append((pattern, buft))
    return tuple(out)


def _cpu_moe_union(a: int, b: int) -> int:
    """Overrides add up (--cpu-moe, --n-cpu-moe, -ot all push tensor overrides): all layers if either is all."""
    return -1 if a < 0 or b < 0 else max(a, b)


def _ngl(flag: str, value: str) -> str:
    """-ngl N | auto | all, as arg.cpp reads it (any number; -2 means all, -1 auto, other negatives none)."""
    if value in ("auto", "all"):
        return value
    number = _int(flag, value, INT32[0])
    return "all" if number == -2 else "auto" if number == -1 else str(max(number, 0))


def _lora_files(flag: str, value: str, scaled: bool) -> tuple[str, ...]:
    """--lora A,B or --lora-scaled A:0.5,B:1: the adapter files (the scale changes no memory)."""
    files = []
    for item in (x.strip() for x in value.split(",")):
        name, sep, scale = item.rpartition(":") if scaled else (item, "", "")
        if scaled and (not sep or not name):
            raise BadInput(f"{flag}: '{item}' is not FILE:SCALE")
        if scaled:
            try:
                float(scale)
            except ValueError:
                raise BadInput(f"{flag}: '{scale}' in '{item}' is not a number") from None
        if not name:
            raise BadInput(f"{flag} needs a file name")
        files.append(name)
    return tuple(files)


def _text(flag: str, value: str) -> str:
    """A value taken as typed (a path, URL, repo or address)."""
    return value


def _at_least(minimum: int) -> Callable[[str, str], int]:
    """A whole number as llama-server reads it, with kvbook's lower bound."""
    return lambda flag, value: _int(flag, value, minimum)


def _between(lo: int, hi: int, what: str) -> Callable[[str, str], int]:
    """A whole number llama-server checks against [lo, hi] (common/arg.cpp: "invalid_argument" with its message)."""
    def parse(flag: str, value: str) -> int:
        number = _int(flag, value, INT32[0])
        if not lo <= number <= hi:
            raise BadInput(f"{flag} {value}: llama-server refuses it ({what} must be between {lo} and {hi} inclusive)")
        return number
    return parse


def _one_of(*choices: str) -> Callable[[str, str], str]:
    return lambda flag, value: _choice(flag, value, choices)


def _listed(spelling: str, fmt: Callable[[Any], str] = str) -> Callable[[Any, ServerFlags], list[str]]:
    """Renders a list-valued field: the flag, then its items comma-joined."""
    return lambda value, flags: [spelling, ",".join(fmt(x) for x in value)]


def _added(old: Any, new: Any) -> Any:
    return old + new


@dataclass(frozen=True)
class FlagRow:
    """One modelled llama-server option, declared once: parsing, rendering, flags_read and docs/flags.md derive
    from it. Its other spellings and its LLAMA_ARG_* variable come from data/llama_server_flags.json."""

    canonical: str  # the option's first spelling in llama_server_flags.json
    field: str  # the ServerFlags field it sets
    read: str  # what it changes in the plan (the "flags read" list and the docs)
    values: str  # the values it takes, for the docs
    parse: Callable[[str, str], Any] | None = None  # a valued option: (flag as typed, value) -> the field's value
    switch: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # a switch: spelling -> the value it sets
    combine: Callable[[Any, Any], Any] | None = None  # how a repeat joins what is set so far (None: it replaces)
    render: str = ""  # the spelling the field renders as ("": another row of the same field renders it)
    tokens: Callable[[Any, ServerFlags], list[str]] | None = None  # argv for a value (None: `render` [str(value)])
    keeps: str | None = "="  # the field a solver must keep when the line sets this option ("=": `field`)


_MODEL = "the model"
_MMPROJ = "the multimodal projector: its weights and compute buffer"
_CPU_MOE = "expert weights kept in host RAM"
_OVERRIDES = "the buffer (device) of every tensor the pattern matches"
_LORA = "LoRA adapter buffers next to the weights"
_NUMBER = "a whole number >= {}"
_CACHE = "a cache type: " + ", ".join(CACHE_TYPES)
_NGL = "N, auto or all (-1 auto, -2 all)"
_NGRAM_DRAFT = "tokens {} drafts per step: the target's outputs"


def _render_model(value: Any, flags: ServerFlags) -> list[str]:
    if flags.model_url:  # -mu needs -m (where it saves the download) or the server starts in router mode
        return ["-mu", flags.model_url, *(["-m", flags.model] if flags.model else [])]
    if flags.hf_repo:
        return ["-hf", flags.hf_repo, *(["-hff", flags.hf_file] if flags.hf_file else [])]
    return ["-m", flags.model]


def _render_slot_cap(value: Any, flags: ServerFlags) -> list[str]:
    """--kv-unified-per-slot sets -c only where -c is not given: an unset -c is written out as -c 0."""
    return ["--kv-unified-per-slot", str(value), *(["-c", "0"] if not flags.ctx else [])]


# One row per modelled option. Rows render in this order (the first row of a field renders it).
FLAG_TABLE: tuple[FlagRow, ...] = (
    FlagRow("-m", "model", _MODEL, "a GGUF path", _text, render="-m", tokens=_render_model),
    FlagRow("-c", "ctx", "context size: every cache", _NUMBER.format(0) + " (0: the model's)", _at_least(0), render="-c"),
    FlagRow("-np", "parallel", "slots: context per slot, caches, logits", "N >= 1, or a negative number for auto",
            _slots, render="-np"),
    FlagRow("-ctk", "type_k", "K cache bytes", _CACHE, _one_of(*CACHE_TYPES), render="-ctk"),
    FlagRow("-ctv", "type_v", "V cache bytes", _CACHE, _one_of(*CACHE_TYPES), render="-ctv"),
    FlagRow("-b", "batch", "logical batch (caps the ubatch)", _NUMBER.format(1), _at_least(1), render="-b"),
    FlagRow("-ub", "ubatch", "compute buffer and sliding-window cells", _NUMBER.format(1), _at_least(1), render="-ub"),
    FlagRow("-cram", "cache_ram_mib", "host growth: prompt cache", _NUMBER.format(-1) + " MiB (-1: no limit)",
            _at_least(-1), render="-cram"),
    FlagRow("-ctxcp", "ctx_checkpoints", "host growth: context checkpoints", _NUMBER.format(0), _at_least(0),
            render="-ctxcp"),
    FlagRow("-ngl", "gpu_layers", "placement of weights, KV and compute", _NGL, _ngl, render="-ngl"),
    FlagRow("-fa", "flash_attn", "V row padding and the compute buffer", ", ".join((*TRUTHY, *FALSEY, *AUTOY)), _fa,
            render="-fa", tokens=lambda v, f: ["-fa", v.value]),
    FlagRow("-kvu", "kv_unified", "slots share one KV stream", "switch (unset: the server decides)",
            switch={"-kvu": True, "--kv-unified": True, "-no-kvu": False, "--no-kv-unified": False}, render="-kvu",
            tokens=lambda v, f: ["-kvu" if v else "-no-kvu"]),
    FlagRow("--swa-full", "swa_full", "sliding-window cache size and checkpoints", "switch",
            switch={"--swa-full": True}, render="--swa-full"),
    FlagRow("-kvo", "no_kv_offload", "placement of the KV cache", "switch",
            switch={"-kvo": False, "--kv-offload": False, "-nkvo": True, "--no-kv-offload": True}, render="-nkvo"),
    FlagRow("-fit", "fit", "-c 0 sizing and start-up fitting", ", ".join((*TRUTHY, *FALSEY)), _bool_value,
            render="--fit", tokens=lambda v, f: ["--fit", "off"]),
    FlagRow("--rpc", "rpc", "devices: each RPC server holds its share of the layers", "host:port[,host:port...]", _rpc,
            render="--rpc", tokens=_listed("--rpc")),
    FlagRow("-ts", "tensor_split", "layer shares per device", "non-negative shares, e.g. 3,1", _split, render="-ts",
            tokens=_listed("-ts", lambda x: f"{x:g}")),
    FlagRow("-ncmoe", "cpu_moe_layers", _CPU_MOE, _NUMBER.format(0) + " (layers 0..N-1; renders -1 as --cpu-moe)",
            _at_least(0),
            combine=_cpu_moe_union, render="--n-cpu-moe",
            tokens=lambda v, f: ["--cpu-moe"] if v < 0 else ["--n-cpu-moe", str(v)]),
    FlagRow("-cmoe", "cpu_moe_layers", _CPU_MOE, "switch (every layer)", switch={"-cmoe": -1, "--cpu-moe": -1},
            combine=_cpu_moe_union),
    FlagRow("-ot", "tensor_overrides", _OVERRIDES, "PATTERN=BUFFER_TYPE[,...]", combine=_added, render="-ot",
            tokens=lambda v, f: ["-ot", ",".join(f"{p}={b}" for p, b in v)], keeps="cpu_moe_layers"),
    FlagRow("-ncffn", "tensor_overrides", _OVERRIDES, _NUMBER.format(0) + " (dense FFN of layers 0..N-1 on the CPU)",
            lambda flag, value: tuple((rf"blk\.{il}\.ffn_(up|down|gate)\.", "CPU")  # common.h LLM_FFN_DENSE_REGEX
                                      for il in range(_int(flag, value, 0))), combine=_added, keeps=None),
    FlagRow("--repack", "repack", "CPU weights copied into the CPU_REPACK buffer (or not)", "switch",
            switch={"--repack": True, "-nr": False, "--no-repack": False}, render="-nr"),
    FlagRow("--no-host", "no_host",
            "CPU weights: the extra buffer types (CPU_REPACK) instead of a GPU's pinned host buffer", "switch",
            switch={"--no-host": True}, render="--no-host"),
    FlagRow("-dev", "devices", "devices: which offload devices are used, in this order", "NAME[,NAME...] or none",
            _device_list, render="-dev", tokens=_listed("-dev")),
    FlagRow("-sm", "split_mode", "devices: one (none) or all (layer)", "none, layer, row, tensor",
            _one_of("none", "layer", "row", "tensor"), render="-sm"),
    FlagRow("-mg", "main_gpu", "devices: the one used with -sm none", "a whole number", _at_least(INT32[0]),
            render="-mg"),
    FlagRow("-mm", "mmproj", _MMPROJ, "a GGUF path", _text, render="--mmproj"),
    FlagRow("-mmu", "mmproj", _MMPROJ, "a URL", _text),
    FlagRow("--mmproj-offload", "mmproj_offload", "where the projector sits", "switch",
            switch={"--mmproj-offload": True, "--no-mmproj-offload": False}, render="--no-mmproj-offload"),
    # rendered since the table (before it these were parsed but dropped when rendering)
    FlagRow("-fitt", "fit_target_mib", "what --fit keeps free on each device", "MiB[,MiB...] (one: every device)",
            _fit_target, render="-fitt", tokens=_listed("-fitt")),
    FlagRow("-fitc", "fit_ctx", "the smallest -c --fit may lower to", _NUMBER.format(0), _at_least(0), render="-fitc"),
    FlagRow("--kv-unified-per-slot", "slot_ctx_cap", "context size per slot", _NUMBER.format(0) + " tokens",
            _at_least(0), render="--kv-unified-per-slot", tokens=_render_slot_cap, keeps="ctx"),
    FlagRow("--host", "host", "nothing (where it listens)", "an address", _text, render="--host"),
    FlagRow("--port", "port", "nothing (where it listens)", _NUMBER.format(0), _at_least(0), render="--port"),
    FlagRow("--lora", "lora", _LORA, "FILE[,FILE...]", lambda flag, value: _lora_files(flag, value, False),
            combine=_added, render="--lora", tokens=_listed("--lora"), keeps=None),
    FlagRow("--lora-scaled", "lora", _LORA, "FILE:SCALE[,...] (the scale changes no memory)",
            lambda flag, value: _lora_files(flag, value, True), combine=_added, keeps=None),
    FlagRow("--spec-draft-model", "draft_model", "a draft model: its own weights, KV cache, logits and compute buffer",
            "a GGUF path", _text, render="-md"),
    FlagRow("--spec-draft-hf", "draft_hf_repo", "a draft model: the file llama-server fetches from the hub",
            "user/repo[:quant]", _text, render="-hfd"),
    FlagRow("--spec-draft-type-k", "draft_type_k", "the draft's K cache bytes", _CACHE, _one_of(*CACHE_TYPES),
            render="-ctkd"),
    FlagRow("--spec-draft-type-v", "draft_type_v", "the draft's V cache bytes", _CACHE, _one_of(*CACHE_TYPES),
            render="-ctvd"),
    FlagRow("--spec-type", "spec_types", "speculative decoding: with draft-mtp the MTP context (its KV cache, logits and "
            "compute buffer), the NextN weights and recurrent rollback rows; with draft-eagle3/-dflash the -md draft's "
            "output rows and the target's extracted layers; every type: the target's outputs for the drafted tokens; "
            "ngram-mod and ngram-map-k(4v): their host tables",
            "none, draft-simple, draft-mtp, draft-eagle3, draft-dflash or an n-gram mode (comma-separated; repeats "
            "add up)", spec_type_names,
            combine=_added, render="--spec-type", tokens=_listed("--spec-type")),
    FlagRow("--spec-draft-n-max", "spec_draft_n_max", "tokens drafted per step: the target's outputs and, with "
            "draft-mtp, its recurrent rollback rows", _NUMBER.format(0), _at_least(0), render="--spec-draft-n-max"),
    FlagRow("--spec-draft-backend-sampling", "spec_draft_backend_sampling", "with draft-eagle3/-dflash, the draft's "
            "compute buffer (its graph samples every reserved logits row)", "switch",
            switch={"--spec-draft-backend-sampling": True, "--no-spec-draft-backend-sampling": False},
            render="--no-spec-draft-backend-sampling", tokens=lambda v, f: [] if v else ["--no-spec-draft-backend-sampling"]),
    FlagRow("--spec-ngram-mod-n-max", "ngram_mod_n_max", _NGRAM_DRAFT.format("ngram-mod"), "0 to 1024",
            _between(0, 1024, "ngram n-max"), render="--spec-ngram-mod-n-max"),
    FlagRow("--spec-ngram-simple-size-m", "ngram_simple_size_m", _NGRAM_DRAFT.format("ngram-simple"), "1 to 1024",
            _between(1, 1024, "ngram size M"), render="--spec-ngram-simple-size-m"),
    FlagRow("--spec-ngram-map-k-size-m", "ngram_map_k_size_m", _NGRAM_DRAFT.format("ngram-map-k"), "1 to 1024",
            _between(1, 1024, "ngram size M"), render="--spec-ngram-map-k-size-m"),
    FlagRow("--spec-ngram-map-k4v-size-m", "ngram_map_k4v_size_m", _NGRAM_DRAFT.format("ngram-map-k4v"), "1 to 1024",
            _between(1, 1024, "ngram size M"), render="--spec-ngram-map-k4v-size-m"),
    FlagRow("-lcs", "lookup_caches", "with ngram-cache: refused (the file's table copied into every slot)", "a file",
            lambda flag, value: (("-lcs", value),), combine=_added, render="-lcs",
            tokens=lambda v, f: [t for pair in v for t in pair], keeps=None),
    FlagRow("-lcd", "lookup_caches", "with ngram-cache: refused (the file's table copied into every slot)", "a file",
            lambda flag, value: (("-lcd", value),), combine=_added, keeps=None),
    FlagRow("--spec-draft-ngl", "draft_gpu_layers", "placement of the draft model", _NGL, _ngl, render="-ngld"),
    FlagRow("-hf", "hf_repo", "the model: the file llama-server fetches from the hub", "user/repo[:quant]", _text),
    FlagRow("--models-preset", "models_preset", "router mode: the models it may load (each planned as its own "
            "llama-server)", "an INI file", _text, render="--models-preset"),
    FlagRow("--models-dir", "models_dir", "router mode: the models it may load (each planned as its own llama-server)",
            "a directory", _text, render="--models-dir"),
    FlagRow("--models-max", "models_max", "router mode: how many models are loaded at once (the worst case)",
            "N (0: no limit)", _at_least(INT32[0]), render="--models-max"),
    FlagRow("-hff", "hf_file", "the model: this file of the -hf repo", "a file name in the -hf repo", _text),
    FlagRow("-mu", "model_url", "the model: the file llama-server downloads (planned from its header)", "a URL", _text),
    FlagRow("-hft", "hf_token", "nothing (the hub's access token, used for -hf listings)",
            "a token (secret: never shown, never rendered)", _text),
    FlagRow("--offline", "offline", "where -hf files come from (the local cache: not planned)", "switch",
            switch={"--offline": True}, render="--offline"),
    FlagRow("--mmproj-auto", "no_mmproj", "whether the -hf repo's projector (mmproj) is loaded too", "switch",
            switch={"--mmproj-auto": False, "--no-mmproj": True, "--no-mmproj-auto": True}, render="--no-mmproj"),
)
ROWS = {row.canonical: row for row in FLAG_TABLE}
# the ServerFlags fields no option sets: kvbook's own bookkeeping, and what only a preset sets
NOT_FLAGS = frozenset({"argv", "ignored", "from_env", "read", "draft_hf_file"})
# fields a row does not render, and why
UNRENDERED = {"hf_token": "a secret: never written into a command line kvbook shows",
              "hf_repo": "rendered with the model (-m row)", "hf_file": "rendered with the model (-m row)",
              "model_url": "rendered with the model (-m row)"}


def _renderers() -> dict[str, FlagRow]:
    """field -> the row that renders it, in render order."""
    out: dict[str, FlagRow] = {}
    for row in FLAG_TABLE:
        if row.render and row.field not in out:
            out[row.field] = row
    return out


def _refusal(flag: str, canonical: str, value: str | None) -> str | None:
    """Why kvbook refuses this flag (it changes memory in a way not modelled yet), or None."""
    if flag in UNMODELLED_SPELLINGS:
        return UNMODELLED_SPELLINGS[flag]
    if canonical in UNMODELLED:
        return UNMODELLED[canonical]
    if canonical == "--spec-type" and value is not None:
        unmodelled = [t for t in value.split(",") if t in UNMODELLED_TYPES]
        if unmodelled and "none" not in value.split(","):
            return f"--spec-type {unmodelled[0]}: {UNMODELLED_TYPES[unmodelled[0]]}"
    return None


def _apply(values: dict[str, Any], ignored: list[str], flag: str, canonical: str, value: str | None,
           shown: str, read: list[tuple[str, str, str]] | None = None, source: str = "command line") -> None:
    """Record what one option sets; `shown` names it in errors (the flag as typed, or its variable)."""
    row = ROWS.get(canonical)
    if row is not None and row.switch and flag not in row.switch:
        row = None
    if read is not None:
        label = shown if value is None or source == "environment" else f"{shown} {value}"
        if source.startswith("preset "):
            label = flag if value is None else f"{flag} {value}"
        if canonical in SECRET_OPTIONS and source == "command line":
            label = f"{shown} ***"
        read.append((label, source, row.read if row else "nothing: does not change memory"))
    if canonical in REMOVED:
        raise BadInput(f"{shown}: the argument has been removed from llama-server (it refuses it); {REMOVED[canonical]}")
    why = _refusal(flag, canonical, value)
    if why:
        raise BadInput(f"{shown} changes memory ({why}) and kvbook does not model it yet")
    if row is None:
        ignored.append(shown)
        return
    if canonical == "-ot":  # its buffer types may name an --rpc given earlier on the line
        new = _overrides(shown, value or "", values.get("rpc", ()))
    else:
        new = row.parse(shown, value or "") if row.parse else row.switch[flag]
    if row.combine is not None:
        new = row.combine(values.get(row.field, getattr(_DEFAULTS, row.field)), new)
    values[row.field] = new


def _env_switches() -> dict[str, tuple[str, str]]:
    """Options with a negative spelling (a bool handler in arg.cpp) set by a variable: canonical -> (the spelling a
    true value means, the one a false value means); LLAMA_ARG_NO_<X> also means false."""
    out = {}
    for row in FLAG_TABLE:
        no = [s for s, v in row.switch.items() if v != row.switch[row.canonical]] if row.switch else []
        if no:
            out[row.canonical] = (row.canonical, no[0])
    return out


_ENV_SWITCHES = _env_switches()


def _from_environment(environ: Mapping[str, str], values: dict[str, Any], ignored: list[str],
                      log: list[tuple[str, str, str]]) -> list[str]:
    """The LLAMA_ARG_* variables llama-server would read (before the command line, which wins)."""
    read = []
    for name, canonical in _env_names().items():
        negative = name.replace("LLAMA_ARG_", "LLAMA_ARG_NO_", 1) if canonical in _ENV_SWITCHES else None
        if negative and negative in environ:
            raw, shown = "0", f"{negative}={environ[negative]}"
        elif name in environ:
            raw = environ[name]
            shown = f"{name}=***" if canonical in SECRET_OPTIONS else f"{name}={raw}"
        else:
            continue
        read.append(shown)
        env: dict[str, Any] = {"read": log, "source": "environment"}
        if _spellings()[canonical][1]:
            _apply(values, ignored, canonical, canonical, raw, shown, **env)
        elif canonical in _ENV_SWITCHES:
            yes, no = _ENV_SWITCHES[canonical]
            _apply(values, ignored, yes if _bool_value(shown, raw) else no, canonical, None, shown, **env)
        elif raw in TRUTHY:
            _apply(values, ignored, canonical, canonical, None, shown, **env)
    return read


def _expand_preset(values: dict[str, Any], ignored: list[str], token: str, canonical: str,
                   log: list[tuple[str, str, str]]) -> None:
    """A preset flag: the options it sets, applied where it stands, each listed as set by the preset."""
    table = _spellings()
    settings = PRESETS[canonical]
    shown = " ".join(f if v is None else f"{f} {v}" for f, v in settings)
    if canonical in PRESET_UNFLAGGED:
        shown += f" (and {PRESET_UNFLAGGED[canonical]}, which has no server flag)"
    if canonical in PRESET_DRAFT_FILE:
        shown += f" (and the draft file {PRESET_DRAFT_FILE[canonical]}, which has no server flag)"
        values["draft_hf_file"] = PRESET_DRAFT_FILE[canonical]
    log.append((token, "command line", f"preset: sets {shown}"))
    for flag, value in settings:
        _apply(values, ignored, flag, table[flag][0], value, f"{token} (sets {flag}{'' if value is None else ' ' + value})",
               log, source=f"preset {token}")


def parse_server_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ServerFlags:
    """A llama-server command line (with or without the program name) as ServerFlags; `environ` is the
    environment the server would see (its LLAMA_ARG_* variables apply unless the line sets the same option)."""
    args = list(argv)
    if args and not args[0].startswith("-") and PurePath(args[0]).name.startswith("llama-server"):
        args = args[1:]
    table = _spellings()
    values: dict[str, Any] = {}
    ignored: list[str] = []
    log: list[tuple[str, str, str]] = []
    from_env = _from_environment(environ, values, ignored, log) if environ else []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-") or token == "-":
            raise BadInput(f"unexpected argument '{token}': llama-server takes no positional arguments")
        flag = token.replace("_", "-") if token.startswith("--") else token
        if flag not in table:
            name, eq, rest = flag.partition("=")
            if eq and name in table:
                raise BadInput(f"'{token}': llama-server takes no '=' form (it answers 'invalid argument'); "
                               f"write '{name} {rest}'")
            hint = (" (this build spells loading modes '-lm mlock', '-lm mmap+mlock', '-lm mmap' or '-lm none' "
                    "for no mmap)") if flag in ("--mlock", "--no-mmap", "--mmap") else ""
            raise BadInput(f"unknown llama-server flag '{token}' (not in the pinned build's --help){hint}")
        canonical, takes_value = table[flag]
        value: str | None = None
        if takes_value:
            if i + 1 >= len(args):
                raise BadInput(f"{token} needs a value")
            i += 1
            value = args[i]
        i += 1
        if canonical in PRESETS:
            _expand_preset(values, ignored, token, canonical, log)
        else:
            _apply(values, ignored, flag, canonical, value, token, log)
    if values.get("hf_file") and not values.get("hf_repo"):
        raise BadInput("-hff FILE needs -hf USER/REPO: llama-server reads the file name only with a repo")
    if values.get("hf_repo") and values.get("model_url"):
        raise BadInput("-hf and -mu both give the model: llama-server would fetch both; give one of them")
    if values.get("model_url") and not values.get("model") and not values.get("hf_repo"):
        raise BadInput("-mu URL without -m: this llama-server build then starts in router mode and loads no model; "
                       "add -m PATH (where it saves the download)")
    if values.get("hf_repo") or values.get("model_url"):
        values.setdefault("model", "")  # -hf / -mu win over -m: llama-server loads the file it fetched
    if "model" not in values and (values.get("models_preset") or values.get("models_dir")):
        values["model"] = ""  # router mode (tools/server/server.cpp is_router_server): ops/router.py plans each model
    if "model" not in values:
        raise BadInput("the llama-server command line has no model: give -m MODEL or -hf USER/REPO[:QUANT]")
    per_slot = values.get("slot_ctx_cap", 0)
    if per_slot and "ctx" not in values:  # server.cpp: only without -c (an explicit -c 0 wins); 0 means unset
        values["ctx"] = (values.get("parallel", -1) if values.get("parallel", -1) > 0 else 4) * per_slot
    return ServerFlags(argv=tuple(argv), ignored=tuple(ignored), from_env=tuple(from_env), read=tuple(log), **values)


def _render_field(flags: ServerFlags, field: str) -> list[str]:
    """The argv tokens that set one field to its value in `flags` ([] for the server's default, or a field no
    row renders: see UNRENDERED)."""
    row = _renderers().get(field)
    value = getattr(flags, field)
    if row is None or (field != "model" and value == getattr(_DEFAULTS, field)):
        return []
    if row.tokens is not None:
        return row.tokens(value, flags)
    return [row.render] if row.switch else [row.render, str(value)]


def render_args(flags: ServerFlags) -> list[str]:
    """ServerFlags as a llama-server argv (the flags that differ from the server's defaults)."""
    return [token for field in _renderers() for token in _render_field(flags, field)]


def edit_argv(argv: Sequence[str], flags: ServerFlags, fields: Sequence[str]) -> tuple[str, ...]:
    """The user's own command line with only `fields` changed to their values in `flags`: every other
    flag, memory-relevant or not (--port, --jinja, sampling...), is kept as typed."""
    args = list(argv)
    head = [args.pop(0)] if args and not args[0].startswith("-") else []
    table = _spellings()
    fields = list(fields)
    if "--kv-unified-per-slot" in {table.get(a.replace("_", "-") if a.startswith("--") else a, ("",))[0]
                                    for a in args} and {"ctx", "parallel"} & set(fields):
        fields = ["ctx", *(f for f in fields if f != "ctx")]  # the per-slot size became -c: write it out
    drop = {row.canonical for row in FLAG_TABLE if row.field in fields}
    if "ctx" in fields:
        drop.add("--kv-unified-per-slot")
    kept: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        flag = token.replace("_", "-") if token.startswith("--") else token
        canonical, takes_value = table.get(flag, (flag, False))
        width = 2 if takes_value and "=" not in token else 1
        if canonical not in drop:
            kept += args[i:i + width]
        i += width
    return tuple(head + kept + [t for f in fields for t in _render_field(flags, f)])


def replace(flags: ServerFlags, **changes: Any) -> ServerFlags:
    """ServerFlags with some settings changed; argv is the user's with just those flags edited."""
    updated = dataclasses.replace(flags, **changes)
    source = flags.argv or render_args(flags)
    argv = edit_argv(source, updated, list(changes))
    if flags.slot_ctx_cap and not any(a.replace("_", "-") == "--kv-unified-per-slot" for a in argv):
        updated = dataclasses.replace(updated, slot_ctx_cap=0)  # the per-slot size was written out as -c
    return dataclasses.replace(updated, argv=argv)


def fields_set(flags: ServerFlags) -> frozenset[str]:
    """The ServerFlags fields the user's command line (or environment) sets: the ones a solver must keep."""
    table, env = _spellings(), _env_names()
    owner = {row.canonical: row.field if row.keeps == "=" else row.keeps for row in FLAG_TABLE if row.keeps}
    canon = [table.get(a.replace("_", "-") if a.startswith("--") else a, ("",))[0] for a in flags.argv if a.startswith("-")]
    canon += [env.get(item.partition("=")[0].replace("LLAMA_ARG_NO_", "LLAMA_ARG_", 1), "") for item in flags.from_env]
    canon += [env.get(item.partition("=")[0], "") for item in flags.from_env]
    return frozenset(owner[c] for c in canon if c in owner)


def flags_markdown() -> str:
    """docs/flags.md: the modelled options as the table declares them (tools/gen_flags_doc.py writes it,
    tests/test_flag_table.py checks it is current)."""
    spellings = {entry["names"][0]: entry for entry in _options()}
    lines = ["# llama-server flags kvbook models", "",
             "Generated from `FLAG_TABLE` in `lib/kvbook/plan/flags.py` by `tools/gen_flags_doc.py`; do not edit.",
             "Spellings and variables are the pinned build's (`lib/kvbook/data/llama_server_flags.json`). A flag",
             "not listed here is either refused by name (it changes memory in a way kvbook does not model) or",
             "accepted and listed as ignored (it changes no memory).", "",
             "| flag (aliases) | variable | values | `ServerFlags` field | what it changes | renders as |",
             "|---|---|---|---|---|---|"]
    renderers = _renderers()
    for row in FLAG_TABLE:
        entry = spellings[row.canonical]
        names = ", ".join(f"`{n}`" for n in entry["names"])
        env = f"`{entry['env']}`" if entry.get("env") else ""
        if renderers.get(row.field) is row:
            renders = f"`{row.render}`"
        else:
            renders = UNRENDERED.get(row.field) or f"by the `{renderers[row.field].canonical}` row"
        lines.append(f"| {names} | {env} | {row.values} | `{row.field}` | {row.read} | {renders} |")
    return "\n".join(lines) + "\n"
