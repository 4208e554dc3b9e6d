"""outputs/index.html: one self-contained page listing every run with verdict, pass rate, date and link."""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput
from kvbook.notebook.html import html_table
from kvbook.records.store import CheckRecord, read_records

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table.kvbook{border-collapse:collapse;margin:1em 0}
table.kvbook td,table.kvbook th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}
table.kvbook th{background:#f3f3f3}
.ok{color:#1a7f37}.bad{color:#c62828}
"""


def _date(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _summaries(outputs: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, content) of every outputs/<run>/summary.json; an unreadable one reads as an error."""
    out = []
    for summary_path in sorted(outputs.glob("*/summary.json")):
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            summary = {"error": "summary.json unreadable"}
        out.append((summary_path, summary))
    return out


def collect_trends(outputs: Path) -> list[dict[str, Any]]:
    """One trend point per run that measured speed, pass rates or goodput (kvbook.notebook.trends)."""
    from kvbook.notebook.trends import trend_point

    points = (trend_point(summary, path.parent.name, _date(path)) for path, summary in _summaries(outputs))
    return [p for p in points if p]


def collect_runs(outputs: Path) -> list[dict[str, Any]]:
    """One row per outputs/<run>/summary.json, newest first."""
    rows = []
    for summary_path, summary in _summaries(outputs):
        run_dir = summary_path.parent
        report = summary.get("report")
        total = summary.get("required_total")
        rows.append({
            "run": run_dir.name,
            "date": _date(summary_path),
            "notebook": summary.get("notebook", ""),
            "model": summary.get("model", ""),
            "verdict": summary.get("verdict", ""),
            "checks passed": f"{summary.get('required_passed')}/{total}" if total else "",
            "status": "ok" if summary.get("ok", True) and not summary.get("error") else f"failed: {summary.get('error')}",
            "report": f"{run_dir.name}/{report}" if report and (run_dir / report).exists() else "",
        })
    rows.sort(key=lambda r: r["run"], reverse=True)
    return rows


def build_index(outputs: Path) -> Path:
    """Write outputs/index.html over every run folder in `outputs` (which must exist)."""
    if not outputs.is_dir():
        what = "is a file, not a folder" if outputs.exists() else "does not exist"
        raise BadInput(f"outputs folder {outputs} {what}; run a notebook first (`kvbook run ...`) "
                       f"or point KVBOOK_OUTPUTS at the folder that holds the runs")
    rows = collect_runs(outputs)
    table = html_table(rows, caption="kvbook runs")
    # turn the report column into links (paths are our own folder names, escaped by html_table)
    for r in rows:
        if r["report"]:
            esc = html.escape(r["report"])
            table = table.replace(f"<td>{esc}</td>", f'<td><a href="{esc}">open report</a></td>', 1)
    records, bad = read_records(outputs / "results.jsonl")
    checks = [c for c in map(CheckRecord.from_json, records) if c is not None]
    passed = sum(c.passed for c in checks)
    notes = f"<p>results.jsonl: {len(records)} records, {passed}/{len(checks)} checks passed.</p>"
    if bad:
        items = "".join(f"<li>line {b.line_no}: {html.escape(b.reason)}</li>" for b in bad)
        notes += f"<p class='bad'>{len(bad)} unreadable line(s) in results.jsonl were skipped:</p><ul>{items}</ul>"
    points = collect_trends(outputs)
    if points:
        from kvbook.notebook.trends import trends_figure

        notes += trends_figure(points).to_html(full_html=False, include_plotlyjs=True)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>kvbook runs</title><style>{STYLE}</style></head>"
            f"<body><h1>kvbook runs</h1><p>{len(rows)} runs under {html.escape(str(outputs))}. "
            f"Generated {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.</p>{notes}{table}</body></html>")
    out = outputs / "index.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
