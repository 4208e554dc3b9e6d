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
                               max_tokens=max_tokens, force=force, label=label)
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


def main() -> int:
    out = ROOT / "notebooks" / "02-serve-and-smoke.ipynb"
    nbf.write(SMOKE, str(out))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
