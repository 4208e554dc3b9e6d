"""`kvbook demo` / `make demo`: the main job on the embedded defaults, then where the reports are."""

from __future__ import annotations

import sys
import time

from kvbook.notebook.index import build_index
from kvbook.notebook.runner import load_params, new_run_id, resolve_notebook, run_notebook
from kvbook.paths import outputs_dir, repo_root

STEPS = (
    ("01-sizing", "blog-post-m1max.yaml", "plan the blog post's flag set against a 64 GB M1 Max"),
    ("02-serve-and-smoke", "smoke-default.yaml",
     "launch llama-server + LiteLLM with SmolLM2 (tool template + prefill), smoke-test three routes"),
    ("02-serve-and-smoke", "smoke-contrast.yaml", "the contrast: SmolLM2's own template, no prefill"),
    ("03-compare", "compare-bundled.yaml",
     "compare the two bundled models: same flags and suite, 5 repetitions on two routes (~1.5 min)"),
    ("05-capacity", "capacity-demo.yaml",
     "capacity: speed model, Claude-Code-shaped sweep under an SLO, cache misses explained, LiteLLM scale-out (~1.5 min)"),
)


def run_demo(quiet: bool = False) -> int:
    started = time.monotonic()
    failures = 0
    reports = []
    for notebook_name, params_name, what in STEPS:
        print(f"kvbook demo: {what} ...", flush=True)
        notebook = resolve_notebook(notebook_name)
        params = load_params(repo_root() / "params" / "runs" / params_name)
        out = outputs_dir() / new_run_id(f"demo-{notebook.stem}")
        result = run_notebook(notebook, params, out, progress=not quiet)
        if result.ok:
            s = result.summary
            extra = f", checks {s['required_passed']}/{s['required_total']} passed" if "required_total" in s else ""
            print(f"  done: {'' if s.get('kind') == 'compare' else 'verdict '}{s.get('verdict', '-')}{extra}; "
                  f"report {result.html}")
            for failure in s.get("required_failures", [])[:3]:
                print(f"  failed check: {failure}")
        else:
            failures += 1
            print(f"  FAILED: {result.error}", file=sys.stderr)
        if result.html:
            reports.append(result.html)
    index = build_index(outputs_dir())
    print(f"kvbook demo: finished in {time.monotonic() - started:.0f} s; every process it started is stopped.")
    print(f"Open the reports: {index}")
    for report in reports:
        print(f"  {report}")
    print(f"Records: {outputs_dir() / 'results.jsonl'}")
    return 1 if failures else 0
