"""Per-device accuracy of kvbook's placement on real multi-device runs: loopback ggml-rpc-server devices.

    .venv/bin/python benchmarks/bench_placement.py

For each flag set of tests/test_rpc_placement.py (bundled models and small synthetic MoE/hybrid GGUFs),
starts the RPC servers and llama-server at -lv 4, and prints every device's planned and logged model
buffer and KV (+recurrent) buffers in MiB, and their compute buffers (with RPC devices in use, kvbook's
calibrated per-device estimate, plan/placement.py compute_terms, for which these runs are the held-out set;
with none, its one CPU estimate). Writes benchmarks/results/placement.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_rpc_placement import _COMMON, CASES, with_endpoints  # noqa: E402  (the flag sets, one source)

from kvbook.ops.components import model_path  # noqa: E402
from kvbook.ops.llama_server import start_llama_server  # noqa: E402
from kvbook.ops.logparse import mib2  # noqa: E402
from kvbook.ops.host import local_request  # noqa: E402
from kvbook.ops.rpc import start_rpc_server  # noqa: E402
from kvbook.plan.api import plan as make_plan  # noqa: E402
from kvbook.plan.flags import parse_server_args  # noqa: E402
from kvbook.plan.summary import plan_summary  # noqa: E402
from kvbook.testing.synthetic import write_synthetic_gguf  # noqa: E402


def models(tmp: Path) -> dict[str, Path]:
    moe = {"general.architecture": "qwen3moe", **{f"qwen3moe.{k}": v for k, v in {
        **_COMMON, "block_count": 4, "feed_forward_length": 512, "expert_count": 8, "expert_used_count": 2,
        "expert_feed_forward_length": 128}.items()}}
    hybrid = {"general.architecture": "qwen35", **{f"qwen35.{k}": v for k, v in {
        **_COMMON, "block_count": 8, "feed_forward_length": 512, "ssm.conv_kernel": 4, "ssm.state_size": 128,
        "ssm.group_count": 2, "ssm.time_step_rank": 4, "ssm.inner_size": 512, "full_attention_interval": 4,
        "rope.dimension_sections": [11, 11, 10, 0], "rope.dimension_count": 64}.items()}}
    return {"gemma3": model_path("gemma3-270m"), "smollm2": model_path("smollm2-135m"),
            "moe": write_synthetic_gguf(moe, tmp / "moe.gguf"), "hybrid": write_synthetic_gguf(hybrid, tmp / "hybrid.gguf")}


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbook-placement-") as tmp:
        paths = models(Path(tmp))
        for model, n, flags in CASES:
            servers = [start_rpc_server(Path(tmp)) for _ in range(n)]
            try:
                eps = [f"{s.spec.host}:{s.spec.port}" for s in servers]
                argv = ["-m", str(paths[model]), "--rpc", ",".join(eps), *with_endpoints(flags, eps), "--fit", "off"]
                plan = plan_summary(make_plan(local_request(parse_server_args(argv))))
                with start_llama_server([*argv, "--no-warmup"], run_dir=Path(tmp)) as server:
                    logged = server.measured()
            finally:
                for s in servers:
                    s.stop()
            for d in plan["devices"]:
                ep = d["name"][d["name"].index("[") + 1:-1] if "[" in d["name"] else None
                key = (lambda table: "CPU_Mapped" if ep is None else next((k for k in table if k.endswith(f"[{ep}]")), ""))  # noqa: E731
                kv_key = "CPU" if ep is None else key(logged.kv_buffer_mib)
                rows.append({"model": model, "flags": " ".join(flags), "device": d["name"].split("[")[0],
                             "bound": len(plan["devices"]) > 1 and not any(n["code"] == "ot.idle-device" for n in plan["notes"]),
                             "upper_bound": any(n["code"] == "spread.dense-ops-bound" for n in plan["notes"]),
                             "model_mib": [mib2(d["weights_bytes"] - d["repack_bytes"]),
                                           logged.model_mib.get(key(logged.model_mib), 0.0)],
                             "repack_mib": [mib2(d["repack_bytes"]),
                                            logged.model_mib.get("CPU_REPACK", 0.0) if ep is None else 0.0],
                             "kv_mib": [mib2(d["kv_bytes"] + d["recurrent_bytes"]), logged.kv_buffer_mib.get(kv_key, 0.0)],
                             "compute_mib": [mib2(d["compute_bytes"]),
                                             logged.compute_mib.get("CPU" if ep is None else key(logged.compute_mib), 0.0)]})
    print("| model | flags | device | model MiB plan / log | CPU_REPACK MiB plan / log | KV MiB plan / log | "
          "compute MiB plan / log |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        repack = f"{r['repack_mib'][0]} / {r['repack_mib'][1]}" if r["device"] == "CPU" else ""
        compute = f"{r['compute_mib'][0]} / {r['compute_mib'][1]}" + ("" if r["bound"] or len(
            [x for x in rows if x["flags"] == r["flags"]]) == 1 else " (not modelled)") + (
            " (bound)" if r["upper_bound"] else "")
        print(f"| {r['model']} | `{r['flags']}` | {r['device']} | {r['model_mib'][0]} / {r['model_mib'][1]} | {repack} | "
              f"{r['kv_mib'][0]} / {r['kv_mib'][1]} | {compute} |")
    exact_model = sum(r["model_mib"][0] == r["model_mib"][1] and r["repack_mib"][0] == r["repack_mib"][1] for r in rows)
    exact_kv = sum(r["kv_mib"][0] == r["kv_mib"][1] for r in rows)
    spread = [r for r in rows if r["bound"] and not r["upper_bound"] and r["compute_mib"][1] >= 5.0]  # (output only: ~1 MiB)
    bounded = [r for r in rows if r["upper_bound"]]
    above = sum(r["compute_mib"][0] >= r["compute_mib"][1] for r in bounded)
    errors = sorted(abs(r["compute_mib"][0] / r["compute_mib"][1] - 1) * 100 for r in spread)
    median = errors[len(errors) // 2] if errors else 0.0
    print(f"\n{len(CASES)} runs, {len(rows)} devices: model buffers (CPU: CPU_Mapped and CPU_REPACK) equal on "
          f"{exact_model}/{len(rows)}, "
          f"KV buffers equal on {exact_kv}/{len(rows)}; compute with RPC devices (calibrated per device, held out): "
          f"|error| median {median:.1f}%, max {max(errors, default=0):.1f}% over {len(errors)} devices logging >= 5 MiB; "
          f"where -ot moves dense matmuls to the CPU, the bound: planned >= logged on {above}/{len(bounded)}")
    out = REPO / "benchmarks" / "results" / "placement.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
