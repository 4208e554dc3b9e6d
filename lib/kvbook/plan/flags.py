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
from functools import cache
from importlib import resources
from pathlib import PurePath
from typing import Any

from kvbook.errors import BadInput
from kvbook.interface import FlashAttn, ServerFlags
from kvbook.memory.rules import CACHE_TYPE_LAYOUT

CACHE_TYPES = tuple(CACHE_TYPE_LAYOUT)  # every -ctk/-ctv value the pinned server accepts

# Flags that change what llama-server allocates but that kvbook does not model (yet).
UNMODELLED = {
    "--control-vector": "control vectors",
    "--control-vector-scaled": "control vectors",
    "--override-kv": "metadata overrides that can change the architecture",
    "--spec-type": "speculative decoding state",
    "--spec-draft-device": "the draft model's device",
    "--spec-draft-cpu-moe": "the draft's experts on the CPU",
    "--spec-draft-n-cpu-moe": "the draft's experts on the CPU",
    "--spec-draft-override-tensor": "a draft model for speculative decoding",
    "-mmdev": "the projector's device",
    "--image-min-tokens": "the projector's warm-up image size (its compute buffer)",
    "--image-max-tokens": "the projector's warm-up image size (its compute buffer)",
    "-dr": "a model pulled from a registry at start (pass the GGUF path instead)",
    "--embedding": "embedding outputs",
    "--rerank": "reranking outputs",
    "--pooling": "pooled outputs",
    "--models-dir": "router mode (several models)",
    "--models-preset": "router mode (several models)",
}
# options whose value is a secret: never echoed in a plan (notes, flags_read)
SECRET_OPTIONS = {"-hft", "--api-key"}
# Spellings refused although their option's other spellings are fine.
UNMODELLED_SPELLINGS: dict[str, str] = {}
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


@cache
def _options() -> list[dict[str, Any]]:
    return json.loads(resources.files("kvbook").joinpath("data/llama_server_flags.json").read_text())["options"]


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


# canonical spelling -> (field, converter); converters get (flag as typed, value)
_VALUED: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "-m": ("model", lambda f, v: v),
    "-c": ("ctx", lambda f, v: _int(f, v, 0)),
    "-np": ("parallel", _slots),
    "-ctk": ("type_k", lambda f, v: _choice(f, v, CACHE_TYPES)),
    "-ctv": ("type_v", lambda f, v: _choice(f, v, CACHE_TYPES)),
    "-fa": ("flash_attn", _fa),
    "-b": ("batch", lambda f, v: _int(f, v, 1)),
    "-ub": ("ubatch", lambda f, v: _int(f, v, 1)),
    "-cram": ("cache_ram_mib", lambda f, v: _int(f, v, -1)),
    "-ctxcp": ("ctx_checkpoints", lambda f, v: _int(f, v, 0)),
    "-ngl": ("gpu_layers", _ngl),
    "-fit": ("fit", _bool_value),
    "-fitt": ("fit_target_mib", lambda f, v: _fit_target(f, v)),
    "-fitc": ("fit_ctx", lambda f, v: _int(f, v, 0)),
    "--rpc": ("rpc", _rpc),
    "-ncmoe": ("cpu_moe_layers", lambda f, v: _int(f, v, 0)),
    "-ts": ("tensor_split", _split),
    "--host": ("host", lambda f, v: v),
    "--port": ("port", lambda f, v: _int(f, v, 0)),
    "-dev": ("devices", _device_list),
    "-sm": ("split_mode", lambda f, v: _choice(f, v, ("none", "layer", "row", "tensor"))),
    "-mg": ("main_gpu", lambda f, v: _int(f, v, INT32[0])),
    "--spec-draft-model": ("draft_model", lambda f, v: v),
    "--spec-draft-hf": ("draft_hf_repo", lambda f, v: v),
    "--spec-draft-type-k": ("draft_type_k", lambda f, v: _choice(f, v, CACHE_TYPES)),
    "--spec-draft-type-v": ("draft_type_v", lambda f, v: _choice(f, v, CACHE_TYPES)),
    "--spec-draft-ngl": ("draft_gpu_layers", _ngl),
    "-mm": ("mmproj", lambda f, v: v),
    "-mmu": ("mmproj", lambda f, v: v),
    "-hf": ("hf_repo", lambda f, v: v),
    "-mu": ("model_url", lambda f, v: v),
    "-hft": ("hf_token", lambda f, v: v),
    "-hff": ("hf_file", lambda f, v: v),
}

# canonical spelling -> {spelling: (field, value)} for boolean switches
_SWITCHES: dict[str, dict[str, tuple[str, Any]]] = {
    "-kvu": {"-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True),
             "-no-kvu": ("kv_unified", False), "--no-kv-unified": ("kv_unified", False)},
    "--swa-full": {"--swa-full": ("swa_full", True)},
    "--no-host": {"--no-host": ("no_host", True)},
    "--repack": {"--repack": ("repack", True), "-nr": ("repack", False), "--no-repack": ("repack", False)},
    "-cmoe": {"-cmoe": ("cpu_moe_layers", -1), "--cpu-moe": ("cpu_moe_layers", -1)},
    "-kvo": {"-kvo": ("no_kv_offload", False), "--kv-offload": ("no_kv_offload", False),
             "-nkvo": ("no_kv_offload", True), "--no-kv-offload": ("no_kv_offload", True)},
    "--offline": {"--offline": ("offline", True)},
    "--mmproj-offload": {"--mmproj-offload": ("mmproj_offload", True), "--no-mmproj-offload": ("mmproj_offload", False)},
    "--mmproj-auto": {"--mmproj-auto": ("no_mmproj", False), "--no-mmproj": ("no_mmproj", True),
                      "--no-mmproj-auto": ("no_mmproj", True)},
}


def _refusal(flag: str, canonical: str, value: str | None) -> str | None:
    """Why kvbook refuses this flag (it changes memory in a way not modelled yet), or None."""
    if flag in UNMODELLED_SPELLINGS:
        return UNMODELLED_SPELLINGS[flag]
    if canonical in UNMODELLED and not (canonical == "--spec-type" and value in ("none", "draft-simple")):
        return UNMODELLED[canonical]
    return None


# what each field changes in the plan, for the "flags read" list
_EFFECT = {
    "model": "the model", "ctx": "context size: every cache", "parallel": "slots: context per slot, caches, logits",
    "kv_unified": "slots share one KV stream", "fit": "-c 0 sizing and start-up fitting",
    "fit_target_mib": "what --fit keeps free on each device", "fit_ctx": "the smallest -c --fit may lower to",
    "type_k": "K cache bytes", "type_v": "V cache bytes", "flash_attn": "V row padding and the compute buffer",
    "batch": "logical batch (caps the ubatch)", "ubatch": "compute buffer and sliding-window cells",
    "swa_full": "sliding-window cache size and checkpoints", "cache_ram_mib": "host growth: prompt cache",
    "ctx_checkpoints": "host growth: context checkpoints", "gpu_layers": "placement of weights, KV and compute",
    "no_kv_offload": "placement of the KV cache", "host": "nothing (where it listens)",
    "rpc": "devices: each RPC server holds its share of the layers", "tensor_split": "layer shares per device",
    "cpu_moe_layers": "expert weights kept in host RAM",
    "tensor_overrides": "the buffer (device) of every tensor the pattern matches",
    "repack": "CPU weights copied into the CPU_REPACK buffer (or not)",
    "no_host": "CPU weights: the extra buffer types (CPU_REPACK) instead of a GPU's pinned host buffer",
    "port": "nothing (where it listens)", "kv_unified_per_slot": "context size per slot",
    "devices": "devices: which offload devices are used, in this order", "split_mode": "devices: one (none) or all (layer)",
    "main_gpu": "devices: the one used with -sm none",
    "hf_repo": "the model: the file llama-server fetches from the hub",
    "model_url": "the model: the file llama-server downloads (planned from its header)",
    "hf_token": "nothing (the hub's access token, used for -hf listings)",
    "offline": "where -hf files come from (the local cache: not planned)", "hf_file": "the model: this file of the -hf repo",
    "no_mmproj": "whether the -hf repo's projector (mmproj) is loaded too",
    "lora": "LoRA adapter buffers next to the weights",
    "draft_model": "a draft model: its own weights, KV cache, logits and compute buffer",
    "draft_hf_repo": "a draft model: the file llama-server fetches from the hub",
    "draft_type_k": "the draft's K cache bytes", "draft_type_v": "the draft's V cache bytes",
    "draft_gpu_layers": "placement of the draft model",
    "mmproj": "the multimodal projector: its weights and compute buffer", "mmproj_offload": "where the projector sits",
}


def _apply(values: dict[str, Any], ignored: list[str], flag: str, canonical: str, value: str | None,
           shown: str, read: list[tuple[str, str, str]] | None = None, source: str = "command line") -> None:
    """Record what one option sets; `shown` names it in errors (the flag as typed, or its variable)."""
    field = _VALUED.get(canonical, (None,))[0] or (
        _SWITCHES[canonical][flag][0] if canonical in _SWITCHES and flag in _SWITCHES[canonical] else None)
    if canonical == "--kv-unified-per-slot":
        field = "kv_unified_per_slot"
    if canonical in ("-ot", "-ncffn"):
        field = "tensor_overrides"
    if canonical in ("--lora", "--lora-scaled"):
        field = "lora"
    if read is not None:
        label = shown if value is None or source == "environment" else f"{shown} {value}"
        if source.startswith("preset "):
            label = flag if value is None else f"{flag} {value}"
        if canonical in SECRET_OPTIONS and source == "command line":
            label = f"{shown} ***"
        read.append((label, source, _EFFECT.get(field or "", "nothing: does not change memory")))
    why = _refusal(flag, canonical, value)
    if why:
        raise BadInput(f"{shown} changes memory ({why}) and kvbook does not model it yet")
    if canonical in ("--lora", "--lora-scaled"):
        values["lora"] = values.get("lora", ()) + _lora_files(shown, value or "", canonical == "--lora-scaled")
    elif canonical == "--kv-unified-per-slot":
        values["kv_unified_per_slot"] = _int(shown, value or "", 0)
    elif canonical == "-ot":
        values["tensor_overrides"] = values.get("tensor_overrides", ()) + _overrides(shown, value or "", values.get("rpc", ()))
    elif canonical == "-ncffn":  # common/common.h llm_add_n_cpu_ffn_overrides with LLM_FFN_DENSE_REGEX, in line order
        values["tensor_overrides"] = values.get("tensor_overrides", ()) + tuple(
            (rf"blk\.{il}\.ffn_(up|down|gate)\.", "CPU") for il in range(_int(shown, value or "", 0)))
    elif canonical in ("-ncmoe", "-cmoe"):
        new = _VALUED[canonical][1](shown, value or "") if canonical == "-ncmoe" else -1
        values["cpu_moe_layers"] = _cpu_moe_union(values.get("cpu_moe_layers", 0), new)
    elif canonical in _VALUED:
        field, convert = _VALUED[canonical]
        values[field] = convert(shown, value or "")
    elif canonical in _SWITCHES:
        field, setting = _SWITCHES[canonical][flag]
        values[field] = setting
    else:
        ignored.append(shown)


# options with a negative spelling (a bool handler in arg.cpp) set by a variable: canonical -> (the spelling a
# true value means, the one a false value means); LLAMA_ARG_NO_<X> also means false
_ENV_SWITCHES = {"-kvu": ("-kvu", "-no-kvu"), "-kvo": ("-kvo", "-nkvo"), "--repack": ("--repack", "-nr"),
                 "--mmproj-auto": ("--mmproj-auto", "--no-mmproj"),
                 "--mmproj-offload": ("--mmproj-offload", "--no-mmproj-offload")}


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
    if "model" not in values:
        raise BadInput("the llama-server command line has no model: give -m MODEL or -hf USER/REPO[:QUANT]")
    per_slot = values.pop("kv_unified_per_slot", None)
    if per_slot and "ctx" not in values:  # server.cpp: only without -c (an explicit -c 0 wins); 0 means unset
        values["ctx"] = (values.get("parallel", -1) if values.get("parallel", -1) > 0 else 4) * per_slot
    if per_slot:
        values["slot_ctx_cap"] = per_slot
    return ServerFlags(argv=tuple(argv), ignored=tuple(ignored), from_env=tuple(from_env), read=tuple(log), **values)


_RENDERED = (("-c", "ctx"), ("-np", "parallel"), ("-ctk", "type_k"), ("-ctv", "type_v"), ("-b", "batch"),
             ("-ub", "ubatch"), ("-cram", "cache_ram_mib"), ("-ctxcp", "ctx_checkpoints"), ("-ngl", "gpu_layers"))


def _render_field(flags: ServerFlags, field: str) -> list[str]:
    """The argv tokens that set one field to its value in `flags` ([] for the server's default)."""
    default = ServerFlags(model=flags.model)
    value = getattr(flags, field)
    if field == "model":
        if flags.model_url:
            return ["-mu", flags.model_url]
        if flags.hf_repo:
            return ["-hf", flags.hf_repo, *(["-hff", flags.hf_file] if flags.hf_file else [])]
        return ["-m", flags.model]
    if value == getattr(default, field):
        return []
    for flag, name in _RENDERED:
        if name == field:
            return [flag, str(value)]
    if field == "flash_attn":
        return ["-fa", value.value]
    if field == "kv_unified":
        return ["-kvu" if value else "-no-kvu"]
    if field == "swa_full":
        return ["--swa-full"]
    if field == "no_host":
        return ["--no-host"]
    if field == "no_kv_offload":
        return ["-nkvo"]
    if field == "fit":
        return ["--fit", "off"]
    if field == "mmproj":
        return ["--mmproj", value]
    if field == "mmproj_offload":
        return ["--no-mmproj-offload"]
    if field == "rpc":
        return ["--rpc", ",".join(value)]
    if field == "cpu_moe_layers":
        return ["--cpu-moe"] if value < 0 else ["--n-cpu-moe", str(value)]
    if field == "tensor_overrides":
        return ["-ot", ",".join(f"{p}={b}" for p, b in value)]
    if field == "repack":
        return ["-nr"]
    if field == "tensor_split":
        return ["-ts", ",".join(f"{x:g}" for x in value)]
    if field == "devices":
        return ["-dev", ",".join(value)]
    if field == "split_mode":
        return ["-sm", value]
    if field == "main_gpu":
        return ["-mg", str(value)]
    return []


def render_args(flags: ServerFlags) -> list[str]:
    """ServerFlags as a llama-server argv (memory flags that differ from defaults)."""
    fields = ["model", *(name for _, name in _RENDERED), "flash_attn", "kv_unified", "swa_full", "no_kv_offload", "fit",
              "rpc", "tensor_split", "cpu_moe_layers", "tensor_overrides", "repack", "no_host", "devices", "split_mode", "main_gpu", "mmproj",
              "mmproj_offload"]
    return [token for field in fields for token in _render_field(flags, field)]


def _canonical_of_field() -> dict[str, str]:
    out = {field: canonical for canonical, (field, _) in _VALUED.items()}
    out.update({field: canonical for canonical, spellings in _SWITCHES.items() for field, _ in spellings.values()})
    return out


def edit_argv(argv: Sequence[str], flags: ServerFlags, fields: Sequence[str]) -> tuple[str, ...]:
    """The user's own command line with only `fields` changed to their values in `flags`: every other
    flag, memory-relevant or not (--port, --jinja, sampling...), is kept as typed."""
    args = list(argv)
    head = [args.pop(0)] if args and not args[0].startswith("-") else []
    table, owner = _spellings(), _canonical_of_field()
    fields = list(fields)
    if "--kv-unified-per-slot" in {table.get(a.replace("_", "-") if a.startswith("--") else a, ("",))[0]
                                    for a in args} and {"ctx", "parallel"} & set(fields):
        fields = ["ctx", *(f for f in fields if f != "ctx")]  # the per-slot size became -c: write it out
    drop = {owner[f] for f in fields if f in owner}
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
    owner = {canonical: field for canonical, (field, _) in _VALUED.items()}
    owner.update({canonical: field for canonical, spellings in _SWITCHES.items() for field, _ in spellings.values()})
    owner["--kv-unified-per-slot"] = "ctx"
    owner["-ot"] = "cpu_moe_layers"
    canon = [table.get(a.replace("_", "-") if a.startswith("--") else a, ("",))[0] for a in flags.argv if a.startswith("-")]
    canon += [env.get(item.partition("=")[0].replace("LLAMA_ARG_NO_", "LLAMA_ARG_", 1), "") for item in flags.from_env]
    canon += [env.get(item.partition("=")[0], "") for item in flags.from_env]
    return frozenset(owner[c] for c in canon if c in owner)
