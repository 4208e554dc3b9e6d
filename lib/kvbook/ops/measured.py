"""Planned vs measured memory: every figure llama-server logs at -lv 4 beside kvbook's prediction.

The one comparison behind the serve notebook's table, the session records and the accuracy checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvbook.interface import CacheKind, MemoryPlan, MiB
from kvbook.ops.logparse import LoggedMemory, mib2


@dataclass(frozen=True)
class MemoryRow:
    """One compared figure; `exact` is None for the compute buffer, which kvbook only approximates."""

    item: str
    planned: object
    measured: object
    exact: bool | None

    @property
    def matches(self) -> bool | None:
        return None if self.exact is None else self.planned == self.measured

    @property
    def error_pct(self) -> float | None:
        p, m = self.planned, self.measured
        if isinstance(p, (int, float)) and isinstance(m, (int, float)) and not isinstance(m, bool) and m:
            return round(100 * (p - m) / m, 1)
        return None

    def as_record(self) -> dict[str, object]:
        return {"item": self.item, "planned": self.planned, "measured": self.measured, "match": self.matches,
                "error_pct": self.error_pct}


def _log_key(device: str, logged: LoggedMemory) -> str:
    """llama.cpp's model-buffer name for a planned device: CPU_Mapped for the host, RPC by endpoint."""
    if device == "CPU":
        return "CPU_Mapped"
    if "[" in device:
        endpoint = device[device.index("["):]
        return next((k for k in logged.model_mib if k.endswith(endpoint)), device)
    return device


def compare_memory(predicted: MemoryPlan, logged: LoggedMemory,
                   device_weights: Mapping[str, int] | None = None) -> tuple[MemoryRow, ...]:
    """Context shape, every cache (cells, layers, types, K, V and total MiB to the log's two decimals),
    logits, weights (per device when the plan has several: `device_weights`, bytes by llama.cpp device
    name, the CPU's mapped part as CPU and its repacked copies as CPU_REPACK), and the compute buffer
    (approximate)."""
    # a hybrid with a sliding window logs an empty non-SWA cache (0 layers, 0 MiB) when every attention layer
    # slides (LFM2); it holds nothing and kvbook does not list it
    seen_caches = [c for c in logged.caches if c.layers or c.kind == "recurrent"]
    rows = [
        MemoryRow("n_ctx", predicted.shape.n_ctx, logged.n_ctx, True),
        MemoryRow("n_ctx_seq", predicted.shape.n_ctx_seq, logged.n_ctx_seq, True),
        MemoryRow("n_ubatch", predicted.shape.n_ubatch, logged.n_ubatch, True),
        MemoryRow("caches", [c.kind.value for c in predicted.caches], [c.kind for c in seen_caches], True),
    ]
    for want, seen in zip(predicted.caches, seen_caches):
        tag = f"{want.kind.value} cache"
        # llama_memory_recurrent counts every layer of the model in its log line, not the recurrent ones
        rows.append(MemoryRow(f"{tag} cells", want.cells, seen.cells, True) if want.kind is CacheKind.RECURRENT
                    else MemoryRow(f"{tag} cells/layers", (want.cells, want.layers), (seen.cells, seen.layers), True))
        rows += [
            MemoryRow(f"{tag} types", (want.k_type, want.v_type), (seen.k_type, seen.v_type), True),
            MemoryRow(f"{tag} K MiB", mib2(want.k_bytes), seen.k_mib, True),
            MemoryRow(f"{tag} V MiB", mib2(want.v_bytes), seen.v_mib, True),
            MemoryRow(f"{tag} MiB ({want.cells} cells)", mib2(want.bytes), seen.total_mib, True),
        ]
    rows += [
        MemoryRow("output MiB", mib2(predicted.output_bytes), logged.output_mib, True),
    ]
    if device_weights and len(device_weights) > 1:
        rows += [MemoryRow(f"weights MiB on {name}", mib2(b), logged.model_mib.get(_log_key(name, logged), 0.0), True)
                 for name, b in device_weights.items()]
    else:
        # a context on another's weights (the MTP context) logs no model buffer at all: it holds none
        rows.append(MemoryRow("weights MiB", mib2(predicted.weights_bytes),
                              logged.model_mib.get("CPU_Mapped", None if logged.model_mib else 0.0), True))
    rows += [
        MemoryRow("compute MiB", mib2(predicted.compute.bytes), round(logged.compute_bytes / MiB, 2), None),
    ]
    if predicted.lora_bytes:
        rows.append(MemoryRow("LoRA MiB", mib2(predicted.lora_bytes), logged.lora_mib, True))
    if predicted.projector is not None:
        rows += [
            MemoryRow("projector weights MiB", mib2(predicted.projector.weights_bytes), logged.projector_model_mib, True),
            MemoryRow("projector compute MiB", mib2(predicted.projector.compute_bytes),
                      round(sum(logged.projector_compute_mib.values()), 2), None),
        ]
    return tuple(rows)


def mismatches(rows: tuple[MemoryRow, ...]) -> tuple[str, ...]:
    """Each exact figure that differs, as 'item: logged X, predicted Y'."""
    return tuple(f"{r.item}: logged {r.measured}, predicted {r.planned}" for r in rows if r.matches is False)


def measured_start_mib(logged: LoggedMemory) -> float:
    """What the server allocated at start: mapped weights, caches, logits and compute."""
    kv = sum(c.total_mib for c in logged.caches)
    return logged.model_mib.get("CPU_Mapped", 0) + kv + (logged.output_mib or 0) + logged.compute_bytes / MiB
