"""Write the ops notebooks from this script so their cells stay thin and reviewed in one place.

    .venv/bin/python tools/build_notebooks.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]


def notebook(cells: list) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def md(text: str) -> nbf.NotebookNode:
    return nbf.v4.new_markdown_cell(text.strip())


def code(text: str, tags: tuple[str, ...] = ()) -> nbf.NotebookNode:
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


SMOKE = notebook([
    md("""
# Serve and smoke-test: llama-server behind LiteLLM

This notebook plans a llama-server command line, launches llama-server (loopback, log at `-lv 4`) and a
LiteLLM proxy with a generated routing table, then runs the same smoke checks on three routes:
**direct** (llama-server's own `/v1/messages`), **litellm-anthropic** (LiteLLM `anthropic/` to that endpoint)
and **litellm-openai** (LiteLLM `openai/`, translated through `/v1/chat/completions`).
Every check is appended to `outputs/results.jsonl`; both servers are stopped at the end, also on error.
The proxy's master key is generated per run and never printed."""),
    code("""
model: str = "smollm2-135m"  # bundled model name (smollm2-135m, gemma3-270m) or a GGUF path
server_args: list = ["-c", "65536", "-ngl", "999", "--flash-attn", "on", "-b", "4096", "-ub", "2048", "--fit", "off", "--cache-type-k", "bf16", "--cache-type-v", "bf16", "-n", "32768", "--jinja"]  # the flag set from the blog post
routes: list = ["direct", "litellm-anthropic", "litellm-openai"]  # which routes to test
repeats: int = 1  # how many times to run the whole suite per route
max_tokens: int = 96  # per check request
tool_prefill: str = ""  # assistant prefill for forced tool calls, for example a tool_call tag and a newline
force: bool = False  # launch even when the plan says it will not fit
label: str = "smoke"  # a name for this run in the records
results_path: str = "auto"  # results file, auto means outputs/results.jsonl
output_dir: str = "auto"  # set by kvbook run, auto means a new folder under outputs/
""", tags=("parameters",)),
    code("""
from pathlib import Path
from kvbook import notebook_support as ns

ctx = ns.start_run("smoke", output_dir, results_path)
model_path = ns.resolve_model(model)
print(f"run {ctx.run_id}: model {model_path.name}")
"""),
    md("## Launch, check, record, stop"),
    code("""
session = ns.run_smoke_session(ctx, model_path, server_args, routes=routes, repeats=repeats,
                               max_tokens=max_tokens, force=force, label=label, tool_prefill=tool_prefill)
"""),
    md("## Plan against what the server allocated\nCaches must match to the log's two decimals; compute is a calibrated estimate."),
    code("ns.show_table(session.comparison, 'planned vs measured (MiB)')"),
    md("## Routing table LiteLLM was started with"),
    code("ns.show_table(session.routing, 'LiteLLM model_list')"),
    md("## Smoke checks"),
    code("ns.show_table(ns.results_table(session.results), 'every check, every route')"),
    code("ns.show_figure(ns.pass_fail_figure(session.results))"),
    code("ns.show_figure(ns.latency_figure(session.results))"),
    code("ns.show_table(ns.proxy_overhead(session.results), 'proxy overhead against the direct call')"),
    md("## Versions"),
    code("ns.show_table([session.versions], 'components')"),
    code("ns.finish_smoke(ctx, session)"),
])


CLAUDE_CODE = notebook([
    md("""
# Claude Code routing: which model ID does the installed client send?

The installed `claude` is run in `-p` mode against kvbook's local recording endpoint, once per `--model` alias,
once per agent file (`--agent NAME`) and once per agent started as a subagent, and the model ID that arrives is
recorded. LiteLLM routes are generated from that table, so they cover exactly what this client sends. With
`run_e2e` the real `claude -p` then goes through LiteLLM to llama-server with the bundled SmolLM2, and what the
backend dropped or rejected from the real request, and the prompt-cache reuse, are recorded."""),
    code("""
agents_dir: str = ""  # folder of agent .md files to probe, empty for none
timeout_s: float = 90.0  # seconds each claude run may take
route_alias: str = "opus"  # the alias whose IDs are routed to the local model
run_e2e: bool = True  # also run claude -p through LiteLLM to llama-server
results_path: str = "auto"  # results file, auto means outputs/results.jsonl
output_dir: str = "auto"  # set by kvbook run, auto means a new folder under outputs/
""", tags=("parameters",)),
    code("""
from pathlib import Path
from kvbook import notebook_support as ns
from kvbook.probe import format_table, plan_routes, probe_claude_code
from kvbook.runner import write_summary

ctx = ns.start_run("claude-code", output_dir, results_path)
report = probe_claude_code(Path(agents_dir) if agents_dir else None, timeout_s=timeout_s)
print(format_table(report))
"""),
    md("## How the model was chosen -> model ID sent"),
    code("ns.show_table([{'how': r.how, 'model ID sent': r.model_id, 'side calls': ', '.join(r.other_ids), 'note': r.note} for r in report.rows], f'Claude Code {report.client_version}')"),
    md("## LiteLLM routes generated from the probe"),
    code("""
plan = plan_routes({route_alias: "smollm2-135m"}, report, "http://llama-server", configured=("claude-opus-4-7",))
ns.show_table([{"client sends": r.model_name, "routed to": f"{r.backend}/{r.upstream_model}"} for r in plan.routes], "model_list")
"""),
    code("print('\\n'.join(plan.warnings) or 'no warnings')"),
    md("## End to end: claude -p through LiteLLM to llama-server"),
    code("""
e2e = None
if run_e2e:
    from kvbook.claude_e2e import run_e2e as run_claude_e2e
    e2e = run_claude_e2e(run_dir=ctx.output_dir, results_path=ctx.results_path, run_id=ctx.run_id, probe=report)
    ns.show_table([f.__dict__ for f in e2e.fields], "what each hop did with the real request")
"""),
    code("ns.show_table([t.__dict__ for t in e2e.turns], 'turns and prompt-cache reuse') if e2e else None"),
    code("""
write_summary(ctx.output_dir, {"kind": "claude-code", "run_id": ctx.run_id, "probe": report.to_dict(),
                               "routes": [r.model_name for r in plan.routes], "warnings": list(plan.warnings),
                               "e2e": e2e.to_dict() if e2e else None, "e2e_ok": e2e.ok if e2e else None})
"""),
])


def main() -> int:
    for name, nb in (("02-serve-and-smoke.ipynb", SMOKE), ("05-claude-code.ipynb", CLAUDE_CODE)):
        out = ROOT / "notebooks" / name
        nbf.write(nb, str(out))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
