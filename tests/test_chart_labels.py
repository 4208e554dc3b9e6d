"""Readable charts, checked in a real browser (headless Debian Chromium): the sizing figures are rendered
offline with plotly.js, and the bounding boxes of their text are measured: labels must not overlap, nothing is cut
off at the figure's edge, and no "None" is drawn. No server, no kernel: one page per figure.

Needs /usr/bin/chromium and the playwright Python package (never `playwright install`); missing pieces fail the
test with the fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbook.notebook import figures, placement_view, sizing
from kvbook.plan import api

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# every drawn text element of the plot: its string and box (client pixels), and the figure's own box
READ_TEXT = """() => {
  const root = document.querySelector('.js-plotly-plot .main-svg').getBoundingClientRect();  // the drawn figure
  const boxes = [...document.querySelectorAll('.annotation-text, .gtitle, .xtick text, .ytick text, .textpoint text, .legendtext')]
    .map(e => { const r = e.getBoundingClientRect();
                return {cls: e.getAttribute('class') || e.parentNode.getAttribute('class'), text: e.textContent,
                        x0: r.left, x1: r.right, y0: r.top, y1: r.bottom}; })
    .filter(b => b.x1 > b.x0 && b.y1 > b.y0);
  const area = document.querySelector('.js-plotly-plot .nsewdrag').getBoundingClientRect();  // the plot area
  return {root: {x0: root.left, x1: root.right, y0: root.top, y1: root.bottom},
          area: {x0: area.left, x1: area.right, y0: area.top, y1: area.bottom}, boxes};
}"""


def _overlaps(a: dict, b: dict) -> bool:
    return a["x0"] < b["x1"] - 1 and b["x0"] < a["x1"] - 1 and a["y0"] < b["y1"] - 1 and b["y0"] < a["y1"] - 1


@pytest.fixture(scope="module")
def pages_dir(tmp_path_factory) -> Path:
    """One folder for every page: plotly.js is written there once and each page loads it from the file."""
    return tmp_path_factory.mktemp("charts")


@pytest.fixture(scope="module")
def page():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (never `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 700})
        finally:
            browser.close()


def _render(page, fig, folder: Path, name: str, width: int = 900) -> dict:
    path = folder / f"{name}.html"
    fig.update_layout(width=width)
    fig.write_html(str(path), include_plotlyjs="directory", include_mathjax=False, full_html=True)
    page.goto(path.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg")
    page.screenshot(path=str(folder / f"{name}.png"))  # kept beside the page for a failing run
    return page.evaluate(READ_TEXT)


def _check(drawn: dict, kinds: tuple[str, ...]) -> None:
    boxes = [b for b in drawn["boxes"] if b["cls"] and any(k in b["cls"] for k in kinds)]
    assert boxes, f"nothing of {kinds} drawn"
    root = drawn["root"]
    for b in drawn["boxes"]:
        assert "None" not in b["text"], b
        assert root["x0"] - 1 <= b["x0"] and b["x1"] <= root["x1"] + 1 and root["y0"] - 1 <= b["y0"], f"cut off: {b}"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not _overlaps(a, b), f"labels collide: {a['text']!r} and {b['text']!r}"


def test_largest_context_labels_do_not_collide(page, pages_dir):
    """The regression: on a 24 GB GPU every cache type's 'largest -c' label sat on the budget line, overlapping."""
    s = sizing.resolve(dict(model="qwen3.6-35b-a3b", device="rtx-4090", context=65536))
    usable = [sizing.type_usable(s.arch, t, s.flash) for t in s.sweep.cache_types]
    fig = figures.context_figure(s.sweep, s.budget_bytes, usable=usable, current=(65536, s.plan.memory.start_bytes),
                                 title=f"{s.arch.name} on {s.device.name}")
    drawn = _render(page, fig, pages_dir, "curves")
    labels = [b for b in drawn["boxes"] if b["cls"] and "annotation" in b["cls"] and ": " in b["text"]]
    assert len(labels) >= 4, "one label per usable cache type that fits"
    _check(drawn, ("annotation", "gtitle"))


def test_labels_at_the_largest_context_stay_inside_a_half_width_panel(page, pages_dir):
    """Where every cache type fits up to the model's maximum (m1-max-64), the labels sit at the right edge: in the
    sizing panel's half width (about 450 px) centred labels were cut off there."""
    s = sizing.resolve(dict(model="qwen3.6-35b-a3b", device="m1-max-64", context=65536))
    usable = [sizing.type_usable(s.arch, t, s.flash) for t in s.sweep.cache_types]
    fig = figures.context_figure(s.sweep, s.budget_bytes, usable=usable, current=(65536, s.plan.memory.start_bytes),
                                 title="Memory at start against context (K = V cache type)")  # the panel's title
    drawn = _render(page, fig, pages_dir, "curves-edge", width=450)
    labels = [b for b in drawn["boxes"] if b["cls"] and "annotation" in b["cls"] and ": " in b["text"]]
    assert len(labels) >= 4, "one label per usable cache type that fits"
    _check(drawn, ("annotation", "legendtext"))  # nor over the legend
    area = drawn["area"]  # in the panel the figure has no room right of the plot: a label must stay within it
    assert all(area["x0"] - 1 <= b["x0"] and b["x1"] <= area["x1"] + 1 for b in labels), (area, labels)


def test_per_device_bars_are_readable(page, pages_dir):
    """One bar per device with its budget mark, verdict and largest -c: the texts stay apart and inside."""
    s = sizing.resolve(dict(model="gpt-oss-120b", device="rtx-4090-host-64", context=65536, slots=1,
                            n_gpu_layers="99", n_cpu_moe=26))
    plan = api.plan(s.request, search=False)
    largest = sizing.largest_context_per_pool(s.request)
    fig = placement_view.device_figure(placement_view.device_rows(plan), figures.plan_title(s.plan), largest=largest)
    drawn = _render(page, fig, pages_dir, "devices")
    texts = [b["text"] for b in drawn["boxes"]]
    assert any("largest -c" in t for t in texts) and "CUDA0" in texts and "CPU" in texts
    _check(drawn, ("textpoint", "gtitle", "xtick", "legendtext"))


def test_capacity_curves_count_whole_agents(page, pages_dir):
    """05's charts: concurrency ticks are the measured agent counts (never 1.5 agents); labels stay apart."""
    from kvbook.notebook import capacity_figures as cf

    levels = [{"concurrency": c, "ttft_p50_ms": 100.0 * c, "ttft_p95_ms": 150.0 * c,
               "ttft_p95_ci_ms": [120.0 * c, None if c == 8 else 200.0 * c], "e2e_p50_ms": 900.0 * c,
               "e2e_p95_ms": 1400.0 * c, "e2e_p95_ci_ms": None, "goodput_rps": 1.0 / c, "meets_slo": c < 4,
               "tokens_per_s": 20.0 * c} for c in (1, 2, 3, 4, 8)]
    for name, fig in (("latency", cf.latency_figure(levels, {"ttft_ms": 8000.0})),
                      ("goodput", cf.goodput_figure(levels, 3))):
        drawn = _render(page, fig, pages_dir, name)
        ticks = [b["text"] for b in drawn["boxes"] if b["cls"] and "xtick" in b["cls"]]
        assert ticks == ["1", "2", "3", "4", "8"], (name, ticks)
        _check(drawn, ("xtick", "gtitle", "annotation"))


def test_tables_show_no_none_and_scroll_instead_of_cutting_off():
    """html_table: an interval with an open end reads as one, never "None"; a wide table scrolls in its own box."""
    from kvbook.notebook.html import html_table

    out = html_table([{"p95 ms": 1400.5, "p95 95% interval ms": [1399.3, None], "agents": 2, "meets": True,
                       "note": None, "by cause": {"slot_evicted": 1}}])
    assert "None" not in out and "1399.3 to n/a (too few samples)" in out and "slot_evicted: 1" in out
    assert "overflow-x:auto" in out and "<td>yes</td>" in out and "<td>2</td>" in out
