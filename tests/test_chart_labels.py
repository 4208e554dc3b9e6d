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
  const root = document.querySelector('.js-plotly-plot').getBoundingClientRect();
  const boxes = [...document.querySelectorAll('.annotation-text, .gtitle, .xtick text, .ytick text, .textpoint text, .legendtext')]
    .map(e => { const r = e.getBoundingClientRect();
                return {cls: e.getAttribute('class') || e.parentNode.getAttribute('class'), text: e.textContent,
                        x0: r.left, x1: r.right, y0: r.top, y1: r.bottom}; })
    .filter(b => b.x1 > b.x0 && b.y1 > b.y0);
  return {root: {x0: root.left, x1: root.right, y0: root.top, y1: root.bottom}, boxes};
}"""


def _overlaps(a: dict, b: dict) -> bool:
    return a["x0"] < b["x1"] - 1 and b["x0"] < a["x1"] - 1 and a["y0"] < b["y1"] - 1 and b["y0"] < a["y1"] - 1


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


def _render(page, fig, tmp_path: Path, name: str) -> dict:
    path = tmp_path / f"{name}.html"
    fig.update_layout(width=900)
    fig.write_html(str(path), include_plotlyjs=True, include_mathjax=False, full_html=True)
    page.goto(path.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg")
    page.screenshot(path=str(tmp_path / f"{name}.png"))  # kept beside the page for a failing run
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


def test_largest_context_labels_do_not_collide(page, tmp_path):
    """The regression: on a 24 GB GPU every cache type's 'largest -c' label sat on the budget line, overlapping."""
    s = sizing.resolve(dict(model="qwen3.6-35b-a3b", device="rtx-4090", context=65536))
    usable = [sizing.type_usable(s.arch, t, s.flash) for t in s.sweep.cache_types]
    fig = figures.context_figure(s.sweep, s.budget_bytes, usable=usable, current=(65536, s.plan.memory.start_bytes),
                                 title=f"{s.arch.name} on {s.device.name}")
    drawn = _render(page, fig, tmp_path, "curves")
    labels = [b for b in drawn["boxes"] if b["cls"] and "annotation" in b["cls"] and ": " in b["text"]]
    assert len(labels) >= 4, "one label per usable cache type that fits"
    _check(drawn, ("annotation", "gtitle"))


def test_per_device_bars_are_readable(page, tmp_path):
    """One bar per device with its budget mark, verdict and largest -c: the texts stay apart and inside."""
    s = sizing.resolve(dict(model="gpt-oss-120b", device="rtx-4090-host-64", context=65536, slots=1,
                            n_gpu_layers="99", n_cpu_moe=26))
    plan = api.plan(s.request, search=False)
    largest = sizing.largest_context_per_pool(s.request)
    fig = placement_view.device_figure(placement_view.device_rows(plan), figures.plan_title(s.plan), largest=largest)
    drawn = _render(page, fig, tmp_path, "devices")
    texts = [b["text"] for b in drawn["boxes"]]
    assert any("largest -c" in t for t in texts) and "CUDA0" in texts and "CPU" in texts
    _check(drawn, ("textpoint", "gtitle", "xtick", "legendtext"))
