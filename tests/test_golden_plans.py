"""Golden plans: every model preset on every device preset, and the bundled GGUFs at a few flag sets, planned now
and compared field by field with tests/golden/*.json (tools/golden_plans.py writes them); the same request planned
in five processes gives the same bytes; and every plan's totals, in JSON and text, are the sums of its devices."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbook.plan.summary import _size, format_plan, plan_summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import golden_plans  # the tool that writes the golden files, one source for the requests

REPO = golden_plans.REPO

SHOWN = 40  # differences printed before "... and N more"


@pytest.fixture(scope="module")
def planned() -> dict:
    """{golden name: Plan or the one-line error} for every golden request, planned once on the pinned host."""
    return golden_plans.plans()


def test_every_golden_plan_is_unchanged(planned) -> None:
    paths = golden_plans._bundled_paths()
    now = {name: golden_plans.serialise(golden_plans.document(plan), paths) for name, plan in planned.items()}
    lines = golden_plans.compare(now)
    assert not lines, (f"{len(lines)} field(s) of the golden plans moved (path: golden, now):\n"
                       + "\n".join(lines[:SHOWN]) + (f"\n... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else "")
                       + f"\nIf the change is intended, regenerate with `{golden_plans.REGENERATE}` and review "
                       "`git diff tests/golden`")
    assert len(now) == len(list(golden_plans.GOLDEN_DIR.glob("*.json"))) > 150


def test_the_diff_names_the_field_with_golden_and_now() -> None:
    golden = json.loads((golden_plans.GOLDEN_DIR / "gguf-gemma3-270m--ngl99-c8192--2x-rtx-3090.json").read_text())
    now = copy.deepcopy(golden)
    now["devices"][1]["need_bytes"] += 1
    del now["verdict"]
    now["surprise"] = True
    now["caches"].append(now["caches"][0])
    assert golden_plans.diff(golden, now) == [
        f"caches: golden {len(golden['caches'])} items, now {len(golden['caches']) + 1}",
        f"devices[1].need_bytes: golden {golden['devices'][1]['need_bytes']}, "
        f"now {golden['devices'][1]['need_bytes'] + 1}",
        "surprise: golden missing, now true",
        'verdict: golden "fits", now missing',
    ]
    assert golden_plans.diff(golden, copy.deepcopy(golden)) == []
    assert golden_plans.diff({"a": 1}, {"a": 1.0}) == ["a: golden 1, now 1.0"]  # an int that became a float


def test_the_same_request_gives_the_same_bytes_in_five_processes() -> None:
    """Five processes, each with its own string-hash seed (set and dict order of strings), plan the same spread
    request; every one prints the same bytes, and they are the golden file's."""
    name = "gguf-gemma3-270m--ngl-all-c8192--rpc-2-hosts"
    procs = [subprocess.Popen([sys.executable, str(REPO / "tools" / "golden_plans.py"), "--print", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (0, 1, 2, 3, 4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-500:] for _, err in outs]
    assert len({out for out, _ in outs}) == 1, "the same request gave different plans"
    assert outs[0][0].decode() == (golden_plans.GOLDEN_DIR / f"{name}.json").read_text()


def test_the_totals_are_the_sums_of_the_devices_in_json_and_text(planned) -> None:
    """start_bytes = what the devices hold at start (CPU_REPACK copies included), total_bytes = that plus the host
    growth, for every preset pair and bundled GGUF; the text plan prints the same two figures. A row another row
    includes (Apple's Metal inside its RAM limit) is counted once, in the row that includes it."""
    checked = repacked = 0
    for name, plan in planned.items():
        if isinstance(plan, str):
            continue
        doc = plan_summary(plan)
        inside = {n for d in doc["devices"] for n in d.get("includes", ())}
        devices = [d for d in doc["devices"] if d["name"] not in inside]
        start = sum(d["need_bytes"] - d["host_extras_bytes"] for d in devices)
        assert doc["start_bytes"] == start, name
        assert doc["host_extras_bytes"] == sum(d["host_extras_bytes"] for d in devices), name
        assert doc["total_bytes"] == doc["start_bytes"] + doc["host_extras_bytes"] == sum(
            d["need_bytes"] for d in devices), name
        text = format_plan(plan)
        assert f"  at start     {_size(doc['start_bytes'])}\n" in text, name
        assert f"  total        {_size(doc['total_bytes'])}" in text, name
        checked += 1
        repacked += any(d["repack_bytes"] for d in devices)
    assert checked > 150 and repacked  # the CPU_REPACK case (Gemma 3 270M on the pinned x86 host) is among them


def test_gemma_repack_counts_at_start() -> None:
    """The case the issue reported: Gemma 3 270M `-c 32768 -np 1` on an AVX2 host holds 13271040 bytes of
    CPU_REPACK beside its mapped file; the JSON's start_bytes (once 398.43 MiB) includes them (411.08 MiB)."""
    doc = json.loads((golden_plans.GOLDEN_DIR / "gguf-gemma3-270m--c32768-np1--this-machine.json").read_text())
    (cpu,) = doc["devices"]
    assert cpu["repack_bytes"] == 13271040
    parts = sum(doc[k] for k in ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes"))
    assert doc["start_bytes"] == parts + cpu["repack_bytes"] == cpu["need_bytes"] - cpu["host_extras_bytes"]
