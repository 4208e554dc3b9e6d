"""Write every notebook from this script so their cells stay thin and reviewed in one place.

    .venv/bin/python tools/build_notebooks.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]


def notebook(cells: list) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding changes nothing that did not change
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def md(text: str, tags: tuple[str, ...] = ()) -> nbf.NotebookNode:
    cell = nbf.v4.new_markdown_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def code(text: str, tags: tuple[str, ...] = ()) -> nbf.NotebookNode:
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


SIZING = notebook([
    md("""
# Sizing: will this llama-server command line fit?

This notebook plans the memory of one `llama-server` command line for one model on one machine, with
kvbook's model of the pinned llama.cpp build. It counts what the server allocates when it starts
(weights, KV cache, the recurrent state of hybrid models such as Qwen3.5/3.6, the compute buffer and
the logits) and the host memory that grows while it runs (the prompt cache and context checkpoints).

Cache sizes follow llama.cpp's own rules to the byte. The compute buffer is a calibrated estimate, and a
preset's weights are the size of its GGUF file. A server *starts* when the start allocation fits the
budget; it is *tight* when the growth at run time would bring it within 1 GiB of the budget.

Paste the command line you run into `command_line` (the model and the knobs below are then read from it), or
set the knobs one by one. Either way it is planned by the same API as `kvbook plan`, with every flag.
"""),
    md("""
To run it headless with a params file: `kvbook run 01-sizing -f params/runs/blog-post-m1max.yaml`.
""", tags=("interactive",)),
    code("""
command_line: str = ""  # the whole llama-server command line; when set, the model and the knobs below come from it
model: str = "qwen3.6-35b-a3b"  # preset id (params/models), GGUF path or URL, or a config.json
device: str = "m1-max-64"  # preset id (params/devices), this-machine, or custom (then set budget_gib)
budget_gib: float = 0.0  # > 0: plan against one unified pool of this many GiB instead of the device
context: int = 65536  # -c: context in tokens (shared by all slots when the KV is unified)
slots: int = -1  # -np: parallel slots; -1 is llama-server's auto (4 slots, one unified KV)
kv_unified: bool = False  # -kvu: one KV buffer shared by all slots (always on when slots is -1)
cache_type_k: str = "f16"  # -ctk: f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1
cache_type_v: str = "f16"  # -ctv: a quantized V cache needs flash attention
ubatch: int = 512  # -ub: physical batch; sizes the compute buffer
batch: int = 2048  # -b: logical batch
flash_attn: str = "auto"  # -fa: on, off or auto (planned as on)
swa_full: bool = False  # --swa-full: full-size cache for sliding-window layers
allow_over_max: bool = False  # allow a context above the model's trained maximum
compare_blog_post: bool = False  # check the blog post's memory figures against kvbook's
n_gpu_layers: str = ""  # -ngl: empty leaves llama-server's auto; a count, auto or all
n_cpu_moe: int = 0  # --n-cpu-moe N: experts of the first N layers on the CPU (-1: --cpu-moe, all)
tensor_split: str = ""  # -ts across the offload devices, e.g. 3,1 (empty: by free memory)
solve: bool = False  # rank the placements that fit (kvbook plan --solve) and list the rejected ones
objective: str = "max-context"  # the solver's goal: max-context or fastest-decode
output_dir: str = ""  # set by kvbook run; empty writes to a new folder under outputs/
""", tags=('parameters',)),
    code("""
from kvbook.notebook import figures
from kvbook.notebook import sizing
from kvbook.notebook.blog_post import blog_post_comparison
from kvbook.plan.summary import format_plan
from kvbook.notebook.html import HTML, html_table

figures.setup_renderer()
run = sizing.resolve(sizing.SizingParams(
    model=model, device=device, budget_gib=budget_gib, context=context, slots=slots, kv_unified=kv_unified,
    cache_type_k=cache_type_k, cache_type_v=cache_type_v, ubatch=ubatch, batch=batch, flash_attn=flash_attn,
    swa_full=swa_full, allow_over_max=allow_over_max, compare_blog_post=compare_blog_post, n_gpu_layers=n_gpu_layers,
    n_cpu_moe=n_cpu_moe, tensor_split=tensor_split, solve=solve, objective=objective, command_line=command_line,
    output_dir=output_dir))
print(format_plan(run.plan))
"""),
    md("""
## Where the memory goes

One bar per part, stacked, against the budget of the pool that holds the weights and the KV cache. The grey
top is memory the server takes later, as it caches prompts and keeps context checkpoints.
"""),
    code('figures.breakdown_figure(run.plan)'),
    md("""
## Memory against context

Start allocation for every context from 1K to the model's maximum, one curve per cache type (K and V of the
same type) with this configuration's slots. The diamonds mark the largest context of each type that fits;
the circle is the configuration planned above.
"""),
    code("""
if run.sweep is not None:
    display(figures.context_figure(run.sweep, run.budget_bytes, usable=[sizing.type_usable(run.arch, t, run.flash) for t in run.sweep.cache_types],
                                   current=(run.params.context, run.plan.memory.start_bytes),
                                   title=f"{run.arch.name} on {run.device.name}"))
else:
    display(HTML("<p><em>No kvbook rule for this architecture: the plan above is llama.cpp's own accounting "
                 "(llama-fit-params), which has no sweep.</em></p>"))
"""),
    md("""
## Largest context that fits, per cache type and slot count

The largest `-c` (in steps of 256 up to the model's maximum) that starts, with this command line's placement
flags (on several devices the planner searches it device by device). Explicit slot
counts use this configuration's `kv_unified` setting; "n/a" marks a type llama-server refuses here.
"""),
    code("""HTML(figures.fit_table_html(run.fit_rows(), caption=f"largest -c that starts on {run.device.name}"))"""),
    md("""
## If it does not fit

Changed command lines that do fit, when this one does not (nothing is listed when it fits).
"""),
    code("""
HTML(html_table([{"change": a.change, "verdict": a.verdict.value, "n_ctx": a.n_ctx,
                          "total GiB": round(a.total_bytes / 2**30, 2), "llama-server args": " ".join(a.flags)}
                         for a in run.plan.alternatives], caption="alternatives"))
"""),
    md("""
## Per device

One bar per device llama.cpp would use (the host is `CPU`), stacked by what it holds, against that device's own
budget (the black mark). On unified memory there is one device.
"""),
    code("""
from kvbook.notebook import placement_view as pv

pv.device_figure(pv.device_rows(run.plan))
"""),
    md("""
## The solver's placements

With `solve: True`: the placements that start, best first for `objective`, each with its exact flags, and every
option that was rejected with the reason. Flags you set are kept; the rest is searched.
"""),
    code("""
if run.solution is not None:
    ranked, rejected = pv.solver_rows(run.solution)
    display(HTML(html_table(ranked, caption=f"ranked for {objective} ({run.solution.searched} placements searched)")))
    display(HTML(html_table(rejected[:40], caption=f"rejected ({len(rejected)})")))
else:
    display(HTML("<p><em>Not requested: set solve to True.</em></p>"))
"""),
    md("""
## Try other settings

One panel: paste a command line or move any control (context by slider or exact box, slots, cache types, flash
attention, batch sizes, `-ngl`, `--n-cpu-moe`, `-ts`, an `-ot` preset) and every device's bar, the memory curve,
the largest-context table and the solver's ranking re-plan through the same API as above. Copy the command line
under the status. This part needs a live kernel and is left out of the HTML report.
""", tags=('interactive',)),
    code("""
from kvbook.notebook.widgets import build_sizing_ui

ui = build_sizing_ui(run.params)
ui.layout
""", tags=('interactive',)),
    md("""
## The blog post's figures, checked

With `compare_blog_post: True`, the memory figures of the seed blog post (Qwen3.6-35B-A3B UD-Q4_K_M at
`-c 262144` and `-c 65536` on a 64 GB M1 Max) are set against kvbook's numbers, computed now from the
`qwen3.6-35b-a3b` and `m1-max-64` presets with the post's own command line.
"""),
    code("""
blog = blog_post_comparison() if compare_blog_post else None
HTML(html_table(blog.table(), caption="the post against kvbook") if blog else
     "<p><em>Not requested: set compare_blog_post to True.</em></p>")
"""),
    code('figures.blog_figure(blog) if blog else None'),
    code("""
summary = sizing.finish(run, output_dir, blog)
print(f"verdict {summary['verdict']}; largest -c that fits {summary['max_ctx']:,}")
"""),
])

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
server_args: list = ["-c", "65536", "-ngl", "999", "--flash-attn", "on", "-b", "4096", "-ub", "2048", "--fit", "off", "--cache-type-k", "bf16", "--cache-type-v", "bf16", "-n", "32768", "--jinja", "--chat-template-file", "params/templates/smollm2-chatml-tools.jinja"]  # the blog post's flag set with a tool-aware template
routes: list = ["direct", "litellm-anthropic", "litellm-openai"]  # which routes to test
repeats: int = 1  # how many times to run the whole suite per route
max_tokens: int = 96  # per check request
tool_prefill: str = "<tool_call>\\n"  # assistant prefill for forced tool calls (the failing contrast, no template or prefill: params/runs/smoke-contrast.yaml)
force: bool = False  # launch even when the plan says it will not fit
rpc_servers: list = []  # ggml-rpc-servers kvbook starts here first and adds as --rpc devices, e.g. ["127.0.0.1:0"]
allow_remote_rpc: bool = False  # allow a non-loopback bind address for them (they have no authentication)
label: str = "smoke"  # a name for this run in the records
results_path: str = "auto"  # results file, auto means outputs/results.jsonl
output_dir: str = "auto"  # set by kvbook run, auto means a new folder under outputs/
""", tags=("parameters",)),
    code("""
from pathlib import Path
from kvbook.notebook import ops_support as ns
ctx = ns.start_run("smoke", output_dir, results_path)
model_path = ns.resolve_model(model)
print(f"run {ctx.run_id}: model {model_path.name}")
"""),
    md("## Launch, check, record, stop\nStarting the servers takes a minute; each step and check is printed as it lands."),
    code("""
session = ns.run_smoke_session(ctx, model_path, server_args, routes=routes, repeats=repeats,
                               max_tokens=max_tokens, force=force, label=label, tool_prefill=tool_prefill,
                               rpc_servers=rpc_servers, allow_remote_rpc=allow_remote_rpc)
""", tags=("progress",)),
    code("ns.smoke_headline(session)", tags=("headline",)),
    md("## Plan against what the server allocated\nCaches must match to the log's two decimals; compute is a calibrated estimate."),
    code("ns.show_table(session.comparison, 'planned vs measured (MiB)')"),
    md("## Routing table LiteLLM was started with"),
    code("ns.show_table(session.routing, 'LiteLLM model_list')"),
    md("## Smoke checks"),
    code("ns.show_table(ns.results_table(session.results), 'every check, every route')"),
    code("ns.show_figure(ns.pass_fail_figure(session.results))"),
    code("ns.show_figure(ns.latency_figure(session.results))"),
    code("ns.show_table(ns.proxy_overhead(session.results), 'proxy overhead against the direct call (estimated from 3 runs per side: repeats >= 3)')"),
    md("## Versions"),
    code("ns.show_table([session.versions], 'components')"),
    code("summary = ns.finish_smoke(ctx, session)\nprint(ns.summary_line(summary))"),
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
route_model: str = "smollm2-135m"  # the local model those IDs are routed to
configured_ids: list = ["claude-opus-4-7"]  # model IDs your settings pin (ANTHROPIC_MODEL and the like), routed too
run_e2e: bool = True  # also run claude -p through LiteLLM to llama-server
results_path: str = "auto"  # results file, auto means outputs/results.jsonl
output_dir: str = "auto"  # set by kvbook run, auto means a new folder under outputs/
""", tags=("parameters",)),
    code("""
from pathlib import Path
from kvbook.notebook import ops_support as ns
from kvbook.claude.probe import format_table, probe_claude_code
from kvbook.claude.routes import plan_routes
from kvbook.notebook.runner import write_summary

ctx = ns.start_run("claude-code", output_dir, results_path)
report = probe_claude_code(Path(agents_dir) if agents_dir else None, timeout_s=timeout_s)
print(format_table(report))
"""),
    md("## How the model was chosen -> model ID sent"),
    code("ns.show_table([{'how': r.how, 'model ID sent': r.model_id, 'side calls': ', '.join(r.other_ids), 'note': r.note} for r in report.rows], f'Claude Code {report.client_version}')"),
    md("## LiteLLM routes generated from the probe"),
    code("""
plan = plan_routes({route_alias: route_model}, report, "http://llama-server", configured=tuple(configured_ids))
ns.show_table([{"client sends": r.model_name, "routed to": f"{r.backend}/{r.upstream_model}"} for r in plan.routes], "model_list")
"""),
    code("print('\\n'.join(plan.warnings) or 'no warnings')"),
    md("""
## End to end: claude -p through LiteLLM to llama-server

The field checks use Claude Code's full-default request. The turns add `--tools ""`: by default 2.1.197 ends the
request with a `system` message listing agent types and skills after the prompt, and the 135M model continues that
message until `max_tokens` instead of answering. llama-server runs at `--temp 0` (Claude Code sends no temperature),
so the one-word answers end the turn the same way every run. Each header setting runs a first turn, a `--continue`
turn and a new session with another first prompt."""),
    code("""
e2e = None
if run_e2e:
    from kvbook.claude.e2e import run_e2e as run_claude_e2e
    e2e = run_claude_e2e(run_dir=ctx.output_dir, results_path=ctx.results_path, run_id=ctx.run_id, probe=report)
    ns.show_table([f.__dict__ for f in e2e.fields], "what each hop did with the real request")
"""),
    code("ns.show_table([t.__dict__ for t in e2e.turns], 'turns and prompt-cache reuse') if e2e else None"),
    md("## Prompt-cache reuse before and after CLAUDE_CODE_ATTRIBUTION_HEADER=0"),
    code("""
from kvbook.claude.e2e import cache_figures

figures = cache_figures(list(e2e.turns)) if e2e else {}
ns.show_table([{"scope": scope, "setting": key, **fig} for scope, row in figures.items() for key, fig in row.items()],
              "cached of prompt tokens (llama-server log) and cache_read_input_tokens (Claude Code)") if e2e else None
"""),
    code("ns.claude_headline(report, plan, e2e)", tags=("headline",)),
    code("""
write_summary(ctx.output_dir, {"kind": "claude-code", "run_id": ctx.run_id, "probe": report.to_dict(),
                               "routes": [r.model_name for r in plan.routes], "warnings": list(plan.warnings),
                               "e2e": e2e.to_dict() if e2e else None, "e2e_ok": e2e.ok if e2e else None})
"""),
])



COMPARE = notebook([
    md("""
# A fair model comparison: same suite, same flags, repeated

Each model is launched in turn with the same llama-server flags, behind the same LiteLLM routes, and the same smoke
suite runs `repeats` times on every route. Every check lands in `results.jsonl`; this notebook then compares what
was recorded: pass rates with 95% Wilson intervals, time to first text and tokens/s as distributions (median with a
95% bootstrap interval), and planned against measured memory. A difference counts only when its 95% interval excludes
zero; everything else is called noise. With `launch` off, it compares records already in the results file instead."""),
    code("""
models: list = ["smollm2-135m", "gemma3-270m"]  # bundled model names or GGUF paths, the first is the baseline
server_args: list = ["-c", "8192", "-np", "1", "--jinja", "-n", "512", "--chat-template-file", "params/templates/smollm2-chatml-tools.jinja"]  # the same flags for every model
routes: list = ["direct", "litellm-anthropic"]  # routes each repetition runs on
repeats: int = 5  # repetitions of the whole suite per model and route
max_tokens: int = 96  # per check request
tool_prefill: str = "<tool_call>\\n"  # assistant prefill for forced tool calls, the same for every model
label: str = "compare"  # records are labelled label/model
launch: bool = True  # false means compare records already in results_path
labels: list = []  # with launch false, two or more recorded labels to compare, the first is the baseline
results_path: str = "auto"  # results file, auto means outputs/results.jsonl
output_dir: str = "auto"  # set by kvbook run, auto means a new folder under outputs/
""", tags=("parameters",)),
    code("""
from kvbook.records import comparison as cmp
from kvbook.notebook import ops_support as ns
from kvbook.records.store import read_checks
from kvbook.notebook.html import distribution_figure, rate_figure

ctx = ns.start_run("compare", output_dir, results_path)
if launch:
    chosen, failed = ns.compare_runs(ctx, models, server_args, routes=routes, repeats=repeats, max_tokens=max_tokens,
                             tool_prefill=tool_prefill, label=label)
    run_ids = [ctx.run_id]
else:
    chosen, failed, run_ids = ns.recorded_labels(labels), [], []
records, bad_lines = read_checks(ctx.results_path)
for bad in bad_lines:
    print(f"skipped {ctx.results_path.name} line {bad.line_no}: {bad.reason}")
selected = cmp.select(records, run_ids=run_ids, labels=chosen)
contenders = [cmp.summarize(selected, name) for name in chosen]
"""),
    md("## Pass rates, speed and noise per model"),
    code("ns.show_table(cmp.contender_rows(contenders), 'per model: pass rates with 95% intervals, speed distributions')"),
    code("ns.show_figure(rate_figure([(c.label, m, r) for c in contenders for m, r in (('required checks', c.required), ('tool calls', c.tool_calls))]))"),
    code("ns.show_figure(distribution_figure(selected, chosen, cmp.SPEED_CHECK, 'first_text_s', 1000.0, 'Time to first text (stream_text), every sample', 'ms'))"),
    code("ns.show_figure(distribution_figure(selected, chosen, cmp.SPEED_CHECK, 'tokens_per_s', 1.0, 'Tokens/s after the first token (stream_text), every sample', 'tok/s'))"),
    md("## Every check, per model"),
    code("ns.show_table([{'check': check, **{c.label: f'{c.per_check[check].passed}/{c.per_check[check].total}' if check in c.per_check else '-' for c in contenders}} for check in dict.fromkeys(k for c in contenders for k in c.per_check)], 'passed/total per check')"),
    md("## Memory: plan against what llama-server allocated"),
    code("ns.show_table(cmp.memory_rows(contenders), 'planned vs measured')"),
    md("## Differences against the baseline, and the verdict"),
    code("""
pairs = [cmp.differences(selected, chosen[0], other) for other in chosen[1:]]
diffs = [d for pair in pairs for d in pair]
verdict = [line for pair in pairs for line in cmp.verdict(pair, samples={c.label: c.repeats for c in contenders})]
ns.show_table(cmp.difference_rows(diffs), f'each model minus the baseline {chosen[0]}, with 95% intervals')
"""),
    code("ns.show_verdict(verdict)"),
    code("summary = ns.finish_compare(ctx, chosen, contenders, diffs, verdict, failed)"),
])

CAPACITY = notebook([
    md("""
# Capacity: how fast is a Claude Code turn, and how many agents does one llama-server hold?

Memory is half of capacity planning; this notebook measures the other half on this machine, with the real parts:

1. **Speed model**: `llama-bench -d` at a few context depths, an affine fit of time per token in depth, checked at
   depths it was not fitted on; it predicts a Claude-Code-sized turn cold and with the system prompt cached.
2. **Agent-shaped load**: sessions replaying what the installed Claude Code really sends (captured from `claude -p`
   by a recording endpoint: system blocks, tools, fields, the first `<system-reminder>`), a history that grows by
   the server's own replies, a reminder per turn, unique content per run. `prompt_scale` shrinks the system text and
   the tool list for small machines (1.0 is the recorded size).
3. **Sweep and SLO**: closed-loop concurrency levels; TTFT, inter-token and end-to-end percentiles with 95%
   order-statistic intervals; goodput under the SLO; the largest passing concurrency by doubling, then bisection.
4. **Prefix-cache accounting**: per turn `cache_n / prompt_n`, each miss with its cause (from the request and the
   server log at `-lv 4`) and the setting that fixes it; with and without Claude Code's attribution header.
5. **Memory**: slot counts the planner fits at the per-slot context these sessions need, against measured goodput,
   and the Claude Code / LiteLLM settings that go with the recommendation.
6. **Scale-out**: the same levels against one and two llama-servers (`-t 1` each) behind one LiteLLM model group.

Headless: `kvbook run -f params/runs/capacity-default.yaml`."""),
    code("""
model: str = "smollm2-135m"  # bundled model name or GGUF path
server_args: list = ["-c", "16384", "-np", "2", "-t", "2", "--jinja", "--chat-template-file", "params/templates/smollm2-chatml-tools.jinja", "-lv", "4"]  # llama-server flags (-lv 4: the log explains cache misses)
speed_depths: list = [0, 512, 1024, 2048, 4096]  # llama-bench -d depths measured
speed_fit_depths: list = [0, 4096]  # depths the speed model is fitted on; the others are held out
prompt_scale: float = 0.05  # share of Claude Code's system text and tools replayed (1.0: as recorded)
turns: int = 3  # turns per session
turn_words: int = 60  # new user/tool-output words per turn
max_tokens: int = 24  # reply length per turn
reminder: str = "append"  # append (Claude Code's position) | system (before the history) | none
subagent_every: int = 0  # every k-th turn runs a subagent branch first (0: never)
slo_ttft_ms: float = 8000.0  # time to first token target (0: none)
slo_itl_ms: float = 250.0  # mean inter-token latency target per request (0: none)
slo_e2e_ms: float = 0.0  # end-to-end target (0: none)
slo_attainment: float = 0.9  # share of requests that must meet every target
max_concurrency: int = 8  # the search stops here
sessions_min: int = 4  # sessions per level: max(concurrency, sessions_min)
level_budget_s: float = 90.0  # no new session starts after this many seconds in a level
cache_sessions: int = 2  # sessions per header variant in the cache accounting
slot_counts: list = [1, 2, 4, 8]  # -np options checked against memory
per_slot_ctx: int = 0  # context per slot for those options (0: what the sweep's sessions needed)
scale_out: bool = True  # also run 1 and 2 servers behind one LiteLLM model group
scale_out_levels: list = [1, 2, 4]  # concurrencies for the scale-out comparison
spec_acceptance: float = 0.75  # speculative decoding in the turn table: per-draft acceptance (0.75 with 3 drafts: upstream's MTP figure, ggml-org/llama.cpp#22673, not measured here)
spec_draft_n: int = 3  # tokens drafted per step (--spec-draft-n-max)
spec_draft_cost: float = 0.2  # a drafted token's time over a target token's (Qwen3.6-35B-A3B's MTP head: about 0.2 by bytes read)
label: str = "capacity"  # run label (the index charts trends per label)
output_dir: str = "auto"  # set by kvbook run, auto means a new folder under outputs/
""", tags=("parameters",)),
    code("""
from kvbook.notebook import capacity as cap
from kvbook.notebook import capacity_figures as cf
from kvbook.notebook import ops_support as ns
from kvbook.notebook.runner import write_summary
from kvbook.smoke.session import versions

ctx = ns.start_run(label, output_dir)
params = cap.capacity_params(
    model=model, server_args=server_args, speed_depths=speed_depths, speed_fit_depths=speed_fit_depths,
    prompt_scale=prompt_scale, turns=turns, turn_words=turn_words, max_tokens=max_tokens, reminder=reminder,
    subagent_every=subagent_every, slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms, slo_e2e_ms=slo_e2e_ms,
    slo_attainment=slo_attainment, max_concurrency=max_concurrency, sessions_min=sessions_min,
    level_budget_s=level_budget_s, cache_sessions=cache_sessions, slot_counts=slot_counts, per_slot_ctx=per_slot_ctx,
    scale_out=scale_out, scale_out_levels=scale_out_levels, spec_acceptance=spec_acceptance,
    spec_draft_n=spec_draft_n, spec_draft_cost=spec_draft_cost)
result = cap.measure_capacity(params, ctx.output_dir)
summary = cap.capacity_summary(params, result, label=label, build=versions()["llama_server"])
"""),
    md("## Speed model: predicted against measured"),
    code("ns.show_figure(cf.speed_figure(result.speed_rows))"),
    code("ns.show_table(result.speed_rows, 'held-out median error: prefill {prefill_pct}%, decode {decode_pct}%'.format(**result.speed_error))"),
    code("ns.show_table(result.bounds, 'decode upper bounds on the device presets (memory bandwidth / bytes read per token): bounds, not predictions')"),
    code("ns.show_table(result.turn_rows, f'a Claude-Code-sized turn ({result.client}: {result.full_prefix_tokens} tokens of system prompt and tools), predicted; speculative rows: estimates at the given acceptance, batch cost from this machine\\'s prefill speed (a lower bound)')"),
    md("## Latency and goodput against concurrency"),
    code("ns.show_figure(cf.latency_figure(result.levels, summary['goodput']['slo']))"),
    code("ns.show_figure(cf.goodput_figure(result.levels, result.max_ok))"),
    code("ns.show_table(result.levels, summary['verdict'] + (' (the search reached max_concurrency)' if result.capped else ''))"),
    md("## Prefix cache: every turn, every miss explained"),
    code("ns.show_figure(cf.cache_figure(result.cache_rows))"),
    code("ns.show_table([{'variant': v, **{k: s[k] for k in ('turns', 'hit_ratio_median', 'misses', 'misses_by_cause')}} for v, s in result.cache['by_variant'].items()], 'header: Claude Code as installed; noheader: CLAUDE_CODE_ATTRIBUTION_HEADER=0; crowded: more sessions than slots')"),
    code("ns.show_table([{'cause': c, 'fix': f} for c, f in result.cache['fixes'].items()], 'the causes seen and what fixes them')"),
    code("ns.show_table(result.cache_rows, 'per turn')"),
    md("## Memory: slot options against goodput, and the settings that go with them"),
    code("ns.show_table(result.slots, 'slot counts at the per-slot context these sessions need: planned memory, the predicted level (speed model) with that many agents (agents share the cores), and the goodput measured on this server with that many agents')"),
    code("ns.show_table([result.recommendation], 'recommendation')"),
    md("## Scale-out behind one LiteLLM model group"),
    code("ns.show_figure(cf.scale_out_figure(result.scale_out)) if result.scale_out else print('scale_out is off')"),
    code("ns.show_table(result.scale_out, 'goodput per level with 1 and with 2 servers') if result.scale_out else None"),
    code("write_summary(ctx.output_dir, {'run_id': ctx.run_id, **summary}); print(summary['verdict'])"),
])


def main() -> int:
    for name, nb in (("01-sizing.ipynb", SIZING), ("02-serve-and-smoke.ipynb", SMOKE), ("03-compare.ipynb", COMPARE),
                     ("04-claude-code.ipynb", CLAUDE_CODE),
                     ("05-capacity.ipynb", CAPACITY)):
        out = ROOT / "notebooks" / name
        nbf.write(nb, str(out))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
