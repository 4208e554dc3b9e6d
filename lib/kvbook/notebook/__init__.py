"""The notebooks' side: headless runs, the run index, HTML, figures, widgets and per-notebook support."""
