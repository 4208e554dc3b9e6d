"""`kvbook` command line. Every failure the user can cause prints one line and exits non-zero."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from kvbook.errors import BadInput, KvbookError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump); prog is the whole command ('kvbook',
    'kvbook plan', 'kvbook probe claude-code'), so the hint names the --help that explains the mistake."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"kvbook: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _subcommand(sub, name: str, summary: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does (summary + description) and shows examples to copy."""
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}",
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _cmd_plan(args: argparse.Namespace) -> int:
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import detect_host, local_request
    from kvbook.plan.api import plan
    from kvbook.plan.devices import resolve_device
    from kvbook.plan.flags import parse_server_args
    from kvbook.plan.summary import format_plan, plan_summary

    server_argv = list(args.server_args)
    if server_argv and server_argv[0] == "--":
        server_argv = server_argv[1:]
    if not server_argv:
        raise BadInput("give the llama-server command line after --, e.g. kvbook plan -- llama-server -m MODEL -c 8192")
    flags = parse_server_args(server_argv, os.environ)
    host = detect_host()
    device = resolve_device(preset=args.device, budget_gib=args.budget_gib, gpu_gib=args.gpu_gib,
                            host_gib=args.host_gib, device_budgets=args.device_budget or (), rpc_gib=args.rpc_gib,
                            endpoints=flags.rpc, host=host)
    from kvbook.ops.router import format_router, is_router, plan_router, router_summary

    if is_router(flags):  # router mode: each model as its own llama-server, and the --models-max worst case
        routed = plan_router(flags, device, os.environ)
        print(json.dumps(router_summary(routed), indent=1) if args.json else format_router(routed))
        return 1 if args.check and not routed.fits else 0
    request = local_request(flags, device, os.environ, host)  # the user's saved calibrations attached
    if args.solve:
        return _solve_and_print(args, request)
    planned = plan(request, fit_fallback=FIT_PARAMS)
    if args.json:
        print(json.dumps(plan_summary(planned), indent=1))
    else:
        print(format_plan(planned))
    if args.check and planned.verdict.value != "fits":
        print(f"kvbook plan --check: the plan is '{planned.verdict.value}' on {planned.device.name}", file=sys.stderr)
        return 1
    return 0


def _solve_and_print(args: argparse.Namespace, request) -> int:
    """`kvbook plan --solve`: the solver's ranked placements; the plan printed is the best one's (exit 1 when
    no placement starts)."""
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.plan.api import plan, solve
    from kvbook.plan.flags import parse_server_args, replace
    from kvbook.plan.summary import format_plan, format_solution, plan_summary, solution_entry

    if args.top < 1:
        raise BadInput(f"--top must be at least 1, got {args.top}")
    flags = request.flags
    solution = solve(request, args.objective, args.top)
    if solution.placements:
        best = parse_server_args(["llama-server", *solution.placements[0].argv], os.environ)
        planned = plan(request.with_flags(best), fit_fallback=FIT_PARAMS)
    else:
        auto_rpc = flags.rpc and flags.gpu_layers == "auto"
        planned = plan(request.with_flags(replace(flags, gpu_layers="0")) if auto_rpc else request,
                       fit_fallback=FIT_PARAMS)
    if args.json:
        print(json.dumps({**plan_summary(planned), "solver": solution_entry(solution, planned)}, indent=1))
    else:
        print(format_solution(solution, planned) + "\n\nbest placement's plan:\n" + format_plan(planned)
              if solution.placements else format_solution(solution, planned))
    if not solution.placements:
        print(f"kvbook plan --solve: no placement starts on {planned.device.name}", file=sys.stderr)
        return 1
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from kvbook.ops.components import model_path

    print(model_path(args.name))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from kvbook.interface import to_dict
    from kvbook.ops.components import doctor, doctor_lines

    rows = doctor()
    if args.json:
        print(json.dumps([{**to_dict(r), "path": str(r.path) if r.path else None} for r in rows], indent=1))
    else:
        print("\n".join(doctor_lines(rows)))
    return 0 if all(r.ok for r in rows) else 1


def _cmd_run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from kvbook.notebook.index import build_index
    from kvbook.notebook.runner import gate_failure, new_run_id, plan_jobs, regression_failure, run_notebook
    from kvbook.paths import outputs_dir

    jobs = plan_jobs(list(args.notebooks), list(args.params_files or []))
    if args.output_dir and len(jobs) > 1:
        raise BadInput(f"--output-dir names one run's folder, but this is {len(jobs)} runs; leave it out "
                       "(each run gets outputs/<run id>/)")
    failed: list[str] = []
    started = time.monotonic()
    for i, job in enumerate(jobs, start=1):
        if len(jobs) > 1:
            print(f"[{i}/{len(jobs)}] {job.name} ... ({time.monotonic() - started:.0f} s elapsed)", flush=True)
        out = Path(args.output_dir) if args.output_dir else outputs_dir() / new_run_id(job.label)
        t0 = time.monotonic()
        result = run_notebook(job.notebook, job.params, out, progress=not args.quiet)
        problem = gate_failure(result, fail_on_check=args.fail_on_check, fail_on_no_fit=args.fail_on_no_fit)
        if args.gate_regression and not problem:
            problem, basis = regression_failure(result, outputs_dir())
            print(f"regression gate: {basis}" if not problem else "regression gate: failed")
        print(f"report: {result.html or '(none)'}")
        print(f"summary: {result.output_dir / 'summary.json'}")
        if problem:
            failed.append(f"{job.name}: {problem}")
            print(f"kvbook: error: {problem}" if len(jobs) == 1 else f"  FAILED after {time.monotonic() - t0:.0f} s: {problem}",
                  file=sys.stderr, flush=True)
        elif len(jobs) > 1:
            print(f"  ok in {time.monotonic() - t0:.0f} s", flush=True)
    if len(jobs) > 1:
        if not args.output_dir:
            print(f"index: {build_index(outputs_dir())}")
        print(f"kvbook run: {len(jobs) - len(failed)}/{len(jobs)} ok in {time.monotonic() - started:.0f} s")
        for line in failed:
            print(f"kvbook: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kvbook.notebook.index import build_index
    from kvbook.paths import outputs_dir

    print(build_index(outputs_dir()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvbook.notebook.demo import run_demo

    return run_demo(quiet=args.quiet)


def _cmd_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvbook.claude.probe import format_table, probe_claude_code

    report = probe_claude_code(Path(args.agents) if args.agents else None, timeout_s=args.timeout)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_table(report))
    return 0


def _cmd_check_log(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvbook.ops.check_log import check_log, format_check, summary

    path = Path(args.log)
    if not path.is_file():
        raise BadInput(f"{args.log}: no such file (give the path of a saved llama.cpp log)")
    extra = list(args.server_args)
    if extra and not args.model:
        raise BadInput("flags after -- go with --model (for a log that has only the memory-breakdown table)")
    model = None
    if args.model:
        from kvbook.ops.check_log import model_of

        model = model_of(args.model)
    check = check_log(path.read_text(errors="replace"), model, extra)
    if args.save_calibration:
        from kvbook.ops.calibration import save_calibration

        print(f"saved: {save_calibration(check, source=str(path))}", file=sys.stderr)
    print(json.dumps(summary(check), indent=1) if args.json else format_check(check))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvbook.serve import stack as serve

    server_argv = list(args.server_args)
    if args.status or args.print_env:
        if server_argv:
            raise BadInput("--status and --print-env read the running stack; give -f or --name, no command line")
        name = args.name or (serve.spec_from_params(Path(args.params_file)).name if args.params_file else None)
        if not name:
            raise BadInput("which stack? give -f params/serve/NAME.yaml or --name NAME")
        state = serve.read_state(name)
        if args.print_env:
            print(serve.print_env(state))
            return 0
        lines, ok = serve.status_lines(state)
        print("\n".join(lines))
        return 0 if ok else 1
    override = {"host": args.host, "port": args.port, "allow_remote": args.allow_remote or None,
                "device": args.device, "restart": False if args.no_restart else None, "smoke_every_s": args.smoke_every}
    if args.params_file and server_argv:
        raise BadInput("give a params file (-f) or a llama-server command line after --, not both")
    if args.params_file:
        spec = serve.spec_from_params(Path(args.params_file), **override, **({"name": args.name} if args.name else {}))
    else:
        spec = serve.spec_from_command_line(server_argv, args.name, **override)
    settings = Path(args.claude_settings).expanduser() if args.claude_settings else None
    return serve.Session(spec, force=args.force, claude_settings=settings).run()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvbook", description="Plan, launch and check llama-server behind LiteLLM. "
                     "Run 'kvbook COMMAND --help' for what each command does, with examples.",
                     epilog="examples:\n  kvbook plan --device rtx-4090 -- llama-server -m qwen3.6-35b-a3b -c 65536 -fa on"
                            "\n  kvbook run -f params/runs/smoke-default.yaml\n  kvbook doctor",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _subcommand(sub, "plan", "predict what a llama-server command line allocates and whether it fits",
                    "Reads the command line as the pinned llama-server does, plans every device's weights, caches, "
                    "compute and host growth against its budget, and prints the verdict, the largest context that "
                    "starts and alternatives. Nothing is started; -m takes a GGUF path or URL, a preset "
                    "(params/models/) or a config.json.",
                    ["kvbook plan -- llama-server -m model.gguf -c 32768 -np 2 -fa on",
                     "kvbook plan --device rtx-4090 -- llama-server -m qwen3.6-35b-a3b -c 65536 -ngl 99 --n-cpu-moe 20",
                     "kvbook plan --json --device m1-max-64 -- llama-server -m qwen3.6-35b-a3b -c 262144",
                     "kvbook plan --solve --device rtx-4090-host-64 -- llama-server -m gpt-oss-120b -c 65536"])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", help="device preset id (params/devices) or 'this-machine' (default)")
    where.add_argument("--budget-gib", type=float,
                       help="a custom unified budget in GiB: one pool holds everything (Apple silicon, CPU only)")
    where.add_argument("--gpu-gib", type=float, help="a custom discrete GPU of this many GiB (with --host-gib)")
    p.add_argument("--host-gib", type=float, help="with --gpu-gib, --device-budget or --device: host RAM in GiB "
                                                  "(default: the preset's, else this machine's)")
    p.add_argument("--device-budget", action="append", metavar="NAME=SIZE",
                   help="a device's budget by llama.cpp's name, repeatable or comma-separated (CUDA0=24GiB, "
                        "CUDA1=22.5GiB, RPC0=20000MiB, Metal=48GiB, CPU=64GiB): with --device it overrides that "
                        "preset's device; without, the names are the devices; NAME=SIZE@MAX: tensors over MAX stay on "
                        "the CPU (a Vulkan device without 64-bit indexing: its maxStorageBufferRange)")
    p.add_argument("--rpc-gib", help="with llama-server --rpc: each RPC server's budget in GiB, comma-separated "
                                     "(default: this machine's RAM, what a loopback rpc-server reports)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless the plan fits (for scripts: 'tight' and 'does not fit' both fail)")
    p.add_argument("--solve", action="store_true",
                   help="search placements (-ngl, --n-cpu-moe, -ts, -c, the KV cache type) the given flags leave open "
                        "and print the ranked ones that start, with every rejected option and why")
    p.add_argument("--objective", choices=("max-context", "fastest-decode"), default="max-context",
                   help="with --solve: the largest context at the chosen slots (default), or the fewest bytes read "
                        "from host RAM per generated token")
    p.add_argument("--top", type=int, default=5, help="with --solve: how many placements to print (default 5)")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="-- llama-server -m MODEL [flags]")
    p.set_defaults(func=_cmd_plan)

    m = _subcommand(sub, "models", "the bundled models", "kvbook ships two small GGUFs (smollm2-135m, "
                    "gemma3-270m) for its tests and demo; 'models path NAME' prints where one is.",
                    ['kvbook plan -- llama-server -m "$(kvbook models path gemma3-270m)" -c 8192'])
    msub = m.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    mp = _subcommand(msub, "path", "print a bundled model's local GGUF path", "The file is sha256-checked at set-up.",
                     ["kvbook models path smollm2-135m"])
    mp.add_argument("name", help="smollm2-135m or gemma3-270m")
    mp.set_defaults(func=_cmd_models)

    r = _subcommand(sub, "run", "execute notebooks headless with params files; write HTML and summary.json per run",
                    "Each notebook x params file runs with papermill into outputs/<run id>/ (executed notebook, "
                    "HTML report, summary.json). Exits non-zero when a notebook fails, a required smoke check "
                    "fails or a plan does not fit: a CI gate.",
                    ["kvbook run -f params/runs/sizing-default.yaml",
                     "kvbook run -f params/runs/blog-post-m1max.yaml -f params/runs/smoke-default.yaml",
                     "kvbook run 01-sizing -f my-params.yaml --output-dir /tmp/sizing"])
    r.add_argument("notebooks", nargs="*", help="notebook paths or names in notebooks/ (e.g. 01-sizing); "
                   "optional when every params file names its notebook")
    r.add_argument("-f", "--params-file", dest="params_files", action="append", metavar="PARAMS.yaml",
                   help="YAML file of notebook parameters; repeat for several (notebooks x files)")
    r.add_argument("--output-dir", help="where to write (default: outputs/<run id>/)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--no-fail-on-check", dest="fail_on_check", action="store_false",
                   help="exit 0 even when a required smoke check fails")
    r.add_argument("--no-fail-on-no-fit", dest="fail_on_no_fit", action="store_false",
                   help="exit 0 even when a plan does not fit")
    r.add_argument("--gate-regression", action="store_true",
                   help="fail when tokens/s, TTFT, pass rate or goodput is worse than the median of the last 5 runs "
                        "of the same label and model by more than their noise (at least 10%%)")
    r.set_defaults(func=_cmd_run)

    dm = _subcommand(sub, "demo", "plan the post's flag set, launch both servers, smoke-test, write reports",
                     "What 'make demo' runs: sizing, serve-and-smoke with its failing contrast, the comparison of "
                     "the bundled models and a short capacity sweep, then where the reports are.",
                     ["kvbook demo", "kvbook demo --quiet"])
    dm.add_argument("--quiet", action="store_true", help="no progress bars")
    dm.set_defaults(func=_cmd_demo)

    rp = _subcommand(sub, "report", "build outputs/index.html listing every run",
                     "One page with every run's verdict, date and report link, and trend charts of tokens/s, time "
                     "to first token, pass rate and goodput per label and model. Prints the page's path.",
                     ["kvbook report", "KVBOOK_OUTPUTS=/srv/kvbook-runs kvbook report"])
    rp.set_defaults(func=_cmd_report)

    pr = _subcommand(sub, "probe", "ask an installed client which model IDs it really sends",
                     "The IDs a LiteLLM config must route; 'probe claude-code' asks Claude Code.",
                     ["kvbook probe claude-code"])
    prsub = pr.add_subparsers(dest="probe_command", required=True, parser_class=_Parser)
    pc = _subcommand(prsub, "claude-code", "run claude -p against a local recording endpoint, once per alias and agent",
                     "Uses a throwaway HOME and a dummy key; no model is needed. Reports the model ID that arrives "
                     "for each --model alias, each agent file and each subagent.",
                     ["kvbook probe claude-code", "kvbook probe claude-code --agents .claude/agents --json"])
    pc.add_argument("--agents", help="folder of agent .md files to probe with --agent and as subagents")
    pc.add_argument("--json", action="store_true", help="print the probe report as JSON")
    pc.add_argument("--timeout", type=float, default=90.0, help="seconds each claude run may take (default 90)")
    pc.set_defaults(func=_cmd_probe)

    cl = _subcommand(sub, "check-log", "compare a llama.cpp log's buffers per device with kvbook's plan of the same run",
                     "Reads the model, flags and devices from the log itself, plans the same run and prints "
                     "logged / planned MiB per device and buffer.",
                     ["kvbook check-log server.log",
                      "kvbook check-log breakdown.log --model model.gguf -- -c 32768 -ngl 99"])
    cl.add_argument("log", help="a saved llama-server / llama-cli / llama-bench / llama-fit-params log (-lv 4 or -v)")
    cl.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cl.add_argument("--save-calibration", action="store_true",
                    help="keep this log's compute buffers as a calibration that later plans for its backend and model "
                         "family use (labelled as such)")
    cl.add_argument("--model", help="for a log without print_info lines (only the breakdown table): the model, a GGUF "
                                    "path, a preset, or another log of the same model file, with the run's "
                                    "llama-server flags after --")
    cl.set_defaults(server_args=[])  # what follows `--` (main() takes it off before argparse sees it)
    cl.set_defaults(func=_cmd_check_log)

    sv = _subcommand(sub, "serve", "plan, then run llama-server(s) and LiteLLM in the foreground for daily use, "
                     "wired for Claude Code; Ctrl-C stops everything",
                     "Plans every llama-server first (refuses what does not fit unless --force), starts the RPC servers "
                     "it names, each llama-server and LiteLLM, prints one ready block and runs until Ctrl-C or SIGTERM, "
                     "then stops everything. Logs, config and key in outputs/serve/NAME/.",
                     ["kvbook serve -f params/serve/smollm2.yaml --claude-settings ~/.claude/settings.json",
                      "kvbook serve --name qwen -- llama-server -m model.gguf -c 65536 -np 2 -fa on",
                      "kvbook serve -f params/serve/smollm2.yaml --status",
                      "kvbook serve -f params/serve/smollm2.yaml --print-env"])
    sv.add_argument("-f", "--params-file", help="params/serve/NAME.yaml: models, slots, ports (or a command line after --)")
    sv.add_argument("--name", help="the stack's name (its folder outputs/serve/NAME); default: the params file's")
    sv.add_argument("--force", action="store_true", help="start even when the plan says it will not fit")
    sv.add_argument("--host", help="LiteLLM's bind address (default 127.0.0.1; another needs --allow-remote)")
    sv.add_argument("--port", type=int, help="LiteLLM's port (default 4000; 0: a free one)")
    sv.add_argument("--allow-remote", action="store_true",
                    help="let LiteLLM (always behind its key) listen on a non-loopback address")
    sv.add_argument("--device", help="plan on this params/devices preset instead of this machine")
    sv.add_argument("--no-restart", action="store_true", help="stop everything when a llama-server exits "
                                                              "(default: restart it with backoff)")
    sv.add_argument("--smoke-every", type=float, help="seconds between smoke requests through LiteLLM (0: only at start)")
    sv.add_argument("--claude-settings", metavar="PATH",
                    help="also merge the Claude Code env into this settings.json (e.g. ~/.claude/settings.json)")
    sv.add_argument("--print-env", action="store_true", help="print the running stack's Claude Code env as shell exports")
    sv.add_argument("--status", action="store_true", help="show the running stack's processes, plans and last smoke check")
    sv.set_defaults(server_args=[])
    sv.set_defaults(func=_cmd_serve)

    d = _subcommand(sub, "doctor", "list every component with version, path and a fix hint",
                    "Python, llama-server and its build, a one-token decode check of every llama-server kvbook may "
                    "use, LiteLLM, Claude Code, Chromium and the bundled models. Exits 1 when one is missing.",
                    ["kvbook doctor", "kvbook doctor --json"])
    d.add_argument("--json", action="store_true", help="print the components as JSON")
    d.set_defaults(func=_cmd_doctor)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command line parsed into args: `kvbook probe claude-code` -> that subcommand's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] in (["check-log"], ["serve"]) and "--" in argv:  # the run's llama-server flags, options after the log allowed
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the subcommand that got them, so the hint names its --help
            _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.server_args = extra
    except SystemExit as exc:  # usage errors and --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except KvbookError as exc:
        print(f"kvbook: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvbook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
