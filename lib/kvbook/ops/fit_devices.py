"""kvbook's per-device plan against llama-fit-params' per-device rows for the same command line over `--rpc`
devices (`--fit-print on`: what llama.cpp would allocate on each device, read from metadata only, so full-size
sparse synthetic GGUFs work).

Weights and KV/recurrent state are compared to the row's whole MiB; compute to the two-decimal `sched_reserve`
figure. llama-fit-params reserves logits for n_ubatch outputs (common_params n_outputs_max 0 = n_batch) where
llama-server reserves one per slot (tools/server/server-context.cpp server_output_limits), so kvbook's compute is
given both ways: as the server plans it and with fit's outputs (the one compared here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbook.interface import MiB
from kvbook.memory.rules import plan_memory
from kvbook.ops.fit_params import FitDevice, rpc_fit_devices, run_fit_params
from kvbook.ops.host import detect_host, local_request
from kvbook.plan.api import plan as make_plan
from kvbook.plan.devices import effective_device, host_device, with_rpc
from kvbook.plan.flags import parse_server_args
from kvbook.plan.placement import CPU, weights_by_device
from kvbook.plan.planner import offload_of, rpc_compute


@dataclass(frozen=True)
class DeviceCompare:
    """One device: llama-fit-params' figures and kvbook's (bytes) for the same flags."""

    fit: FitDevice
    weights_bytes: int  # tensors on the device (the host: every CPU tensor, repacked or not)
    context_bytes: int  # KV + recurrent state
    compute_bytes: int  # with fit's n_outputs
    server_compute_bytes: int  # as llama-server reserves it (what `kvbook plan` prints)

    @property
    def weights_exact(self) -> bool:
        """Equal to the row's whole MiB; the host's two floored parts (CPU, CPU_REPACK) may sum to one MiB less."""
        gap = self.weights_bytes // MiB - (self.fit.model_mib + self.fit.repack_mib)
        return gap == 0 or (gap == 1 and self.fit.repack_mib > 0)

    @property
    def context_exact(self) -> bool:
        return self.context_bytes // MiB == self.fit.context_mib

    @property
    def compute_error_pct(self) -> float | None:
        if self.fit.compute_mib < 1.0:
            return None
        return (self.compute_bytes / MiB - self.fit.compute_mib) / self.fit.compute_mib * 100


@dataclass(frozen=True)
class CaseCompare:
    model: str
    flags: tuple[str, ...]
    devices: tuple[DeviceCompare, ...]
    log_complete: bool  # fit's log reached its last table (else a compute line may be missing)


def compare_devices(model: Path, endpoints: Sequence[str], flags: Sequence[str]) -> CaseCompare:
    """Run llama-fit-params over `--rpc endpoints` with `flags` (must include -c, -np and -ngl) and plan the same
    llama-server command line with kvbook, device by device."""
    flags = list(flags)
    ctx = int(flags[flags.index("-c") + 1])
    rest = flags[:flags.index("-c")] + flags[flags.index("-c") + 2:]
    report = run_fit_params(model, ctx, ["--rpc", ",".join(endpoints), *rest])
    fit = rpc_fit_devices(report, endpoints)
    argv = ["-m", str(model), "--rpc", ",".join(endpoints), *flags, "--fit", "off"]
    server = parse_server_args(argv)
    host = detect_host()
    device = effective_device(with_rpc(host_device(host), server.rpc, host=host), server)
    request = local_request(server, device)
    arch = request.model
    plan = make_plan(request)
    memory = plan_memory(arch, server)
    offload = offload_of(arch, server, device)
    with_fit_outputs = rpc_compute(arch, server, memory, offload, n_outputs=min(memory.shape.n_ubatch, server.batch))
    tensors = weights_by_device(dict(arch.tensor_groups), offload, (), server.cpu_moe_layers)
    pools = {u.pool: u for u in plan.pools}
    out = []
    for row in fit:
        dev = CPU if row.endpoint is None else next(d for d in offload.devices if row.endpoint in d)
        pool = pools[next(p.name for p in device.pools if p.kind == "host")] if dev == CPU else pools[dev]
        out.append(DeviceCompare(row, tensors.get(dev, 0), pool.kv_bytes + pool.recurrent_bytes,
                                 with_fit_outputs.get(dev, 0), pool.compute_bytes))
    return CaseCompare(model.stem, tuple(flags), tuple(out), report.log_complete)


def format_table(cases: Sequence[CaseCompare]) -> str:
    """The comparison as a Markdown table (docs/accuracy.md, 'Full-size models over RPC')."""
    rows = ["| model | flags | device | model MiB fit / kvbook | context MiB fit / kvbook | compute MiB fit / kvbook (err) "
            "| kvbook compute as llama-server |", "|---|---|---|---|---|---|---|"]
    for c in cases:
        for d in c.devices:
            err = d.compute_error_pct
            fit_model = f"{d.fit.model_mib}" + (f"+{d.fit.repack_mib} repack" if d.fit.repack_mib else "")
            rows.append(f"| {c.model} | `{' '.join(c.flags)}` | {d.fit.name} | {fit_model} / {d.weights_bytes // MiB} | "
                        f"{d.fit.context_mib} / {d.context_bytes // MiB} | {d.fit.compute_mib:.2f} / "
                        f"{d.compute_bytes / MiB:.2f} ({'-' if err is None else f'{err:+.1f}%'}) | "
                        f"{d.server_compute_bytes / MiB:.2f} |")
    return "\n".join(rows)
