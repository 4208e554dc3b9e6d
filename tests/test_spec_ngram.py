"""n-gram speculative decoding (`--spec-type ngram-*`, `--spec-default`): the target's reserved outputs for the
drafted tokens, the compute buffer they grow, and the host tables (memory/speculative.py). Checked against the
real pinned llama-server on SmolLM2 at -lv 4: two starts, one without speculation (the baseline for host RAM), one
with ngram-mod and ngram-map-k4v over 2 slots. The logged n_outputs_max and every exact buffer equal the plan; the
table ngram-mod logs ("mod size=") equals the plan's; the process's anonymous RSS grows by the planned tables plus
at most RSS_SLACK (an interval: other host allocations move too)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.interface import MemoryPlan, ModelArch
from kvbook.memory.rules import plan_memory
from kvbook.model.arch import arch_from_metadata
from kvbook.memory.speculative import NGRAM_MAP_SLOT_BYTES, NGRAM_MOD_BYTES
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.plan.flags import parse_server_args
from kvbook.testing.synthetic import tiny_metadata

MiB = 2**20
RSS_SLACK = 2.5 * MiB  # measured: +1.35 MiB over the tables, and +1.0 MiB for modes without tables
BASE = ["-c", "4096", "-np", "2", "-t", "1", "--no-warmup"]


def _tiny() -> ModelArch:
    return arch_from_metadata(tiny_metadata("llama", vocab_size=1000), name="tiny", source="test", weights_bytes=0,
                              weights_exact=True, weights_note="")


def _anon_rss(pid: int) -> int:
    """The process's resident anonymous memory (heap, not the mapped model file)."""
    kib = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert kib, "no RssAnon in /proc (Linux only)"
    return int(kib.group(1)) * 1024


@pytest.fixture(scope="module")
def runs(smollm2, tmp_path_factory) -> dict[str, tuple[MemoryPlan, object, str, int]]:
    """(plan memory, logged memory, log, anonymous RSS) without and with n-gram speculation."""
    out = {}
    for name, extra in (("none", []), ("ngram", ["--spec-type", "ngram-mod,ngram-map-k4v"])):
        with start_llama_server(["-m", str(smollm2), *BASE, *extra],
                                run_dir=tmp_path_factory.mktemp(name)) as server:
            rss = _anon_rss(server.process.pid)
            assert server.plan is not None
            out[name] = (server.plan.memory, server.measured(), server.log_path.read_text(errors="replace"), rss)
    return out


def test_every_exact_figure_the_server_logs_equals_the_plan(runs) -> None:
    for name in runs:
        memory, logged, log, _ = runs[name]
        rows = compare_memory(memory, logged)
        assert rows and not [r for r in rows if r.matches is False], (name, rows)
        assert f"n_outputs_max         = {memory.shape.n_outputs_max}" in log
    memory = runs["ngram"][0]
    assert memory.shape.n_outputs_max == 2 * (1 + 64)  # ngram-mod drafts up to 64 tokens per slot
    assert f"mod size={NGRAM_MOD_BYTES // 4} " in runs["ngram"][2]  # 4 Mi int32 entries


def test_the_drafted_outputs_grow_the_compute_buffer_as_planned(runs) -> None:
    """The reserved logits rows dominate the CPU compute buffer: 16.6 -> 32.0 MiB logged; the estimate within its
    calibrated error."""
    for name in runs:
        memory, logged, _, _ = runs[name]
        measured = logged.compute_mib["CPU"] * MiB
        assert abs(memory.compute.bytes - measured) <= memory.compute.error_pct / 100 * measured, name
    assert runs["ngram"][1].compute_mib["CPU"] > 1.8 * runs["none"][1].compute_mib["CPU"]


def test_the_host_tables_are_in_host_ram(runs) -> None:
    memory = runs["ngram"][0]
    assert memory.host_extras.ngram_bytes == NGRAM_MOD_BYTES + 2 * NGRAM_MAP_SLOT_BYTES  # 16 MiB + 1 MiB per slot
    grew = runs["ngram"][3] - runs["none"][3]
    assert memory.host_extras.ngram_bytes <= grew <= memory.host_extras.ngram_bytes + RSS_SLACK, grew / MiB


def test_spec_default_is_ngram_mod_in_the_plan(capsys, smollm2) -> None:
    assert cli.main(["plan", "--json", "--", "llama-server", "-m", str(smollm2), "-c", "4096", "-np", "2",
                     "--spec-default"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["host_growth"]["ngram_bytes"] == NGRAM_MOD_BYTES
    assert any(f["flag"] == "--spec-default" for f in doc["flags_read"])


@pytest.mark.parametrize("args, n_out, table", [
    (["--spec-type", "ngram-simple"], 2 * 49, 0),
    (["--spec-type", "ngram-simple", "--spec-ngram-simple-size-m", "600"], 2 * 601, 0),
    (["--spec-type", "ngram-simple", "--spec-ngram-simple-size-m", "600", "-b", "1000"], 1000, 0),  # capped by -b
    (["--spec-type", "ngram-map-k", "-np", "4"], 4 * 49, 4 * NGRAM_MAP_SLOT_BYTES),
    (["--spec-type", "ngram-cache"], 2 * 9, 0),
    (["--spec-type", "ngram-mod", "--spec-ngram-mod-n-max", "0"], 2, NGRAM_MOD_BYTES),
])
def test_each_mode_reserves_its_drafted_outputs(args, n_out, table) -> None:
    memory = plan_memory(_tiny(), parse_server_args(["-m", "x", "-c", "4096", "-np", "2", *args]))
    assert (memory.shape.n_outputs_max, memory.host_extras.ngram_bytes) == (n_out, table)


@pytest.mark.parametrize("argv, message", [
    (["--spec-type", "ngram-cache", "-lcs", "c.bin"], "-lcs/-lcd with --spec-type ngram-cache"),
    (["--draft", "4"], "removed from llama-server"),
    (["--spec-ngram-mod-n-max", "1025"], "between 0 and 1024"),
])
def test_what_stays_refused_is_one_line(argv, message) -> None:
    with pytest.raises(BadInput, match=message):
        plan_memory(_tiny(), parse_server_args(["-m", "x", *argv]))


def test_a_recurrent_target_keeps_one_speculative_checkpoint_per_slot(capsys, tmp_path) -> None:
    """A hybrid model cannot drop rejected draft tokens from its recurrent state: the server says it "will use
    checkpoints" (a real start) and each slot keeps one, the size of a context checkpoint (the same state flags:
    LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY; for this model the server logged a 1.570 MiB context checkpoint, planned
    1.5703 MiB; a synthetic model cannot generate text, so the speculative one is not logged here). MTP's rollback
    rows cover its draft: no checkpoint."""
    from kvbook.testing.synthetic import TINY_HYBRID, write_synthetic_gguf

    path = write_synthetic_gguf(tiny_metadata("qwen35", **TINY_HYBRID), tmp_path / "hybrid.gguf")
    with start_llama_server(["-m", str(path), "-c", "2048", "-np", "2", "-t", "1", "--no-warmup", "--spec-type",
                             "ngram-simple"], run_dir=tmp_path) as server:
        log = server.log_path.read_text(errors="replace")
        extras = server.plan.memory.host_extras if server.plan else None
    assert "speculative decoding will use checkpoints" in log and extras is not None
    assert extras.spec_checkpoint_bytes == 2 * extras.checkpoint_each_bytes > 0
    alone = plan_memory(_tiny(), parse_server_args(["-m", "x", "--spec-type", "ngram-mod"])).host_extras
    assert alone.spec_checkpoint_bytes == 0  # attention only: the server drops the rejected tokens
