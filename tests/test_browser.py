"""The sizing panel in a real browser: JupyterLab (started as `make lab` starts it) in headless Debian Chromium runs
a copy of the sizing notebook once per module; a key press on the context slider changes the live chart, and every
control of the one panel, moved the way a user moves it, is followed by the per-device bars and the command line.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the playwright Python package; never
`playwright install`. Missing pieces fail the test with the fix, they never skip it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from kvbook.testing.lab import CHROMIUM, CHROMIUM_ARGS, KERNEL_EXEC, open_notebook, sizing_lab

# Widget plots only (the static report figures above never change): the breakdown's traces as JSON.
READ_WIDGET_CHART = """() => {
  const plots = [...document.querySelectorAll('.widget-vbox .js-plotly-plot')].filter(p => !p.closest('.kvbook-placement'));
  return JSON.stringify(plots.map(p => (p.data || []).map(t => [t.name, Array.from(t.x || []), Array.from(t.y || [])])));
}"""
# What the panel shows: its command line and its per-device bars (each trace's device names and GiB).
READ_PANEL = """() => {
  const cmd = document.querySelector('.kvbook-sizing .kvbook-command');
  const plot = document.querySelector('.kvbook-sizing .js-plotly-plot');
  return {cmd: cmd ? cmd.innerText.trim() : '',
          bars: plot ? (plot.data || []).map(t => [Array.from(t.x || []), Array.from(t.y || [])]) : []};
}"""
# True once the page shows `want` (the kernel's plan): the same command line, the same bars to 1e-9 GiB.
SHOWS = f"""(want) => {{
  const got = ({READ_PANEL})();
  if (got.cmd !== want.cmd || got.bars.length !== want.bars.length) return false;
  return got.bars.every((t, i) => JSON.stringify(t[0]) === JSON.stringify(want.bars[i][0])
    && t[1].length === want.bars[i][1].length && t[1].every((y, j) => Math.abs(y - want.bars[i][1][j]) < 1e-9));
}}"""
# The kernel's side: the plan the panel holds now, as the page should show it (per trace: device names, GiB).
KERNEL_PLAN = """import json as _json
from kvbook.notebook import placement_view as _pv
from kvbook.notebook.widgets import command_text as _command_text
_rows = _pv.device_rows(ui.plan)
print(_json.dumps({"error": ui.error, "cmd": _command_text(ui.plan), "bars": [
    [[r["name"] for r in _rows], [r[k] / 2**30 for r in _rows]] for k in (
        "weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes", "host_extras_bytes",
        "budget_bytes")]}))
del _json, _pv, _command_text, _rows
"""


@pytest.fixture(scope="module")
def lab_page(tmp_path_factory):
    """One JupyterLab over a copy of the sizing notebook (two GPUs, so -ngl, -ts and --n-cpu-moe move bars), one
    Chromium page with every cell run and the panel drawn; a failing test gets a screenshot and the lab log."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install -y chromium` "
                    "(never `playwright install`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install playwright (browsers are not needed)")
    work = tmp_path_factory.mktemp("sizing-lab")
    with sizing_lab(work, "\ndevice = '2x-rtx-3090'") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            open_notebook(page, f"{base}/lab/tree/01-sizing.ipynb")  # the kernel idle, then run every cell
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.locator(".kvbook-sizing .kvbook-command").wait_for(state="attached", timeout=120_000)
            page.wait_for_function(f"() => JSON.parse(({READ_WIDGET_CHART})()).length >= 2", timeout=60_000)
            page.locator(".kvbook-sizing .kvbook-command").scroll_into_view_if_needed()
            page.wait_for_function(f"() => ({READ_PANEL})().bars.length > 0", timeout=60_000)
            yield page, work / "lab.log"
        finally:
            browser.close()


def _explain(page, log, exc: Exception, step: str = "") -> AssertionError:
    shot = log.parent / "failure.png"
    try:
        page.screenshot(path=str(shot), full_page=True)
    except Exception:  # keep the original error
        pass
    return AssertionError(f"{step}{type(exc).__name__}: {exc}\npanel: {page.evaluate(READ_PANEL)}\nscreenshot: {shot}\nlab log tail:\n{log.read_text()[-2000:]}")


@pytest.mark.slow
def test_slider_keypress_updates_chart_in_jupyterlab(lab_page):
    page, log = lab_page
    try:
        slider = page.locator(".widget-hslider", has_text="context (-c)").locator(".noUi-handle").first
        slider.wait_for(state="visible", timeout=120_000)
        before = page.evaluate(READ_WIDGET_CHART)
        slider.scroll_into_view_if_needed()
        slider.focus()
        t0 = time.perf_counter()
        for _ in range(4):
            page.keyboard.press("ArrowLeft")
        page.wait_for_function(f"(before) => ({READ_WIDGET_CHART})() !== before", arg=before, timeout=20_000)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        after = page.evaluate(READ_WIDGET_CHART)
        print(f"slider key press to changed chart: {elapsed_ms:.0f} ms")
        if os.environ.get("KVBOOK_BROWSER_SCREENSHOT"):  # a picture of the live UI, for review
            page.screenshot(path=os.environ["KVBOOK_BROWSER_SCREENSHOT"], full_page=True)
    except Exception as exc:
        raise _explain(page, log, exc) from exc
    assert after != before
    # The breakdown's KV bar got shorter: four steps left on the log slider is a smaller context.
    assert _kv_height(after) < _kv_height(before)


@pytest.mark.slow
def test_every_control_moves_the_bars_and_the_command_line(lab_page):
    """Each control of the panel, changed in the page; then the page must show what the kernel planned for it: its
    flag in the command line (or, for the device and the budget, which are no flags, new bars) and per-device bars
    equal to the plan's. A control whose change did not reach the plan, or a plan that did not reach the page,
    fails here."""
    from kvbook.ops.components import model_path

    page, log = lab_page
    panel = page.locator(".kvbook-sizing")
    smollm2 = str(model_path("smollm2-135m"))
    moved: list[str] = []
    step = [""]

    def shown() -> dict:
        return page.evaluate(READ_PANEL)

    def settled() -> dict:
        """The kernel's plan once the page shows it (a change still on its way moves both: asked again)."""
        deadline = time.monotonic() + 20
        while True:
            want = json.loads(page.evaluate(KERNEL_EXEC, KERNEL_PLAN))
            try:
                page.wait_for_function(SHOWS, arg=want, timeout=3_000)
                return want
            except Exception:
                if time.monotonic() > deadline:
                    raise

    def follow(name: str, act: Callable[[], None], flag: str | None, bars_change: bool = False) -> None:
        """Do `act`; wait until the command line holds `flag` (None: until it changes or, with bars_change, until
        the bars change), then until the page shows exactly the kernel's plan."""
        step[0] = f"at {name!r}: "
        before = shown()
        act()
        if flag is not None:
            page.wait_for_function(f"(f) => ({READ_PANEL})().cmd.includes(f)", arg=flag, timeout=15_000)
        if bars_change:
            page.wait_for_function(f"(b) => JSON.stringify(({READ_PANEL})().bars) !== b",
                                   arg=json.dumps(before["bars"]), timeout=15_000)
        elif flag is None:
            page.wait_for_function(f"(c) => ({READ_PANEL})().cmd !== c", arg=before["cmd"], timeout=15_000)
        want = settled()  # the page showed exactly this plan
        step[0] += f"the kernel's plan {want}: "
        assert want["error"] is None, f"{name}: the panel refused the change: {want['error']}"
        assert flag is None or flag in want["cmd"], (name, want["cmd"])
        if bars_change:
            assert want["bars"] != before["bars"], f"{name}: the bars did not move"
        moved.append(name)

    def pick(label: str, option: str) -> Callable[[], None]:
        return lambda: panel.get_by_label(label, exact=True).select_option(label=option)

    def typed(box, text: str) -> Callable[[], None]:
        def act() -> None:
            box.fill(text)
            box.press("Enter")
        return act

    def toggle(text: str) -> Callable[[], None]:
        return lambda: panel.locator(".widget-toggle-buttons").get_by_role("button", name=text, exact=True).click()

    def arrow() -> None:
        handle = panel.locator(".widget-hslider", has_text="context (-c)").locator(".noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowLeft")

    def paste_line() -> None:
        box = panel.get_by_label("command line", exact=True)
        box.fill("llama-server -m qwen3-30b-a3b -c 32768 -np 1 -ngl 30 -ctk q8_0 -ctv q8_0 -fa on")
        box.blur()

    t0 = time.perf_counter()
    try:
        step[0] = "before the first change: "
        settled()  # what an earlier test moved has landed
        follow("context slider", arrow, None, bars_change=True)
        follow("exact -c", typed(panel.get_by_label("exact -c", exact=True), "100000"), "-c 100000", True)
        follow("flash attention off", toggle("off"), "-fa off")
        follow("flash attention on", toggle("on"), "-fa on")
        follow("K cache", pick("K cache (-ctk)", "q8_0"), "-ctk q8_0", True)
        follow("V cache", pick("V cache (-ctv)", "q8_0"), "-ctv q8_0", True)
        follow("slots", pick("slots (-np)", "2"), "-np 2", True)
        follow("unified KV", lambda: panel.get_by_label("unified KV (-kvu)", exact=True).check(), "-kvu", True)
        follow("ubatch", pick("ubatch (-ub)", "1024"), "-ub 1024", True)
        follow("batch", pick("batch (-b)", "4096"), "-b 4096")  # -b sizes nothing the bars show
        follow("-ngl", pick("-ngl", "20"), "-ngl 20", True)
        follow("--n-cpu-moe", typed(panel.get_by_label("--n-cpu-moe (-1: all)", exact=True), "10"), "--n-cpu-moe 10",
               True)
        follow("-ts", typed(panel.get_by_label("-ts", exact=True), "3,1"), "-ts 3,1", True)
        ot = panel.locator("select", has=page.locator("option", has_text="-ot: MoE experts on the CPU"))
        follow("-ot preset", lambda: ot.select_option(label="-ot: MoE experts on the CPU"), "_exps", True)
        follow("--swa-full", lambda: panel.get_by_label("--swa-full", exact=True).check(), "--swa-full")
        follow("-ts cleared", typed(panel.get_by_label("-ts", exact=True), ""), None)  # one GPU takes no -ts 3,1
        follow("device", pick("device", "rtx-4090"), None, bars_change=True)
        follow("custom device", pick("device", "custom"), None, bars_change=True)
        follow("custom budget", typed(panel.get_by_label("custom budget (GiB)", exact=True), "20"), None, True)
        follow("model", pick("model", "gemma-3-27b"), "-m gemma-3-27b", True)
        follow("model file", typed(panel.get_by_placeholder("or a GGUF path / URL / config.json"), smollm2), smollm2,
               True)
        follow("command line", paste_line, "-m qwen3-30b-a3b", True)
    except Exception as exc:
        raise _explain(page, log, exc, step[0]) from exc
    print(f"{len(moved)} control changes followed in {time.perf_counter() - t0:.1f} s")
    assert "-c 32768" in shown()["cmd"]  # the pasted line's context became the panel's


def _kv_height(blob: str) -> float:
    return next(t[2][0] for fig in json.loads(blob) for t in fig if t[0] == "KV cache")
