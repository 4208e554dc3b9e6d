"""kvbook reads a llama-server command line as the pinned server does. Each row is run against the real
binary (`llama-server ARGS --version`: the server parses every argument, then prints its version and exits,
in milliseconds, loading nothing) and through kvbook's parser, and both outcomes are asserted."""

from __future__ import annotations

import os
import subprocess

import pytest

from kvbook.errors import BadInput
from kvbook.plan.flags import parse_server_args

# (arguments, LLAMA_ARG_* environment, the server accepts, kvbook: "ok" or the words of its refusal)
ROWS = [
    (["-c", "4096"], {}, True, "ok"),
    (["--ctx-size", "4096"], {}, True, "ok"),
    (["--ctx_size", "4096"], {}, True, "ok"),  # `--` spellings: underscores read as dashes
    (["--ctx-size=4096"], {}, False, "no '=' form"),
    (["-c", "99999999999"], {}, False, "out of range"),
    (["-c", "2147483647"], {}, True, "ok"),
    (["-c", "4096abc"], {}, True, "ok"),  # std::stoi reads the leading digits
    (["-c", "abc"], {}, False, "expects a whole number"),
    (["-np", "0"], {}, False, "invalid value for n_parallel"),
    (["-np", "-5"], {}, True, "ok"),  # any negative is auto
    (["-ctk", "q3_k"], {}, False, "unknown value 'q3_k'"),
    (["-ctk", "iq4_nl", "-ctv", "q5_1"], {}, True, "ok"),
    (["-fa", "maybe"], {}, False, "unknown value 'maybe'"),
    (["-fa", "on", "-kvu", "--swa-full", "-nkvo"], {}, True, "ok"),
    (["--mlock"], {}, False, "-lm mlock"),
    (["--no-mmap"], {}, False, "-lm none"),
    (["-lm", "mlock"], {}, True, "ok"),
    (["--frobnicate"], {}, False, "unknown llama-server flag"),
    (["-c"], {}, False, "needs a value"),
    (["--jinja", "--port", "9000", "-n", "256", "--temp", "0"], {}, True, "ok"),
    ([], {"LLAMA_ARG_CTX_SIZE": "16384", "LLAMA_ARG_N_PARALLEL": "2"}, True, "ok"),
    ([], {"LLAMA_ARG_CTX_SIZE": "abc"}, False, "expects a whole number"),
    ([], {"LLAMA_ARG_N_PARALLEL": "0"}, False, "invalid value for n_parallel"),
    # memory-changing options kvbook does not model yet: the server takes them, kvbook refuses by name
    # presets are expanded to what they set (tests/test_hub_sources.py checks them against the real server)
    (["--gpt-oss-20b-default"], {}, True, "ok"),
    (["--fim-qwen-1.5b-default", "-c", "4096"], {}, True, "ok"),
    (["--embd-gemma-default"], {}, True, "sets --embedding"),
    (["--fim-qwen-7b-spec"], {}, True, "ok"),  # its draft comes from the hub (-hfd) and is planned
    (["--spec-default"], {}, True, "ok"),  # sets --spec-type ngram-mod: planned (test_spec_ngram.py)
    (["--draft", "4"], {}, False, "has been removed"),
    (["-hf", "ggml-org/gpt-oss-20b-GGUF:Q4_K_M", "--no-mmproj"], {}, True, "ok"),
    ([], {"LLAMA_ARG_HF_REPO": "ggml-org/gpt-oss-20b-GGUF", "LLAMA_ARG_MMPROJ_AUTO": "0"}, True, "ok"),
    (["-hff", "model.gguf"], {}, True, "-hff FILE needs -hf"),
    # a draft model, an MTP head, EAGLE3 and DFlash are planned (tests/test_draft.py, test_spec_*.py); other types refused by name
    (["-md", "draft.gguf", "-ctkd", "q8_0", "-ctvd", "q8_0", "-ngld", "99"], {}, True, "ok"),
    (["-ctkd", "q3_k"], {}, False, "unknown value 'q3_k'"),
    (["--spec-type", "draft-mtp", "--spec-draft-n-max", "2"], {}, True, "ok"),
    (["--spec-type", "mtp"], {}, False, "unknown speculative type 'mtp'"),
    (["--spec-type", "draft-eagle3"], {}, True, "ok"),  # planned with an eagle3 -md (test_spec_eagle.py)
    (["--spec-type", "draft-dflash"], {}, True, "ok"),  # planned with a dflash -md (test_spec_dflash.py)
    (["--spec-type", "draft-dspark"], {}, True, "DSpark"),
    (["--spec-draft-n-max", "-1"], {}, False, "must be >= 0"),
    (["--mmproj", "p.gguf", "--no-mmproj-offload"], {}, True, "ok"),
    (["--image-max-tokens", "256"], {}, True, "warm-up image size"),
    (["--lora", "a.gguf,b.gguf", "--lora-scaled", "c.gguf:0.5"], {}, True, "ok"),
    (["--lora-scaled", "c.gguf"], {}, False, "not FILE:SCALE"),
    (["-mu", "http://127.0.0.1:9/m.gguf"], {}, True, "ok"),  # with the table's -m; alone: router mode (refused)
    (["-nr"], {}, True, "ok"),  # no CPU_REPACK buffer: modelled (tests/test_repack.py)
    ([], {"LLAMA_ARG_REPACK": "0"}, True, "ok"),
    (["--no-host"], {}, True, "ok"),  # CPU weights skip a GPU's host buffer type: modelled (tests/test_repack.py)
    ([], {"LLAMA_ARG_NO_HOST": "1"}, True, "ok"),
    (["-ot", "exps=CPU"], {}, True, "ok"),  # any tensors to CPU or a device: modelled per tensor (tests/test_repack.py)
    (["-ot", r"blk\.(0|1)\.ffn_.*_exps=CPU,blk\.2\.ffn_.*_exps=CPU"], {}, True, "ok"),
    (["-ot", "exps"], {}, False, "invalid value"),
    (["-ot", "exps=GPU9"], {}, False, "unknown buffer type 'GPU9'"),
    (["-ot", "ex(ps=CPU"], {}, True, "does not compile"),  # the server fails later, loading the model
    (["-ot", "attn=CPU"], {}, True, "ok"),
    (["-ot", "(?i)EXPS=CPU"], {}, True, "ECMAScript"),  # std::regex has no inline flags: the load fails
    (["-ot", "(?<=x)exps=CPU"], {}, False, "unknown buffer type 'x)exps=CPU'"),  # split at the first '=', as arg.cpp
    (["-dev", "none"], {}, True, "ok"),
    (["-dev", "CPU"], {}, False, "invalid device: CPU"),
    (["-sm", "none", "-mg", "0"], {}, True, "ok"),
    (["-sm", "rows"], {}, False, "unknown value 'rows'"),
    ([], {"LLAMA_ARG_SPLIT_MODE": "layer", "LLAMA_ARG_MAIN_GPU": "1"}, True, "ok"),
    (["--n-cpu-moe", "10"], {}, True, "ok"),
    ([], {"LLAMA_ARG_N_CPU_MOE": "10"}, True, "ok"),
    (["--n-cpu-moe", "-1"], {}, False, "must be >= 0"),
    (["-ncffn", "2"], {}, True, "ok"),  # dense FFN overrides to CPU, per tensor (tests/test_rpc_placement.py)
    (["-ncffn", "-1"], {}, False, "must be >= 0"),
    # value sets are arg.cpp's, exact and case-sensitive
    (["-fa", "true"], {}, True, "ok"),
    (["-fa", "-1"], {}, True, "ok"),
    (["-fa", "ON"], {}, False, "unknown value 'ON'"),
    (["-fit", "enabled"], {}, True, "ok"),
    (["-fit", "ON"], {}, False, "unknown value 'ON'"),
    (["-ngl", "-2"], {}, True, "ok"),
    (["--kv-unified-per-slot", "0"], {}, True, "ok"),
    (["-ts", "3,1"], {}, True, "ok"),  # (--rpc connects while parsing: tests/test_rpc_placement.py)
    ([], {"LLAMA_ARG_NO_KV_OFFLOAD": "1"}, True, "ok"),
    ([], {"LLAMA_ARG_KV_UNIFIED": "yes"}, False, "unknown value 'yes'"),
    ([], {"LLAMA_ARG_SWA_FULL": "yes"}, True, "ok"),  # not truthy: ignored, as the server ignores it
]


def server_accepts(server, args: list[str], env: dict[str, str]) -> tuple[bool, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    proc = subprocess.run([str(server), *args, "--version"], capture_output=True, text=True, timeout=30,
                          env={**clean, **env}, stdin=subprocess.DEVNULL)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip().splitlines()[:1]


@pytest.mark.parametrize("args, env, accepted, kvbook", ROWS, ids=[" ".join(r[0]) or str(r[1]) for r in ROWS])
def test_kvbook_reads_the_line_as_the_server_does(llama_server, args, env, accepted, kvbook) -> None:
    ok, first = server_accepts(llama_server, args, env)
    assert ok is accepted, f"llama-server {'accepted' if ok else 'refused'} {args} {env}: {first}"
    if kvbook == "ok":
        parse_server_args(["-m", "x.gguf", *args], env)
    else:
        with pytest.raises(BadInput, match=None) as e:
            parse_server_args(["-m", "x.gguf", *args], env)
        assert kvbook in str(e.value), str(e.value)


def test_the_command_line_wins_over_the_environment() -> None:
    env = {"LLAMA_ARG_CTX_SIZE": "16384", "LLAMA_ARG_N_PARALLEL": "2", "LLAMA_ARG_KV_UNIFIED": "true"}
    flags = parse_server_args(["-m", "x.gguf", "-c", "8192"], env)
    assert (flags.ctx, flags.parallel, flags.kv_unified) == (8192, 2, True)
    assert parse_server_args(["-m", "x.gguf"], {"LLAMA_ARG_KV_UNIFIED": "0"}).kv_unified is False
    assert parse_server_args(["-m", "x.gguf"]).ctx == 0  # no environment unless one is given
    assert parse_server_args(["-m", "x.gguf"], {"LLAMA_ARG_NO_KV_OFFLOAD": "1"}).no_kv_offload is True
    assert parse_server_args(["-m", "x.gguf"], {"LLAMA_ARG_SWA_FULL": "yes"}).swa_full is False
    assert parse_server_args(["-m", "x.gguf"], {"LLAMA_ARG_SWA_FULL": "true"}).swa_full is True
