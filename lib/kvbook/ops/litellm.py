"""LiteLLM proxy: a config written from a routing table, a per-run master key kept out of every
report, nothing fetched from the internet at run time (OFFLINE_ENV, OFFLINE_SETTINGS), readiness on
/health/liveliness and /health/readiness."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvbook.errors import BadInput
from kvbook.ops import forkserver
from kvbook.ops.procs import ManagedProcess, ProcessSpec, check_host, free_port

ANTHROPIC = "anthropic"
OPENAI = "openai"


@dataclass(frozen=True)
class Route:
    """One LiteLLM model_list entry: the ID the client sends -> a local backend."""

    model_name: str
    backend: str  # "anthropic" (llama-server's /v1/messages) or "openai" (/v1/chat/completions)
    upstream_model: str
    api_base: str  # llama-server base URL, without /v1
    max_input_tokens: int = 0  # the plan's per-slot prompt limit (model_info; 0: not stated)

    def litellm_entry(self) -> dict:
        if self.backend not in (ANTHROPIC, OPENAI):
            raise BadInput(f"route {self.model_name}: backend must be anthropic or openai, got {self.backend}")
        base = self.api_base.rstrip("/")
        if base.endswith("/v1"):
            raise BadInput(f"route {self.model_name}: api_base must not end in /v1 ({base}); kvbook adds it for openai/")
        entry: dict = {
            "model_name": self.model_name,
            "litellm_params": {
                "model": f"{self.backend}/{self.upstream_model}",
                "api_base": base if self.backend == ANTHROPIC else base + "/v1",
                "api_key": "local-backend-not-a-secret",
            },
        }
        if self.max_input_tokens:
            entry["model_info"] = {"max_input_tokens": self.max_input_tokens}
        return entry


# LiteLLM's environment: every switch in litellm 1.106.2's source that stops a run-time fetch (each falls back to
# data installed with the package). Without them a request to an alias containing llama-2 or llama-3 waited 23 s
# for its first byte offline; tests/test_offline_stack.py runs the stack with no network at all.
OFFLINE_ENV: dict[str, str] = {
    # prevents the cost-map download from GitHub at start (3 retries, ~8 s offline)
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    # prevents the anthropic-beta header table download on the first anthropic/ request
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    # prevents the admin UI's blog feed fetch from docs.litellm.ai
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    # prevents the policy-template fetch from GitHub (management endpoints)
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    # prevents the auto-router preset fetch from GitHub (public endpoints)
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    # prevents Hugging Face Hub downloads: tokenizers picked by model name (llama-2, llama-3, command-r, claude)
    "HF_HUB_OFFLINE": "1",
    # the same for anything that loads through transformers
    "TRANSFORMERS_OFFLINE": "1",
    # prevents huggingface_hub's usage pings
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # the cross-tool opt-out for any other library's telemetry
    "DO_NOT_TRACK": "1",
    # prevents telemetry in LiteLLM releases that have it (1.106.2 has none)
    "LITELLM_TELEMETRY": "False",
    # keeps loopback calls to llama-server off any HTTP(S)_PROXY the user has set
    "NO_PROXY": "127.0.0.1,localhost",
}
# litellm_settings in the config (each set as litellm.<name> at start).
OFFLINE_SETTINGS: dict[str, bool] = {
    # prevents the token counter's Hugging Face tokenizer download by model name (5 retries, 23 s, every request;
    # a failed download is not cached): the bundled tiktoken counts instead
    "disable_hf_tokenizer_download": True,
    # LiteLLM never counts tokens itself: /v1/messages/count_tokens answers llama-server's own count on both routes,
    # and llama-server's error where it cannot count (an image without a projector) instead of a tiktoken guess
    "disable_token_counter": True,
    # prevents telemetry in LiteLLM releases that read this setting
    "telemetry": False,
}


ROUTE_ANTHROPIC = "kvbook-anthropic"
ROUTE_OPENAI = "kvbook-openai"


def default_routes(llama_url: str, upstream_model: str = "local", client_ids: tuple[str, ...] = (),
                   catch_all: bool = True) -> tuple[Route, ...]:
    """The routes kvbook's smoke suite uses, plus the Claude model IDs a client really sends."""
    routes = [
        Route(ROUTE_ANTHROPIC, ANTHROPIC, upstream_model, llama_url),
        Route(ROUTE_OPENAI, OPENAI, upstream_model, llama_url),
    ]
    routes += [Route(cid, ANTHROPIC, upstream_model, llama_url) for cid in client_ids]
    if catch_all:
        routes.append(Route("claude-*", ANTHROPIC, upstream_model, llama_url))
    return tuple(routes)


VIA_OPENAI = "-via-openai"


def alias_routes(llama_url: str, aliases: tuple[str, ...]) -> tuple[Route, ...]:
    """Each alias on both backends, sent upstream under its own name: `ALIAS` on anthropic/, `ALIAS-via-openai` on
    openai/. LiteLLM picks per-request work (a tokenizer, a cost entry) from the name's shape, so the shape is kept."""
    return tuple(route for alias in aliases for route in (Route(alias, ANTHROPIC, alias, llama_url),
                                                          Route(alias + VIA_OPENAI, OPENAI, alias, llama_url)))


def new_master_key() -> str:
    """A fresh proxy key for one run (LiteLLM requires the sk- prefix)."""
    return "sk-kvbook-" + secrets.token_urlsafe(24)


ROUTING_STRATEGIES = ("simple-shuffle", "least-busy", "latency-based-routing", "usage-based-routing")


def write_config(routes: tuple[Route, ...], path: Path, routing_strategy: str | None = None) -> Path:
    """The LiteLLM config (mode 0600); the master key is read from the environment, not stored. Entries that
    share a model name with different backends form one load-balanced model group (LiteLLM's router)."""
    seen = [(r.model_name, r.backend, r.api_base.rstrip("/")) for r in routes]
    dupes = sorted({entry[0] for entry in seen if seen.count(entry) > 1})
    if dupes:
        raise BadInput(f"routing table names a model twice for the same backend: {', '.join(dupes)}")
    if routing_strategy is not None and routing_strategy not in ROUTING_STRATEGIES:
        raise BadInput(f"LiteLLM routing strategy must be one of {', '.join(ROUTING_STRATEGIES)}, got {routing_strategy!r}")
    doc = {
        "model_list": [r.litellm_entry() for r in routes],
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        "litellm_settings": {"drop_params": True, **OFFLINE_SETTINGS},
    }
    router: dict = {"routing_strategy": routing_strategy} if routing_strategy else {}
    backends: dict[str, set[str]] = {}
    for r in routes:
        backends.setdefault(r.model_name, set()).add(r.api_base.rstrip("/"))
    if all(len(b) == 1 for b in backends.values()):
        # one backend per model: LiteLLM's 2 retries hit the same dead or failing llama-server again (4-5 s measured
        # before the error); the client (Claude Code has CLAUDE_CODE_MAX_RETRIES) retries on its own
        router["num_retries"] = 0
    if router:
        doc["router_settings"] = router
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    os.chmod(path, 0o600)
    return path


def find_litellm() -> Path:
    """The litellm CLI next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "litellm"
    if here.exists():
        return here
    found = shutil.which("litellm")
    if found:
        return Path(found)
    from kvbook.ops.components import ComponentMissing

    raise ComponentMissing("litellm is not installed here; run `make setup` (it installs litellm[proxy] at the pinned version)")


@dataclass
class LiteLLMProxy:
    """A running proxy; `master_key` is for requests only and must never be written to a report."""

    process: ManagedProcess
    master_key: str
    routes: tuple[Route, ...]
    config_path: Path

    @property
    def base_url(self) -> str:
        return self.process.base_url

    def stop(self) -> int | None:
        return self.process.stop()

    def __enter__(self) -> LiteLLMProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_proxy(routes: tuple[Route, ...], *, run_dir: Path, host: str = "127.0.0.1", port: int | None = None,
                master_key: str | None = None, allow_remote: bool = False, ready_timeout_s: float = 120.0,
                routing_strategy: str | None = None) -> LiteLLMProxy:
    """Write the config, start `litellm --config`, wait for liveliness and readiness."""
    check_host(host, allow_remote)
    key = master_key or os.environ.get("LITELLM_MASTER_KEY") or new_master_key()
    if not key.startswith("sk-"):
        raise BadInput("a LiteLLM master key must start with 'sk-'")
    port = port or free_port(host)
    config = write_config(routes, run_dir / "litellm-config.yaml", routing_strategy)
    spec = ProcessSpec(
        name="litellm",
        argv=(str(find_litellm()), "--config", str(config), "--host", host, "--port", str(port)),
        host=host,
        port=port,
        log_path=run_dir / f"litellm-{port}.log",
        ready_paths=("/health/liveliness", "/health/readiness"),
        env={"LITELLM_MASTER_KEY": key, "LITELLM_LOG": "INFO", **OFFLINE_ENV},
        ready_timeout_s=ready_timeout_s,
        forkserver=forkserver.socket_path(),  # make test: a fork of a process that imported LiteLLM once
    )
    process = ManagedProcess(spec)
    process.start()
    return LiteLLMProxy(process=process, master_key=key, routes=routes, config_path=config)
