"""Real runs of the Vulkan llama-server on Mesa's lavapipe (a software Vulkan device) compared with kvbook's plan.

lavapipe is a CPU-type Vulkan device, which the pinned build skips unless GGML_VK_VISIBLE_DEVICES names it
(ggml-org/llama.cpp#14099); "0,0" lists it twice, as Vulkan0 and Vulkan1 (2048 MiB each), which is how two
GPUs are exercised here. Each case is planned with the same command line (`kvbook plan --json`, the Vulkan
devices given as --device-budget), run with `--fit off` at -lv 4, and every buffer the log names is put on
the device it belongs to (`logged_by_device`).

Used by tests/test_vulkan_lavapipe.py and benchmarks/bench_vulkan.py (which writes tests/data/vulkan/).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvbook.ops.logparse import LoggedMemory, mib2
from kvbook.testing.synthetic import TINY_HYBRID, TINY_MOE, tiny_metadata

LAVAPIPE_MIB = 2048  # what lavapipe reports as the device's memory (llama-server --list-devices)
# lavapipe's maxStorageBufferRange (vulkaninfo; 2^27 bytes), without 64-bit indexing: the largest tensor ggml-vulkan
# accepts (ggml_backend_vk_device_supports_op); Gemma 3's 170 MiB tied output stays on the CPU
LAVAPIPE_MAX_TENSOR_MIB = 128
HOST_BUFFERS = ("CPU", "CPU_Mapped", "CPU_REPACK", "Vulkan_Host")  # buffer types of the CPU device
COMMON = ("-c", "4096", "-np", "1")

# small synthetic GGUFs llama-server really loads (zero weights: allocations only), the same ones
# tests/test_rpc_placement.py uses
SYNTHETIC = {"moe": tiny_metadata("qwen3moe", **TINY_MOE), "hybrid": tiny_metadata("qwen35", **TINY_HYBRID)}


@dataclass(frozen=True)
class Case:
    """One run: a model (bundled name or synthetic key), how many Vulkan devices, RPC servers, and the flags."""

    model: str
    flags: tuple[str, ...]
    vulkan: int = 1  # lavapipe listed this many times (GGML_VK_VISIBLE_DEVICES=0,0,...)
    rpc: int = 0  # loopback ggml-rpc-servers beside it

    @property
    def id(self) -> str:
        extra = f"-{self.vulkan}vk" + (f"-{self.rpc}rpc" if self.rpc else "")
        return f"{self.model}{extra} {' '.join(self.flags)}"

    @property
    def env(self) -> dict[str, str]:
        return {"GGML_VK_VISIBLE_DEVICES": ",".join(["0"] * self.vulkan)}


def _c(model: str, *flags: str, vulkan: int = 1, rpc: int = 0) -> Case:
    return Case(model, tuple(flags), vulkan, rpc)


CASES: tuple[Case, ...] = (  # most telling first (benchmarks/bench_vulkan.py runs them in this order)
    _c("smollm2", "-ngl", "all", *COMMON),  # dense, SmolLM2-135M: 30 layers, tied output
    _c("smollm2", "-ngl", "12", *COMMON),
    _c("gemma3", "-ngl", "all", "-c", "8192", "-np", "1"),  # sliding window, Gemma 3 270M: 15 SWA + 3 full layers
    _c("gemma3", "-ngl", "all", "-ts", "1,1", *COMMON, vulkan=2),  # two Vulkan devices
    _c("moe", "-ngl", "all", "--n-cpu-moe", "2", *COMMON),  # synthetic Qwen3-MoE
    _c("hybrid", "-ngl", "4", *COMMON),  # synthetic Qwen3.5 hybrid
    _c("gemma3", "-ngl", "all", *COMMON, rpc=1),  # Vulkan beside a loopback RPC device
    _c("smollm2", "-ngl", "all", "-fa", "on", *COMMON),
    _c("gemma3", "-ngl", "10", "-fa", "on", "-c", "8192", "-np", "2"),
    _c("smollm2", "-ngl", "all", "-fa", "off", "-c", "8192", "-np", "2", "-ub", "128"),
    _c("smollm2", "-ngl", "all", "-fa", "on", "-c", "8192", "-np", "1", "-b", "2048", "-ub", "1024"),
    _c("moe", "-ngl", "all", "-ot", "exps=CPU", "-fa", "on", *COMMON),
    _c("smollm2", "-ngl", "all", "-ot", r"blk\.(1|2)\.ffn_.*=CPU", *COMMON),
    _c("smollm2", "-ngl", "12", "-lm", "none", *COMMON),  # no mmap: CPU weights in Vulkan_Host
    _c("smollm2", "-ngl", "all", "-nkvo", *COMMON),
    _c("gemma3", "-ngl", "all", "--swa-full", "-fa", "off", "-ub", "256", *COMMON),
    _c("smollm2", "-ngl", "24", "-ts", "3,1", "-fa", "on", *COMMON, vulkan=2),
    _c("hybrid", "-ngl", "all", "-c", "4096", "-np", "2"),
    _c("moe", "-ngl", "all", *COMMON),
    _c("gemma3", "-ngl", "0", *COMMON),
    _c("smollm2", "-ngl", "20", "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "-c", "6000", "-np", "3"),
)


def model_file(name: str, folder: Path) -> Path:
    """The GGUF of a case's model: a bundled one by kvbook name, or a synthetic one written into `folder`."""
    from kvbook.ops.components import model_path

    if name in SYNTHETIC:
        from kvbook.testing.synthetic import write_synthetic_gguf

        path = folder / f"{name}.gguf"
        return path if path.is_file() else write_synthetic_gguf(SYNTHETIC[name], path)
    return model_path({"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}[name])


def argv_for(case: Case, model: Path, endpoints: Sequence[str] = ()) -> list[str]:
    rpc = ["--rpc", ",".join(endpoints)] if endpoints else []
    return ["-m", str(model), *rpc, *case.flags, "--fit", "off"]


def budgets(case: Case) -> list[str]:
    """--device-budget entries for the Vulkan devices lavapipe gives (2048 MiB each, tensors up to 128 MiB)."""
    return [f"Vulkan{i}={LAVAPIPE_MIB}MiB@{LAVAPIPE_MAX_TENSOR_MIB}MiB" for i in range(case.vulkan)]


def plan_json(case: Case, argv: Sequence[str]) -> dict:
    """`kvbook plan --json` for the case's command line on its Vulkan devices (+ this machine's RAM), through the
    same planner API and device options the CLI uses (no saved calibrations)."""
    from kvbook.ops.fit_params import FIT_PARAMS
    from kvbook.ops.host import detect_host, local_request
    from kvbook.plan.api import plan
    from kvbook.plan.devices import resolve_device
    from kvbook.plan.flags import parse_server_args
    from kvbook.plan.summary import plan_summary

    host = detect_host()
    flags = parse_server_args(["llama-server", *argv], {})
    device = resolve_device(device_budgets=budgets(case), endpoints=flags.rpc, host=host)
    return plan_summary(plan(local_request(flags, device, {}, host, calibrations=False), fit_fallback=FIT_PARAMS))


def _device_of(buffer: str, endpoints: Sequence[str]) -> str:
    """The device a logged buffer type belongs to: RPC0[host:port] -> RPC<n>, Vulkan0 -> Vulkan0, host ones -> CPU."""
    if buffer in HOST_BUFFERS:
        return "CPU"
    if "[" in buffer:
        return f"RPC{list(endpoints).index(buffer[buffer.index('[') + 1:-1])}"
    return buffer


def logged_by_device(logged: LoggedMemory, endpoints: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Per device, the MiB the log gave it: weights (model buffers; the CPU's CPU_Mapped + Vulkan_Host + CPU),
    repack (CPU_REPACK), KV (KV + recurrent buffers), compute, output; every buffer line is counted once."""
    out: dict[str, dict[str, float]] = {}

    def at(dev: str) -> dict[str, float]:
        return out.setdefault(dev, dict.fromkeys(("weights", "repack", "kv", "compute", "output"), 0.0))

    for key, source in (("weights", logged.model_mib), ("kv", logged.kv_buffer_mib), ("compute", logged.compute_mib)):
        for buffer, mib in source.items():
            row = at(_device_of(buffer, endpoints))
            part = "repack" if buffer == "CPU_REPACK" else key
            row[part] = round(row[part] + mib, 2)
    if logged.output_mib:
        at("CPU")["output"] = logged.output_mib
    return out


def planned_by_device(doc: Mapping) -> dict[str, dict[str, float]]:
    """Per device, what the plan puts there, in the log's MiB (two decimals; weights without the CPU_REPACK
    copies, which are `repack`): RPC devices by RPC<n> alone."""
    out = {}
    for d in doc["devices"]:
        name = d["name"].split("[", 1)[0]
        out[name] = {"weights": mib2(d["weights_bytes"] - d["repack_bytes"]),
                     "kv": mib2(d["kv_bytes"] + d["recurrent_bytes"]),
                     "compute": mib2(d["compute_bytes"]), "output": mib2(d["output_bytes"]),
                     "repack": mib2(d["repack_bytes"])}
    return out


@dataclass(frozen=True)
class Row:
    """One measured case: the command, what the log says per device and what the plan says, side by side."""

    case: str
    model: str
    command: str
    env: dict[str, str]
    logged_buffers: dict[str, dict[str, float]]  # model / kv / compute per buffer type, output, as logged
    logged: dict[str, dict[str, float]]
    planned: dict[str, dict[str, float]]
    compute_error_pct: dict[str, float] = field(default_factory=dict)  # (planned - logged) / logged per device


def compare(case: Case, argv: Sequence[str], logged: LoggedMemory, doc: Mapping,
            endpoints: Sequence[str] = ()) -> Row:
    got = logged_by_device(logged, endpoints)
    want = planned_by_device(doc)
    errors = {dev: round((want.get(dev, {}).get("compute", 0.0) - row["compute"]) / row["compute"] * 100, 1)
              for dev, row in got.items() if row["compute"]}
    buffers = {"model": dict(logged.model_mib), "kv": dict(logged.kv_buffer_mib), "compute": dict(logged.compute_mib),
               "output": {"Vulkan_Host/CPU": logged.output_mib or 0.0}}
    return Row(case.id, case.model, shlex.join(["llama-server", *argv]), case.env, buffers, got, want, errors)


@contextlib.contextmanager
def rpc_endpoints(n: int, run_dir: Path, binary: Path) -> Iterator[list[str]]:
    """n loopback ggml-rpc-servers (started before GGML_VK_VISIBLE_DEVICES is set, so they serve the CPU)."""
    from kvbook.ops.rpc import start_rpc_server

    servers = [start_rpc_server(run_dir, binary=binary) for _ in range(n)]
    try:
        yield [f"{s.spec.host}:{s.spec.port}" for s in servers]
    finally:
        for s in servers:
            s.stop()


def run_case(case: Case, server: Path, run_dir: Path, *, keep_log: Path | None = None) -> Row:
    """Plan and run one case on the Vulkan llama-server at `server`; the raw log is copied to `keep_log`."""
    from kvbook.ops.llama_server import start_llama_server

    model = model_file(case.model, run_dir)
    with rpc_endpoints(case.rpc, run_dir, server.parent / "ggml-rpc-server") as endpoints:
        argv = argv_for(case, model, endpoints)
        doc = plan_json(case, argv)
        saved = {k: os.environ.get(k) for k in case.env}
        os.environ.update(case.env)  # the server inherits it (procs.ProcessSpec inherit_env)
        try:
            with start_llama_server([*argv, "--no-warmup"], binary=server, run_dir=run_dir, plan_first=False,
                                    ready_timeout_s=300) as live:
                log_path = live.process.spec.log_path
                logged = live.measured()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if keep_log is not None:
            keep_log.write_text(log_path.read_text(errors="replace"))
        return compare(case, argv, logged, doc, endpoints)


def row_json(row: Row) -> str:
    return json.dumps(asdict(row), sort_keys=True)

