"""Plotly output that survives export: JupyterLab gets the mimetype, HTML reports get plotly.js embedded."""

from __future__ import annotations

_DONE = False


def setup_plotly() -> None:
    """Set plotly's default renderer once (plotly >= 6.1 otherwise emits only a mimetype nbconvert drops)."""
    global _DONE
    if _DONE:
        return
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"
    _DONE = True
