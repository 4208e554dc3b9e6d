"""What the ops notebooks call: run folders, model lookup, the session, display and summary.

Kept here rather than in cells so every step is importable and tested."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbook.report import HTML, html_table, latency_figure, pass_fail_figure
from kvbook.runner import new_run_id, outputs_dir, write_summary
from kvbook.session import SessionResult, proxy_overhead, results_table, run_session
from kvbook.smoke import SmokeConfig

__all__ = ["RunContext", "finish_smoke", "latency_figure", "pass_fail_figure", "proxy_overhead", "resolve_model",
           "results_table", "run_smoke_session", "show_figure", "show_table", "start_run"]


@dataclass(frozen=True)
class RunContext:
    run_id: str
    output_dir: Path
    results_path: Path


def start_run(label: str, output_dir: str = "auto", results_path: str = "auto") -> RunContext:
    """The run's folder (given by `kvbook run`, else a new one under outputs/) and results file."""
    from kvbook import report_style

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
    from kvbook.components import MODELS, model_path
    from kvbook.errors import BadInput

    if name_or_path in MODELS:
        return model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise BadInput(f"parameter 'model': {name_or_path} is neither a bundled model ({', '.join(MODELS)}) nor a file")
    return path


def repo_paths(args: list[str]) -> list[str]:
    """Server arguments with repository-relative files (e.g. params/templates/x.jinja) made absolute."""
    from kvbook.runner import repo_root

    out = []
    for arg in map(str, args):
        candidate = repo_root() / arg
        out.append(str(candidate) if not arg.startswith("-") and "/" in arg and candidate.exists() else arg)
    return out


def run_smoke_session(ctx: RunContext, model: Path, server_args: list[str], *, routes: list[str], repeats: int,
                      max_tokens: int, force: bool, label: str, tool_prefill: str = "") -> SessionResult:
    return run_session(model, repo_paths(server_args), run_dir=ctx.output_dir, results_path=ctx.results_path,
                       run_id=ctx.run_id, routes=tuple(routes), repeats=repeats, force=force, label=label,
                       smoke=SmokeConfig(max_tokens=max_tokens, tool_prefill=tool_prefill))


def show_table(rows: list[dict[str, Any]], caption: str = "") -> HTML:
    return HTML(html_table(rows, caption=caption))


def show_figure(fig: Any) -> Any:
    return fig


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
