"""Predicted vs measured: start the real llama-server at -lv 4 for a flag set and compare every
allocation it logs with kvbook's prediction. Used by the tests and benchmarks/bench_accuracy.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvbook.interface import MiB
from kvbook.memory.rules import plan_memory
from kvbook.model.sources import load_gguf
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.logparse import LoggedMemory
from kvbook.ops.measured import compare_memory, measured_start_mib, mismatches
from kvbook.plan.flags import parse_server_args

# Flag sets checked against the real server for each bundled model: slots, -kvu, --swa-full, every
# cache type, odd -c with -np 3, -ub/-b changes, -fa off, -c 0.
CASES: dict[str, list[list[str]]] = {
    "smollm2-135m": [
        [],
        ["-c", "4096", "-np", "1"],
        ["-c", "20000", "-np", "3"],
        ["-c", "8192", "-np", "2", "-kvu"],
        ["-c", "0", "-np", "2"],
        ["-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
        ["-c", "4096", "-ctk", "q4_0", "-ctv", "q4_1", "-fa", "on", "-np", "1"],
        ["-c", "2048", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-np", "1"],
        ["-c", "4096", "-ctk", "bf16", "-ctv", "bf16", "-np", "1"],
        ["-c", "4096", "-ctk", "iq4_nl", "-ctv", "q5_1", "-fa", "on", "-np", "1"],
        ["-c", "3000", "-ctk", "q5_0", "-ctv", "q5_0", "-fa", "auto", "-np", "2", "-kvu"],
        ["-c", "4096", "-ub", "128", "-b", "256", "-np", "1"],
        ["-c", "4096", "-fa", "off", "-ctk", "q8_0", "-np", "1"],
    ],
    "gemma3-270m": [
        [],
        ["-c", "32768", "-np", "1"],
        ["-c", "32768", "-np", "4", "--kv-unified"],
        ["-c", "16384", "-np", "1", "--swa-full"],
        ["-c", "20000", "-np", "3", "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "-ub", "256"],
        ["-c", "8192", "-ub", "1024", "-b", "1024", "-np", "1"],
        ["-c", "4096", "-fa", "off", "-np", "1"],
        ["-c", "8192", "-np", "2", "-ctk", "q5_1", "-ctv", "q5_0", "-fa", "on"],
        ["-c", "0", "-np", "1", "-ctk", "bf16", "-ctv", "bf16"],
        ["-c", "4096", "-np", "4", "--swa-full", "-ub", "64"],
        ["-c", "10000", "-np", "2", "-kvu", "-ub", "300", "-b", "600"],
    ],
}


@dataclass(frozen=True)
class CaseResult:
    """One flag set: what kvbook predicted and what llama-server logged."""

    model: str
    args: tuple[str, ...]
    mismatches: tuple[str, ...]
    kv_mib_predicted: float
    kv_mib_measured: float
    compute_mib_predicted: float
    compute_mib_measured: float
    total_mib_predicted: float
    total_mib_measured: float
    compute_error_limit_pct: float

    @property
    def compute_error_pct(self) -> float:
        return 100 * (self.compute_mib_predicted - self.compute_mib_measured) / self.compute_mib_measured

    @property
    def total_error_pct(self) -> float:
        return 100 * (self.total_mib_predicted - self.total_mib_measured) / self.total_mib_measured


def check_case(model_name: str, model: Path, args: list[str], logged: LoggedMemory) -> CaseResult:
    """Exact checks (cells, n_ctx, every cache to the printed precision) and the compute error."""
    flags = parse_server_args(["llama-server", "-m", str(model), *args])
    predicted = plan_memory(load_gguf(model), flags)
    rows = compare_memory(predicted, logged)
    kv_measured = sum(c.total_mib for c in logged.caches)
    return CaseResult(
        model=model_name,
        args=tuple(args),
        mismatches=mismatches(rows),
        kv_mib_predicted=round((predicted.kv_bytes + predicted.recurrent_bytes) / MiB, 2),
        kv_mib_measured=round(kv_measured, 2),
        compute_mib_predicted=round(predicted.compute.bytes / MiB, 2),
        compute_mib_measured=round(logged.compute_bytes / MiB, 2),
        total_mib_predicted=round(predicted.start_bytes / MiB, 2),
        total_mib_measured=round(measured_start_mib(logged), 2),
        compute_error_limit_pct=predicted.compute.error_pct,
    )


def run_case(model_name: str, model: Path, args: list[str], run_dir: Path) -> CaseResult:
    """Start the real server for one flag set (no warm-up), read its log, stop it, compare."""
    with start_llama_server(["llama-server", "-m", str(model), *args, "--no-warmup"], run_dir=run_dir,
                            plan_first=False) as server:
        logged = server.measured()
    return check_case(model_name, model, args, logged)
