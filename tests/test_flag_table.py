"""The flag table (kvbook.plan.flags.FLAG_TABLE) is the one declaration of each modelled llama-server option:
every ServerFlags field an option sets has a row, every row names a real option of the pinned build, every
rendered field survives parse(render(flags)), and docs/flags.md is the table as generated."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvbook.interface import FlashAttn, ServerFlags
from kvbook.plan import flags as F

ROOT = Path(__file__).resolve().parent.parent
BOOKKEEPING = {"argv", "ignored", "from_env", "read"}


def _path(r: random.Random) -> str:
    return f"/models/m{r.randrange(1000)}.gguf"


def _ngl(r: random.Random) -> str:
    return r.choice(["auto", "all", str(r.randrange(0, 200))])


# each rendered field's value domain, as its parser accepts it (a field added to the table without one fails below)
DOMAINS: dict[str, Callable[[random.Random], Any]] = {
    "model": _path,
    "ctx": lambda r: r.choice([0, 1, 4096, r.randrange(0, 2**31 - 1)]),
    "parallel": lambda r: r.choice([-1, 1, r.randrange(1, 64)]),
    "type_k": lambda r: r.choice(F.CACHE_TYPES), "type_v": lambda r: r.choice(F.CACHE_TYPES),
    "batch": lambda r: r.randrange(1, 65536), "ubatch": lambda r: r.randrange(1, 8192),
    "cache_ram_mib": lambda r: r.randrange(-1, 100000), "ctx_checkpoints": lambda r: r.randrange(0, 100),
    "gpu_layers": _ngl, "flash_attn": lambda r: r.choice(list(FlashAttn)),
    "kv_unified": lambda r: r.choice([None, True, False]),
    "swa_full": lambda r: r.random() < 0.5, "no_kv_offload": lambda r: r.random() < 0.5,
    "fit": lambda r: r.random() < 0.5,
    "rpc": lambda r: tuple(f"10.0.0.{i}:{r.randrange(1, 65536)}" for i in range(r.randrange(1, 4))),
    "tensor_split": lambda r: tuple(r.randrange(0, 32) / 4 for _ in range(r.randrange(1, 4))),
    "cpu_moe_layers": lambda r: r.choice([-1, 0, r.randrange(1, 100)]),
    "tensor_overrides": lambda r: tuple((p, b) for p, b in r.sample(
        [("exps", "CPU"), (r"blk\.1[0-9]\.ffn_.*", "CUDA0"), ("attn_q", "CUDA1"), ("ffn_up", "Metal0")], r.randrange(1, 4))),
    "repack": lambda r: r.random() < 0.5, "spec_draft_backend_sampling": lambda r: r.random() < 0.5,
    "no_host": lambda r: r.random() < 0.5,
    "devices": lambda r: r.choice([("none",), ("CUDA0",), ("CUDA1", "CUDA0"), ("Vulkan0",)]),
    "split_mode": lambda r: r.choice(["none", "layer", "row", "tensor"]),
    "main_gpu": lambda r: r.randrange(-3, 8),
    "mmproj": _path, "mmproj_offload": lambda r: r.random() < 0.5,
    "fit_target_mib": lambda r: tuple(r.randrange(0, 8192) for _ in range(r.randrange(1, 4))),
    "fit_ctx": lambda r: r.randrange(0, 1 << 20),
    "slot_ctx_cap": lambda r: r.randrange(0, 1 << 17),
    "host": lambda r: r.choice(["0.0.0.0", "127.0.0.1", "::1", "gpu-box"]),
    "port": lambda r: r.randrange(0, 65536),
    "lora": lambda r: tuple(f"/a/l{i}.gguf" for i in range(r.randrange(1, 3))),
    "draft_model": _path, "draft_hf_repo": lambda r: "ggml-org/d-GGUF:Q8_0",
    "draft_type_k": lambda r: r.choice(F.CACHE_TYPES), "draft_type_v": lambda r: r.choice(F.CACHE_TYPES),
    "draft_gpu_layers": _ngl,
    "spec_types": lambda r: r.choice([("draft-mtp",), ("draft-simple",), ("draft-simple", "draft-mtp"),
                                      ("ngram-mod",), ("ngram-map-k", "ngram-cache"), ("ngram-simple", "draft-mtp")]),
    "spec_draft_n_max": lambda r: r.randrange(0, 17),
    "ngram_mod_n_max": lambda r: r.randrange(0, 1025), "ngram_simple_size_m": lambda r: r.randrange(1, 1025),
    "ngram_map_k_size_m": lambda r: r.randrange(1, 1025), "ngram_map_k4v_size_m": lambda r: r.randrange(1, 1025),
    "models_preset": _path, "models_dir": lambda r: "/a/models", "models_max": lambda r: r.randrange(0, 9),
    "lookup_caches": lambda r: tuple((r.choice(["-lcs", "-lcd"]), f"/a/c{i}.bin") for i in range(r.randrange(1, 3))),
    "offline": lambda r: r.random() < 0.5, "no_mmproj": lambda r: r.random() < 0.5,
}


def _model_source(r: random.Random) -> dict[str, Any]:
    """The model comes from -m, -mu with -m, or -hf [-hff]: the combinations llama-server accepts."""
    kind = r.choice(["m", "mu", "hf", "hff"])
    if kind == "mu":
        return {"model": _path(r), "model_url": "https://example.org/m.gguf"}
    if kind.startswith("hf"):
        return {"model": "", "hf_repo": "ggml-org/x-GGUF:Q4_K_M", "hf_file": "x.gguf" if kind == "hff" else ""}
    return {"model": _path(r)}


def _flag_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ServerFlags)} - F.NOT_FLAGS


def test_every_field_an_option_sets_has_a_row_and_every_row_a_real_option() -> None:
    options = {entry["names"][0]: entry for entry in F._options()}
    assert {row.field for row in F.FLAG_TABLE} == _flag_fields()
    assert len(F.ROWS) == len(F.FLAG_TABLE), "one row per option"
    for row in F.FLAG_TABLE:
        assert row.canonical in options, row.canonical
        assert bool(row.parse) or row.switch or row.canonical == "-ot", row.canonical
        assert not (row.switch and options[row.canonical]["takes_value"]), row.canonical
        for spelling in (row.render, *row.switch):
            assert not spelling or spelling in F._spellings(), spelling
        assert F._spellings().get(row.render, (row.canonical,))[0] in F.ROWS
    rendered = set(F._renderers())
    assert rendered | set(F.UNRENDERED) == _flag_fields()
    assert rendered == set(DOMAINS), "a rendered field needs a value domain here"


@pytest.mark.parametrize("seed", range(300))
def test_parse_of_render_gives_the_flags_back(seed: int) -> None:
    r = random.Random(seed)
    values: dict[str, Any] = _model_source(r)
    fields = [f for f in DOMAINS if f != "model"]
    for field in r.sample(fields, r.randrange(1, len(fields) + 1)) if seed else fields:
        values[field] = DOMAINS[field](r)
    flags = ServerFlags(**values)
    argv = F.render_args(flags)
    back = F.parse_server_args(argv)
    assert dataclasses.replace(back, argv=(), ignored=(), read=()) == flags, argv
    assert F.render_args(back) == argv


def test_every_field_round_trips_alone() -> None:
    """Each rendered field on its own, at a value other than the default: a row that renders nothing fails."""
    r = random.Random(7)
    for field, domain in DOMAINS.items():
        if field == "model":
            continue
        value = next(v for v in (domain(r) for _ in range(100)) if v != getattr(F._DEFAULTS, field))
        flags = ServerFlags(model="/m.gguf", **{field: value})
        argv = F.render_args(flags)
        assert argv != ["-m", "/m.gguf"], field
        assert dataclasses.replace(F.parse_server_args(argv), argv=(), read=()) == flags, (field, argv)


def test_replace_edits_every_spelling_of_a_field() -> None:
    """replace() drops each option that sets the field (-ncmoe and --cpu-moe alike) before writing the new value."""
    flags = F.parse_server_args(["-m", "/m.gguf", "-ncmoe", "20", "--port", "9000", "--jinja"])
    lower = F.replace(flags, cpu_moe_layers=4, port=9001)
    assert lower.argv == ("-m", "/m.gguf", "--jinja", "--n-cpu-moe", "4", "--port", "9001")
    assert F.parse_server_args(lower.argv).cpu_moe_layers == 4


def test_the_docs_table_is_generated_from_the_flag_table() -> None:
    assert (ROOT / "docs" / "flags.md").read_text() == F.flags_markdown(), "run .venv/bin/python tools/gen_flags_doc.py"
