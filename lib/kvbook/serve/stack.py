"""`kvbook serve`: the planned llama-server(s) (and the RPC servers they name) behind LiteLLM, wired for Claude Code, in
the foreground for daily use until Ctrl-C or SIGTERM; then everything it started is stopped. A killed `kvbook serve` takes its
children with it (each gets SIGTERM from the kernel: PR_SET_PDEATHSIG, set in kvbook/ops/procs.py).

Everything lives in one folder (outputs/serve/NAME/): the logs, the LiteLLM config and key (mode 0600), the Claude
Code settings, and state.json, which `kvbook serve --status` and `--print-env` read."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvbook.errors import BadInput, KvbookError, ServerError
from kvbook.interface import MiB, Plan, Verdict
from kvbook.ops.procs import LOOPBACK, ManagedProcess, check_host, describe_exit, free_port
from kvbook.ops.rpc import RpcHost, parse_rpc_hosts

DEFAULT_LITELLM_PORT = 4000  # LiteLLM's own default
DEFAULT_LLAMA_PORT = 8181  # the first llama-server; the next ones count up (8080 is left to the user's own)
DEFAULT_SLOTS = ("opus", "sonnet", "haiku")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEYS = {"name", "host", "port", "allow_remote", "device", "restart", "smoke_every_s", "models"}
_MODEL_KEYS = {"name", "model", "server_args", "port", "slots", "replicas", "rpc_servers"}


@dataclass(frozen=True)
class ServedModel:
    """One llama-server: its LiteLLM model name, its command line, its port (0: a free one), the Claude Code
    slots routed to it, and the ggml-rpc-servers kvbook starts for it."""

    name: str
    argv: tuple[str, ...]  # "llama-server", "-m", PATH, flags...
    port: int = 0
    slots: tuple[str, ...] = ()
    rpc: tuple[RpcHost, ...] = ()


@dataclass(frozen=True)
class ServeSpec:
    """What one `kvbook serve` runs: its llama-servers (replicas of a model share its name: one LiteLLM model
    group), LiteLLM's bind address and port, and the options of the run."""

    name: str
    models: tuple[ServedModel, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_LITELLM_PORT
    allow_remote: bool = False
    device: str | None = None  # a params/devices preset to plan on (default: this machine)
    restart: bool = True
    smoke_every_s: float = 300.0


def _model_file(value: str, where: str) -> str:
    from kvbook.ops.components import MODELS, model_path

    if value in MODELS:
        return str(model_path(value))
    if Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    raise BadInput(f"{where}: {value!r} is neither a bundled model ({', '.join(sorted(MODELS))}) nor a GGUF file")


def _as_int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInput(f"{where}: must be a whole number {low}..{high}, got {value!r}")
    return value


def _slots(value: Any, where: str) -> tuple[str, ...]:
    from kvbook.claude.settings import SLOTS

    if not isinstance(value, list) or not all(isinstance(s, str) and s in SLOTS for s in value):
        raise BadInput(f"{where}: give a list of Claude Code slots out of {', '.join(SLOTS)}")
    return tuple(value)


def spec_from_params(path: Path, **override: Any) -> ServeSpec:
    """A params/serve/*.yaml file as a ServeSpec (command-line options in `override` win); one line on bad input."""
    from kvbook.yamlio import read_yaml

    doc = read_yaml(path, "the serve params file")
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping with a 'models' list")
    extra = sorted(set(doc) - _KEYS)
    if extra:
        raise BadInput(f"{path}: unknown key {extra[0]!r}; keys: {', '.join(sorted(_KEYS))}")
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise BadInput(f"{path}: 'models' must be a non-empty list of {{name, model, server_args, port, slots}}")
    models: list[ServedModel] = []
    for i, e in enumerate(entries):
        where = f"{path}: models[{i}]"
        if not isinstance(e, dict) or "model" not in e:
            raise BadInput(f"{where}: needs at least 'model' (a bundled model name or a GGUF path)")
        bad = sorted(set(e) - _MODEL_KEYS)
        if bad:
            raise BadInput(f"{where}: unknown key {bad[0]!r}; keys: {', '.join(sorted(_MODEL_KEYS))}")
        args = e.get("server_args", [])
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise BadInput(f"{where}: server_args must be a list of llama-server flags")
        name = str(e.get("name") or Path(str(e["model"])).stem)
        replicas = _as_int(e.get("replicas", 1), f"{where}.replicas", 1, 16)
        port = _as_int(e.get("port", 0), f"{where}.port", 0, 65535)
        if replicas > 1 and port:
            raise BadInput(f"{where}: replicas take consecutive ports from 'port'; give port 0 or one replica")
        argv = ("llama-server", "-m", _model_file(str(e["model"]), where), *map(str, args))
        rpc = parse_rpc_hosts(e.get("rpc_servers") or [])
        slots = _slots(e.get("slots", list(DEFAULT_SLOTS) if i == 0 else []), f"{where}.slots")
        models += [ServedModel(name, argv, port + r if port else 0, slots, rpc) for r in range(replicas)]
    spec = ServeSpec(
        name=str(doc.get("name") or path.stem), models=tuple(models), host=str(doc.get("host", "127.0.0.1")),
        port=_as_int(doc.get("port", DEFAULT_LITELLM_PORT), f"{path}: port", 0, 65535),
        allow_remote=bool(doc.get("allow_remote", False)), device=doc.get("device"),
        restart=bool(doc.get("restart", True)), smoke_every_s=float(doc.get("smoke_every_s", 300.0)))
    return check_spec(replace(spec, **{k: v for k, v in override.items() if v is not None}))


def spec_from_command_line(argv: Sequence[str], name: str | None = None, **override: Any) -> ServeSpec:
    """`kvbook serve -- llama-server -m MODEL [flags]`: one model, every default slot routed to it."""
    from kvbook.plan.flags import parse_server_args

    args = list(argv)
    if not args:
        raise BadInput("give a params file (-f params/serve/NAME.yaml) or a llama-server command line after --")
    if args[0].startswith("-") or not Path(args[0]).name.startswith("llama-server"):
        args = ["llama-server", *args]
    flags = parse_server_args(args, os.environ)
    label = name or (Path(flags.model).stem.lower() if flags.model else "local")  # -hf: name it with --name
    spec = ServeSpec(name=label, models=(ServedModel(label, tuple(args), 0, DEFAULT_SLOTS),))
    return check_spec(replace(spec, **{k: v for k, v in override.items() if v is not None}))


def check_spec(spec: ServeSpec) -> ServeSpec:
    """Names, ports, flags kvbook owns, loopback unless allowed: one line for the first problem."""
    from kvbook.ops.llama_server import _OWNED

    if not _NAME.fullmatch(spec.name):
        raise BadInput(f"serve name {spec.name!r}: letters, digits, '.', '_' or '-' (it names the folder)")
    check_host(spec.host, spec.allow_remote)
    ports = [m.port for m in spec.models if m.port] + ([spec.port] if spec.port else [])
    dupes = sorted({p for p in ports if ports.count(p) > 1})
    if dupes:
        raise BadInput(f"port {dupes[0]} is given to two processes")
    for m in spec.models:
        if not _NAME.fullmatch(m.name) or m.name.startswith("claude-"):
            raise BadInput(f"model name {m.name!r}: letters, digits, '.', '_' or '-', not starting with claude-")
        owned = [a for a in m.argv if a.split("=", 1)[0] in _OWNED - {"-v", "--verbose"}]
        if owned:
            raise BadInput(f"{m.name}: {owned[0]} is set by kvbook serve (use the params file's port / host)")
        if m.rpc and any(a == "--rpc" or a.startswith("--rpc=") for a in m.argv):
            raise BadInput(f"{m.name}: RPC devices twice: name running servers with --rpc, or let kvbook start them "
                           "with rpc_servers, not both")
    if sum(1 for m in spec.models if m.rpc) > 1:
        raise BadInput("rpc_servers on more than one model: the servers' budgets are not planned together yet")
    owners: dict[str, str] = {}
    for m in spec.models:
        for s in m.slots:
            if owners.setdefault(s, m.name) != m.name:
                raise BadInput(f"Claude Code slot {s!r} is given to both {owners[s]} and {m.name}")
    if spec.smoke_every_s < 0:
        raise BadInput(f"smoke_every_s must be 0 (off) or positive, got {spec.smoke_every_s}")
    return spec


def serve_dir(name: str) -> Path:
    """The folder of a served stack: logs, config, key, settings, state."""
    from kvbook.paths import outputs_dir

    return outputs_dir() / "serve" / name


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class StackPlan:
    """Each llama-server's plan, and the pools' sums: several servers share the same devices. Like one plan, a
    pool does not fit when the servers' start allocations exceed it, and is tight when their run-time growth
    (each server's own --cache-ram prompt cache and checkpoints) could."""

    plans: tuple[Plan, ...]
    need: tuple[tuple[str, int, int, int], ...]  # (pool, start bytes of all servers, with run-time growth, budget)

    @property
    def fits(self) -> bool:
        return all(p.verdict is not Verdict.DOES_NOT_FIT for p in self.plans) and all(s <= b for _, s, _, b in self.need)

    def tight(self) -> list[str]:
        """Pools whose summed run-time growth could exceed them (said in the ready block, not refused)."""
        return [f"{pool}: {n / 2**30:.2f} GiB with run-time growth (prompt caches) of {b / 2**30:.2f} GiB"
                for pool, s, n, b in self.need if s <= b < n and len(self.plans) > 1]

    def refusal(self) -> str:
        over = [(pool, s, b) for pool, s, _, b in self.need if s > b]
        if len(self.plans) > 1 and over:
            pool, need, b = over[0]
            return (f"the {len(self.plans)} llama-servers together need {need / 2**30:.2f} GiB on {pool} at start, "
                    f"which has {b / 2**30:.2f} GiB")
        bad = next(p for p in self.plans if p.verdict is Verdict.DOES_NOT_FIT)
        worst = max(u.need_bytes for u in bad.pools) / 2**30
        return (f"{bad.model.name}: the plan says it will not fit ({worst:.2f} GiB needed on {bad.device.name}); "
                f"largest context that fits: {bad.max_ctx}")


def plan_stack(spec: ServeSpec, rpc_endpoints: Sequence[Sequence[str]]) -> StackPlan:
    """Plan every llama-server against the same devices (this machine or spec.device) and sum their pools."""
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import local_request
    from kvbook.plan.api import plan
    from kvbook.plan.devices import resolve_device
    from kvbook.plan.flags import parse_server_args

    device = resolve_device(preset=spec.device) if spec.device else None
    plans = []
    for m, eps in zip(spec.models, rpc_endpoints):
        argv = [*m.argv, "--rpc", ",".join(eps)] if eps else list(m.argv)
        plans.append(plan(local_request(parse_server_args(argv, os.environ), device), fit_fallback=FIT_PARAMS))
    sums: dict[str, list[int]] = {}
    for p in plans:
        for u in p.pools:
            entry = sums.setdefault(u.pool, [0, 0, u.budget_bytes])
            entry[0] += u.need_bytes - u.host_extras_bytes
            entry[1] += u.need_bytes
    return StackPlan(tuple(plans), tuple((k, start, total, budget) for k, (start, total, budget) in sums.items()))


# ---------------------------------------------------------------- the LiteLLM side


def master_key(folder: Path) -> tuple[str, Path]:
    """The stack's LiteLLM key: $LITELLM_MASTER_KEY, else the one kept in folder/litellm.key (created once, mode
    0600), so a settings.json written once stays valid across restarts."""
    from kvbook.ops.litellm import new_master_key

    path = folder / "litellm.key"
    key = os.environ.get("LITELLM_MASTER_KEY")
    if key:
        if not key.startswith("sk-"):
            raise BadInput("LITELLM_MASTER_KEY must start with 'sk-'")
        return key, Path("$LITELLM_MASTER_KEY")
    if path.is_file():
        key = path.read_text().strip()
        if key.startswith("sk-"):
            return key, path
    key = new_master_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key, path


def stack_routes(spec: ServeSpec, urls: Sequence[str], max_input: Sequence[int],
                 slot_ids: dict[str, str]) -> tuple[Any, ...]:
    """Each model under its own name, the probed Claude Code IDs of its slots, and claude-* (any other ID the
    client sends) to the first model; replicas of a model form one group. Each entry carries the plan's
    max_input_tokens."""
    from kvbook.ops.litellm import ANTHROPIC, OPENAI, VIA_OPENAI, Route

    routes = []
    for m, url, mx in zip(spec.models, urls, max_input):
        routes += [Route(m.name, ANTHROPIC, m.name, url, mx), Route(m.name + VIA_OPENAI, OPENAI, m.name, url, mx)]
        routes += [Route(slot_ids[s], ANTHROPIC, m.name, url, mx) for s in m.slots if s in slot_ids]
    first = spec.models[0]
    routes += [Route("claude-*", ANTHROPIC, first.name, url, mx)
               for m, url, mx in zip(spec.models, urls, max_input) if m.name == first.name]
    seen: dict[str, str] = {}
    for r in routes:
        if seen.setdefault(r.model_name, r.upstream_model) != r.upstream_model:
            raise BadInput(f"Claude Code sends {r.model_name} for two slots routed to different models "
                           f"({seen[r.model_name]}, {r.upstream_model}); give both slots to one model")
    return tuple(dict.fromkeys(routes))


# ---------------------------------------------------------------- running


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: leave the loop and stop everything."""


def _on_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


@dataclass
class _Server:
    model: ServedModel
    process: ManagedProcess
    plan: Plan
    restarts: int = 0
    next_try: float = 0.0
    up_since: float = field(default_factory=time.monotonic)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def smoke(base_url: str, key: str, model: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """One short /v1/messages request through LiteLLM: passed, the reason, the seconds it took."""
    import requests

    start = time.monotonic()
    try:
        resp = requests.post(f"{base_url}/v1/messages", timeout=timeout_s, headers={"x-api-key": key},
                             json={"model": model, "max_tokens": 8,
                                   "messages": [{"role": "user", "content": "Say ok."}]})
        ok = resp.status_code == 200 and bool(resp.json().get("content"))
        why = "answered" if ok else f"HTTP {resp.status_code}: {resp.text[:160]}"
    except (requests.RequestException, ValueError) as exc:
        ok, why = False, f"{type(exc).__name__}: {str(exc)[:160]}"
    return {"time": _now(), "model": model, "passed": ok, "reason": why, "seconds": round(time.monotonic() - start, 2)}


def _logged(server: _Server) -> dict[str, Any]:
    from kvbook.ops.logparse import parse_log

    try:
        got = parse_log(server.process.spec.log_path.read_text(errors="replace"))
    except OSError:
        return {}
    return {"n_ctx_seq": got.n_ctx_seq, "kv_mib": round(sum(c.total_mib for c in got.caches), 2),
            "compute_mib": round(sum(got.compute_mib.values()), 2)}


def _planned(p: Plan) -> dict[str, Any]:
    from kvbook.plan.summary import plan_summary

    s = plan_summary(p)
    return {"verdict": p.verdict.value, "n_ctx_seq": s["n_ctx_seq"], "kv_mib": round(s["kv_bytes"] / MiB, 2),
            "compute_mib": round(s["compute_bytes"] / MiB, 2), "total_mib": round(s["total_bytes"] / MiB, 2),
            "max_input_tokens": p.litellm_max_input_tokens}


class Session:
    """One running stack; `run()` blocks until a stop signal, then stops everything it started."""

    def __init__(self, spec: ServeSpec, *, force: bool = False, claude_settings: Path | None = None,
                 out: Callable[[str], None] | None = None):
        self.spec, self.force, self.claude_settings = spec, force, claude_settings
        self.folder = serve_dir(spec.name)
        self.out = out or (lambda line: print(line, flush=True))
        self.servers: list[_Server] = []
        self.proxy: Any = None
        self.rpc: list[ManagedProcess] = []
        self.state: dict[str, Any] = {}

    def log(self, line: str) -> None:
        """A line for the user (stderr) and the folder's serve.log."""
        print(f"kvbook serve: {line}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError), (self.folder / "serve.log").open("a") as fh:
            fh.write(f"{_now()} {line}\n")

    # -- start

    def _ports(self) -> tuple[list[int], list[list[str]]]:
        """Every port decided before planning (0: a free one now), so the plan sees the real --rpc endpoints."""
        ports, endpoints = [], []
        taken: set[int] = set()
        for i, m in enumerate(self.spec.models):
            port = m.port or self._free(DEFAULT_LLAMA_PORT + i if self.spec.port == DEFAULT_LITELLM_PORT else 0, taken)
            ports.append(port)
            endpoints.append([f"{h.host}:{h.port or self._free(0, taken, h.host)}" for h in m.rpc])
        return ports, endpoints

    @staticmethod
    def _free(wanted: int, taken: set[int], host: str = "127.0.0.1") -> int:
        from kvbook.ops.procs import port_in_use

        port = wanted if wanted and wanted not in taken and not port_in_use(host, wanted) else 0
        while not port or port in taken:
            port = free_port(host)
        taken.add(port)
        return port

    def start(self) -> None:
        from kvbook.claude.settings import claude_env_block, probed_slot_ids
        from kvbook.ops.llama_server import start_llama_server
        from kvbook.ops.litellm import start_proxy
        from kvbook.ops.rpc import start_rpc_server
        from kvbook.paths import cache_dir

        spec = self.spec
        running = None
        if (self.folder / "state.json").exists():
            with contextlib.suppress(BadInput):  # a stale state (its serve was killed) is overwritten
                running = read_state(spec.name)
        if running:
            raise BadInput(f"kvbook serve {spec.name!r} is already running (pid {running['pid']}); "
                           f"see kvbook serve --name {spec.name} --status")
        from kvbook.claude.settings import read_settings
        from kvbook.ops.procs import port_in_use

        if self.claude_settings:
            read_settings(self.claude_settings)  # a file that cannot be merged into: refused before anything starts

        busy = [f"{h}:{p}" for h, p in [(spec.host, spec.port), *(("127.0.0.1", m.port) for m in spec.models)]
                if p and port_in_use(h if h not in ("0.0.0.0", "::") else "127.0.0.1", p)]
        if busy:
            raise BadInput(f"{busy[0]} is already in use; give another port (--port, or the params file's), "
                           "nothing was started")
        ports, endpoints = self._ports()
        stack = plan_stack(spec, endpoints)
        if not stack.fits:
            if not self.force:
                raise BadInput(f"{stack.refusal()}; nothing was started (--force launches anyway)")
        slots = tuple(dict.fromkeys(s for m in spec.models for s in m.slots))
        slot_ids: dict[str, str] = {}
        client = ""
        if slots:
            try:
                slot_ids, version, ran = probed_slot_ids(slots, cache_dir() / "claude-probe.json")
                client = f"Claude Code {version}" + (" (probed now)" if ran else " (probe cached)")
            except KvbookError as exc:
                if self.claude_settings:
                    raise
                client = f"no probe ({exc}); only claude-* routes"
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.log"):
            old.replace(old.with_name(old.name + ".1"))
        if not stack.fits:
            self.log(f"--force: {stack.refusal()}; starting anyway")
        for line in stack.tight():
            self.log(f"warning: the servers together are tight on {line}")
        key, key_path = master_key(self.folder)
        for m, eps in zip(spec.models, endpoints):
            for h, ep in zip(m.rpc, eps):
                if h.host not in LOOPBACK:
                    self.log(f"warning: ggml-rpc-server on {ep} has no authentication")
                self.rpc.append(start_rpc_server(self.folder, host=h.host, port=int(ep.rsplit(":", 1)[1]),
                                                 threads=h.threads, allow_remote=spec.allow_remote))
        for m, port, eps, p in zip(spec.models, ports, endpoints, stack.plans):
            argv = [*m.argv, "--rpc", ",".join(eps)] if eps else list(m.argv)
            server = start_llama_server(argv, run_dir=self.folder, port=port, plan_first=False, ready_timeout_s=300)
            self.servers.append(_Server(m, server.process, p))
            self.log(f"llama-server {m.name} ready on {server.base_url} (pid {server.process.pid})")
        routes = stack_routes(spec, [s.process.base_url for s in self.servers],
                              [s.plan.litellm_max_input_tokens for s in self.servers], slot_ids)
        port = self._free(spec.port, set()) if spec.port == 0 else spec.port
        self.proxy = start_proxy(routes, run_dir=self.folder, host=spec.host, port=port, master_key=key,
                                 allow_remote=spec.allow_remote)
        base = self.proxy.base_url if spec.host not in ("0.0.0.0", "::") else f"http://127.0.0.1:{port}"
        n_ctx_seq = _planned(self.servers[0].plan)["n_ctx_seq"]  # the first model's: the main conversation's
        env = claude_env_block(base, key, n_ctx_seq, slot_ids)
        from kvbook.claude.settings import merge_settings

        settings = merge_settings(self.folder / "claude-settings.json", env)
        if self.claude_settings:
            merge_settings(self.claude_settings, env)
        self.state = {
            "name": spec.name, "pid": os.getpid(), "started": _now(), "folder": str(self.folder),
            "litellm": {"url": base, "pid": self.proxy.process.proc.pid, "port": port,
                        "config": str(self.proxy.config_path), "log": str(self.proxy.process.spec.log_path),
                        "key_file": str(key_path)},
            "rpc": [{"endpoint": f"{p.spec.host}:{p.spec.port}", "pid": p.pid, "log": str(p.spec.log_path)}
                    for p in self.rpc],
            "claude": {"client": client, "slot_ids": slot_ids, "settings": str(settings),
                       "user_settings": str(self.claude_settings) if self.claude_settings else None,
                       "n_ctx_seq": n_ctx_seq},
            "env": {k: v for k, v in env.items() if k != "ANTHROPIC_AUTH_TOKEN"},
            "smoke": None, "restarts": [],
        }
        self._server_state()
        self.state["smoke"] = smoke(base, key, spec.models[0].name)
        self._save()
        self._ready(base, key_path, settings, slot_ids, client, n_ctx_seq)

    def _server_state(self) -> None:
        self.state["servers"] = [
            {"model": s.model.name, "url": s.process.base_url, "port": s.process.spec.port,
             "pid": s.process.proc.pid if s.process.proc else None, "log": str(s.process.spec.log_path),
             "argv": list(s.process.spec.argv), "plan": _planned(s.plan), "logged": _logged(s), "restarts": s.restarts}
            for s in self.servers]

    def _save(self) -> None:
        path = self.folder / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(path)

    def _ready(self, base: str, key_path: Path, settings: Path, slot_ids: dict[str, str], client: str,
               n_ctx_seq: int) -> None:
        from kvbook.claude.settings import AUTO_COMPACT_FLOOR

        lines = [f"kvbook serve: {self.spec.name} is ready; logs, config and state in {self.folder}"]
        for s in self.servers:
            p = self.state["servers"][self.servers.index(s)]
            lines.append(f"  llama-server {s.model.name:<14} {s.process.base_url}  pid {p['pid']}  plan {p['plan']['verdict']}, "
                         f"{p['plan']['n_ctx_seq']} tokens per slot (logged {p['logged'].get('n_ctx_seq')})")
        for r in self.rpc:
            lines.append(f"  ggml-rpc-server          {r.spec.host}:{r.spec.port}  pid {r.pid}")
        lines.append(f"  LiteLLM                   {base}  pid {self.proxy.process.proc.pid}  key in {key_path}")
        names = sorted({s.model.name for s in self.servers})
        routed = ", ".join(f"{mid} ({slot})" for slot, mid in slot_ids.items())
        slots = f"{client}: {routed}" if routed else (client or "no Claude Code slots in the params file")
        lines.append(f"  models: {', '.join(names)}; {slots}; any other claude-* -> {self.spec.models[0].name}")
        sm = self.state["smoke"]
        lines.append(f"  smoke check through LiteLLM: {'passed' if sm['passed'] else 'FAILED: ' + sm['reason']} "
                     f"({sm['seconds']} s)")
        lines.append(f"  Claude Code: claude --settings {settings}")
        if self.claude_settings:
            lines.append(f"  (also merged into {self.claude_settings})")
        lines.append(f"  a shell: eval \"$(kvbook serve --name {self.spec.name} --print-env)\"")
        if n_ctx_seq < AUTO_COMPACT_FLOOR:
            lines.append(f"  note: {n_ctx_seq} tokens per slot; Claude Code compacts at no less than "
                         f"{AUTO_COMPACT_FLOOR} whatever CLAUDE_CODE_AUTO_COMPACT_WINDOW says, so a long session "
                         "overflows the slot first (give -c / -np a larger per-slot context)")
        lines.append("  Ctrl-C or SIGTERM stops everything")
        self.out("\n".join(lines))

    # -- run

    def _watch(self) -> None:
        """Restart a llama-server that exited (backoff 1, 2, 4 ... 60 s, reset after 5 minutes up), said in the
        log; runs in the main thread, so PR_SET_PDEATHSIG stays tied to a thread that lives as long as serve."""
        now = time.monotonic()
        for s in self.servers:
            if s.process.alive():
                if s.restarts and now - s.up_since > 300:
                    s.restarts = 0
                continue
            if s.next_try == 0.0:
                code = s.process.proc.returncode if s.process.proc else None
                s.process.stop()
                if not self.spec.restart:
                    raise ServerError(f"llama-server {s.model.name} exited with {describe_exit(code)}; "
                                      f"restart is off, stopping (log {s.process.spec.log_path})")
                delay = min(60.0, 2.0 ** s.restarts)
                s.next_try = now + delay
                self.log(f"llama-server {s.model.name} exited with {describe_exit(code)}; restarting in {delay:.0f} s "
                         f"(restart {s.restarts + 1})")
                self.state["restarts"].append({"time": _now(), "model": s.model.name, "exit": describe_exit(code)})
                self._save()
            elif now >= s.next_try:
                s.restarts += 1
                proc = ManagedProcess(s.process.spec)
                try:
                    proc.start()
                except ServerError as exc:
                    s.process, s.next_try = proc, 0.0
                    self.log(f"llama-server {s.model.name} restart failed: {str(exc).splitlines()[0]}")
                    continue
                s.process, s.next_try, s.up_since = proc, 0.0, time.monotonic()
                self.log(f"llama-server {s.model.name} restarted on port {proc.spec.port} (pid {proc.pid})")
                self._server_state()
                self._save()
        if not self.proxy.process.alive():
            raise ServerError(f"LiteLLM exited with {describe_exit(self.proxy.process.proc.returncode)}; "
                              f"log {self.proxy.process.spec.log_path}")

    def run(self) -> int:
        # Ctrl-C stops the stack even when serve was launched with SIGINT ignored (a background job of a
        # non-interactive shell inherits SIG_IGN, and Python then leaves it so); an ignored SIGHUP (nohup) stays ignored
        stops = [signal.SIGTERM] + ([] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP])
        old = {sig: signal.signal(sig, _on_stop) for sig in stops}
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        why = "stopped"
        try:
            self.start()
            last_smoke = time.monotonic()
            while True:
                time.sleep(0.5)
                self._watch()
                if self.spec.smoke_every_s and time.monotonic() - last_smoke > self.spec.smoke_every_s:
                    last_smoke = time.monotonic()
                    self.state["smoke"] = smoke(self.state["litellm"]["url"], self.proxy.master_key,
                                                self.spec.models[0].name)
                    self._save()
        except KeyboardInterrupt:
            why = "Ctrl-C"
        except _Stop as exc:
            why = str(exc)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut stopping short
                signal.signal(sig, signal.SIG_IGN)
            try:
                self.stop()
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
        self.log(f"{why}: every process it started is stopped")
        return 0

    def stop(self) -> None:
        for proc in ([self.proxy.process] if self.proxy else []) + [s.process for s in self.servers] + self.rpc:
            with contextlib.suppress(Exception):
                proc.stop()
        if self.state:  # only the state this run wrote (a refused second serve leaves the running one's alone)
            with contextlib.suppress(OSError):
                (self.folder / "state.json").unlink()


# ---------------------------------------------------------------- status


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def read_state(name: str) -> dict[str, Any]:
    """The running stack's state.json; one line when none is running under that name."""
    path = serve_dir(name) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise BadInput(f"no kvbook serve named {name!r} is running (no {path})") from None
    if not _alive(state.get("pid")):
        raise BadInput(f"kvbook serve {name!r} is not running (pid {state.get('pid')} is gone; stale {path})")
    return state


def status_lines(state: dict[str, Any]) -> tuple[list[str], bool]:
    """Each process with its port and whether it answers, each llama-server's plan against what it logged at
    start, and the last smoke check; and whether everything is up."""
    import requests

    def health(url: str) -> str:
        try:
            return f"HTTP {requests.get(url, timeout=3).status_code}"
        except requests.RequestException as exc:
            return type(exc).__name__

    ok = True
    lines = [f"kvbook serve {state['name']}: pid {state['pid']}, started {state['started']}, folder {state['folder']}"]
    for s in state["servers"]:
        h = health(s["url"] + "/health")
        up = _alive(s["pid"]) and h == "HTTP 200"
        ok &= up
        plan, got = s["plan"], s["logged"]
        lines.append(f"  llama-server {s['model']}  port {s['port']}  pid {s['pid']}  {'up' if up else 'DOWN'} ({h}); "
                     f"restarts {s['restarts']}")
        lines.append(f"    plan {plan['verdict']}: {plan['n_ctx_seq']} tokens per slot, KV {plan['kv_mib']} MiB, "
                     f"compute {plan['compute_mib']} MiB; logged at start: {got.get('n_ctx_seq')} tokens per slot, "
                     f"KV {got.get('kv_mib')} MiB, compute {got.get('compute_mib')} MiB")
    for r in state["rpc"]:
        up = _alive(r["pid"])
        ok &= up
        lines.append(f"  ggml-rpc-server {r['endpoint']}  pid {r['pid']}  {'up' if up else 'DOWN'}")
    lt = state["litellm"]
    h = health(lt["url"] + "/health/liveliness")
    up = _alive(lt["pid"]) and h == "HTTP 200"
    ok &= up
    lines.append(f"  LiteLLM {lt['url']}  port {lt['port']}  pid {lt['pid']}  {'up' if up else 'DOWN'} ({h}); "
                 f"key in {lt['key_file']}")
    sm = state.get("smoke")
    if sm:
        lines.append(f"  last smoke check {sm['time']}: {'passed' if sm['passed'] else 'FAILED'} ({sm['reason']}, "
                     f"{sm['seconds']} s)")
    for r in state.get("restarts", [])[-3:]:
        lines.append(f"  restart {r['time']}: {r['model']} had exited with {r['exit']}")
    return lines, ok


def print_env(state: dict[str, Any]) -> str:
    """Shell exports of the running stack's Claude Code settings (the key read from its file)."""
    from kvbook.claude.settings import shell_exports

    key_file = state["litellm"]["key_file"]
    key = os.environ.get("LITELLM_MASTER_KEY", "") if key_file.startswith("$") else Path(key_file).read_text().strip()
    return shell_exports({**state["env"], "ANTHROPIC_AUTH_TOKEN": key})
