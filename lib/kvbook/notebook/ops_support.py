"""What the ops notebooks call: run folders, model lookup, the session, display and summary.

Kept here rather than in cells so every step is importable and tested."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbook.notebook.html import HTML, html_table, latency_figure, pass_fail_figure
from kvbook.notebook.runner import new_run_id, write_summary
from kvbook.paths import outputs_dir
from kvbook.smoke.checks import SmokeConfig
from kvbook.smoke.session import SessionResult, proxy_overhead, results_table, run_session

__all__ = ["RunContext", "compare_runs", "finish_compare", "finish_smoke", "latency_figure", "pass_fail_figure", "proxy_overhead", "resolve_model", "show_verdict",
           "results_table", "run_smoke_session", "show_figure", "show_table", "start_run"]


@dataclass(frozen=True)
class RunContext:
    run_id: str
    output_dir: Path
    results_path: Path


def start_run(label: str, output_dir: str = "auto", results_path: str = "auto") -> RunContext:
    """The run's folder (given by `kvbook run`, else a new one under outputs/) and results file."""
    from kvbook.notebook import html as report_style
    report_style.setup_plotly()
    output_dir = "" if output_dir in ("", "auto") else output_dir
    results_path = "" if results_path in ("", "auto") else results_path
    run_id = Path(output_dir).name if output_dir else new_run_id(label)
    out = Path(output_dir) if output_dir else outputs_dir() / run_id
    out.mkdir(parents=True, exist_ok=True)
    results = Path(results_path) if results_path else outputs_dir() / "results.jsonl"
    return RunContext(run_id=run_id, output_dir=out, results_path=results)


def resolve_model(name_or_path: str) -> Path:
    """A bundled model name or a GGUF path, as a path to a file that exists."""
    from kvbook.errors import BadInput
    from kvbook.ops.components import MODELS, model_path

    if name_or_path in MODELS:
        return model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise BadInput(f"parameter 'model': {name_or_path} is neither a bundled model ({', '.join(MODELS)}) nor a file")
    return path


def repo_paths(args: list[str]) -> list[str]:
    """Server arguments with repository-relative files (e.g. params/templates/x.jinja) made absolute."""
    from kvbook.paths import repo_root

    out = []
    for arg in map(str, args):
        candidate = repo_root() / arg
        out.append(str(candidate) if not arg.startswith("-") and "/" in arg and candidate.exists() else arg)
    return out


def run_smoke_session(ctx: RunContext, model: Path, server_args: list[str], *, routes: list[str], repeats: int,
                      max_tokens: int, force: bool, label: str, tool_prefill: str = "",
                      rpc_servers: list | None = None, allow_remote_rpc: bool = False) -> SessionResult:
    from kvbook.ops.rpc import parse_rpc_hosts

    def say(line: str) -> None:
        print(line, flush=True)

    def each(result: Any) -> None:
        print(f"  {'PASS' if result.passed else 'FAIL'}  {result.route}/{result.check}"
              f"{'' if result.required else ' (recorded only)'}", flush=True)

    return run_session(model, repo_paths(server_args), run_dir=ctx.output_dir, results_path=ctx.results_path,
                       progress=say, on_result=each,
                       rpc=parse_rpc_hosts(rpc_servers or []), allow_remote_rpc=allow_remote_rpc,
                       run_id=ctx.run_id, routes=tuple(routes), repeats=repeats, force=force, label=label,
                       smoke=SmokeConfig(max_tokens=max_tokens, tool_prefill=tool_prefill))


def route_verdicts(results: list[Any]) -> list[dict[str, Any]]:
    """Per route: PASS when every required check passed, the count, and the required checks that failed."""
    out = []
    for route in dict.fromkeys(r.route for r in results):
        required = [r for r in results if r.route == route and r.required]
        failed = [r.check for r in required if not r.passed]
        out.append({"route": route, "result": "FAIL" if failed or not required else "PASS",
                    "required checks passed": f"{len(required) - len(failed)}/{len(required)}",
                    "failed": ", ".join(dict.fromkeys(failed)) or "-"})
    return out


def headline(title: str, rows: list[dict[str, Any]], note: str = "") -> HTML:
    """A PASS/FAIL headline: the overall result (PASS only when every row passed) in large type, then one row
    per route or part."""
    import html

    ok = bool(rows) and all(r["result"] == "PASS" for r in rows)
    color = "#1b7f3b" if ok else "#b00020"
    lines = "".join(f"<li><b style='color:{'#1b7f3b' if r['result'] == 'PASS' else '#b00020'}'>{r['result']}</b> "
                    + html.escape(" · ".join(f"{k}: {v}" for k, v in r.items() if k != "result")) + "</li>"
                    for r in rows)
    extra = f"<p>{html.escape(note)}</p>" if note else ""
    return HTML(f"<div class='kvbook-headline'><h2 style='color:{color}'>{'PASS' if ok else 'FAIL'}: "
                f"{html.escape(title)}</h2><ul>{lines}</ul>{extra}</div>")


def smoke_headline(session: SessionResult) -> HTML:
    """02's headline: one line per route."""
    rows = route_verdicts(session.results)
    fits = session.plan.get("verdict")
    return headline(f"{session.label or 'smoke'}, {len(rows)} route(s)", rows,
                    note=f"plan: {fits}; planned memory {'matches' if all(r['match'] for r in session.comparison if r['match'] is not None) else 'does NOT match'} the server's log")


def claude_headline(report: Any, routes: Any, e2e: Any) -> HTML:
    """04's headline: the probe (every alias sent a model ID), the routes generated, the end-to-end run."""
    missing = [r.how for r in report.rows if not r.model_id]
    rows = [{"part": "probe", "result": "FAIL" if missing or not report.rows else "PASS",
             "detail": f"{len(report.rows) - len(missing)}/{len(report.rows)} ways of choosing a model sent an ID"},
            {"part": "routes", "result": "PASS" if routes.routes else "FAIL",
             "detail": f"{len(routes.routes)} LiteLLM route(s), {len(routes.warnings)} warning(s)"}]
    if e2e is not None:
        rows.append({"part": "claude -p through LiteLLM to llama-server", "result": "PASS" if e2e.ok else "FAIL",
                     "detail": f"{len(e2e.turns)} turn(s)"})
    return headline(f"Claude Code {report.client_version}", rows)


def summary_line(summary: dict[str, Any]) -> str:
    """The run's summary.json in one line (no local paths): what a reader needs from it."""
    kind = summary.get("kind")
    if kind == "smoke":
        state = "PASS" if summary["required_passed"] == summary["required_total"] else "FAIL"
        return (f"{state}: {summary['required_passed']}/{summary['required_total']} required checks passed; plan "
                f"{summary['verdict']}, {'matches' if summary['plan_matches'] else 'does not match'} the server's log")
    return f"{kind}: recorded as run {summary.get('run_id')}"


def show_table(rows: list[dict[str, Any]], caption: str = "") -> HTML:
    return HTML(html_table(rows, caption=caption))


def show_figure(fig: Any) -> Any:
    return fig


def show_verdict(lines: list[str]) -> HTML:
    """The comparison's plain-language verdict as a list, the Verdict line in bold."""
    import html

    items = "".join(f"<li>{'<b>' if line.startswith('Verdict') else ''}{html.escape(line)}"
                    f"{'</b>' if line.startswith('Verdict') else ''}</li>" for line in lines)
    return HTML(f"<ul class='kvbook-verdict'>{items}</ul>")


def finish_smoke(ctx: RunContext, session: SessionResult) -> dict[str, Any]:
    """Write summary.json: named values tests and CI gates read (never the proxy key)."""
    required = [r for r in session.results if r.required]
    summary = {
        "kind": "smoke",
        "label": session.label,
        "run_id": ctx.run_id,
        "model": session.plan.get("model"),
        "verdict": session.plan.get("verdict"),
        "plan": session.plan,
        "plan_matches": all(r["match"] for r in session.comparison if r["match"] is not None),
        "comparison": session.comparison,
        "routing": session.routing,
        "versions": session.versions,
        "checks": results_table(session.results),
        "required_passed": sum(r.passed for r in required),
        "required_total": len(required),
        "required_failures": [f"{r.route}/{r.check}: {r.reason}" for r in session.required_failures()],
        "proxy_overhead": proxy_overhead(session.results),
        "results_path": str(ctx.results_path),
    }
    write_summary(ctx.output_dir, summary)
    return summary


def contender_label(label: str, model: str) -> str:
    """The records' label for one model in a comparison: '<label>/<model name or file stem>'."""
    return f"{label}/{Path(model).stem if model.endswith('.gguf') else model}"


def compare_runs(ctx: RunContext, models: list[str], server_args: list[str], *, routes: list[str], repeats: int,
                 max_tokens: int, tool_prefill: str, label: str, force: bool = False) -> tuple[list[str], list[str]]:
    """Launch each model in turn with the same flags and suite: (contender labels, required checks that failed)."""
    import time

    if len(models) < 2:
        from kvbook.errors import BadInput

        raise BadInput("parameter 'models': a comparison needs at least two models")
    paths = [resolve_model(m) for m in models]  # every model checked before the first launch
    labels: list[str] = []
    failures: list[str] = []
    for i, (model, path) in enumerate(zip(models, paths), start=1):
        started = time.monotonic()
        name = contender_label(label, model)
        print(f"[{i}/{len(models)}] {name}: {repeats} repetition(s) x {len(routes)} route(s) ...", flush=True)
        session = run_smoke_session(ctx, path, server_args, routes=routes, repeats=repeats, max_tokens=max_tokens,
                                    force=force, label=name, tool_prefill=tool_prefill)
        required = [r for r in session.results if r.required]
        print(f"      {sum(r.passed for r in required)}/{len(required)} required checks passed "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        labels.append(name)
        failures += [f"{name} {r.route}/{r.check}: {r.reason}" for r in session.required_failures()]
    return labels, failures


def recorded_labels(labels: list[str]) -> list[str]:
    """The labels to compare when nothing is launched: at least two, all distinct."""
    from kvbook.errors import BadInput

    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise BadInput("parameter 'labels': with launch off, name at least two different recorded labels "
                       f"(got {labels!r})")
    return list(labels)


def finish_compare(ctx: RunContext, labels: list[str], contenders: list[Any], diffs: list[Any],
                   verdict: list[str], required_failures: list[str]) -> dict[str, Any]:
    """summary.json of a comparison: contenders, differences and the plain verdict."""
    from kvbook.interface import to_dict

    summary = {
        "kind": "compare",
        "run_id": ctx.run_id,
        "model": " vs ".join(c.model or c.label for c in contenders),
        "contenders": labels,
        "stats": [to_dict(c) for c in contenders],
        "differences": [{**to_dict(d), "beyond_noise": d.beyond_noise} for d in diffs],
        "verdict_text": verdict,
        "verdict": " / ".join(line for line in verdict if line.startswith("Verdict")),
        # required checks that failed in this run's launches: `kvbook run` gates on them like a smoke run
        "required_failures": required_failures,
        "results_path": str(ctx.results_path),
    }
    write_summary(ctx.output_dir, _no_nan(summary))
    return summary


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: an undefined statistic is written as null."""
    import math

    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
