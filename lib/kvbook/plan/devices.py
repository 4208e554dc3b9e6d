"""Device budgets: presets from params/devices/*.yaml, custom GiB budgets, and this machine's RAM."""

from __future__ import annotations

import os
from pathlib import Path

from kvbook.errors import BadInput
from kvbook.interface import Device, GiB, MiB, Pool, ServerFlags
from kvbook.paths import params_dir
from kvbook.yamlio import read_yaml

THIS_MACHINE = "this-machine"


def device_ids() -> list[str]:
    folder = params_dir() / "devices"
    ids = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return ids + [THIS_MACHINE]


def host_ram_bytes() -> int:
    """Physical RAM of the machine kvbook runs on (MemTotal, else sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def this_machine() -> Device:
    """The current machine as a host-only device whose budget is its RAM."""
    ram = host_ram_bytes()
    return Device(
        id=THIS_MACHINE,
        name=f"this machine ({ram / GiB:.1f} GiB RAM, CPU only)",
        unified=True,
        pools=(Pool(name="Host", kind="host", budget_bytes=ram, total_bytes=ram),),
        notes="Budget is all physical RAM; the OS and other programs need some of it.",
    )


def _gib(option: str, gib: float) -> int:
    if not gib > 0 or gib > 1 << 20:
        raise BadInput(f"{option} must be a positive number of GiB, got {gib}")
    return int(gib * GiB)


def custom_budget(gib: float) -> Device:
    """One unified pool with the given budget in GiB (everything, host growth included, counts against it,
    as on Apple silicon or a CPU-only machine)."""
    size = _gib("--budget-gib", gib)
    return Device(
        id=f"budget-{gib:g}gib",
        name=f"custom budget {gib:g} GiB",
        unified=True,
        pools=(Pool(name="Budget", kind="host", budget_bytes=size, total_bytes=size),),
    )


def custom_discrete(gpu_gib: float, host_gib: float | None = None) -> Device:
    """A discrete GPU with `gpu_gib` GiB and a host with `host_gib` GiB (this machine's RAM when not given)."""
    gpu = _gib("--gpu-gib", gpu_gib)
    host = _gib("--host-gib", host_gib) if host_gib is not None else host_ram_bytes()
    return Device(
        id=f"gpu-{gpu_gib:g}gib",
        name=f"custom GPU {gpu_gib:g} GiB + host {host / GiB:.1f} GiB",
        unified=False,
        pools=(Pool(name="GPU0", kind="gpu", budget_bytes=gpu, total_bytes=gpu),
               Pool(name="Host", kind="host", budget_bytes=host, total_bytes=host)),
    )


def load_device(device_id: str) -> Device:
    """A preset by id (see `device_ids()`), or this machine."""
    if device_id == THIS_MACHINE:
        return this_machine()
    path = params_dir() / "devices" / f"{device_id}.yaml"
    if not path.is_file():
        raise BadInput(f"unknown device '{device_id}'. Try one of: {', '.join(device_ids())}")
    doc = read_yaml(path, "the device preset")
    try:
        pools = tuple(
            Pool(
                name=str(p["name"]),
                kind=str(p.get("kind", "gpu")),
                budget_bytes=int(float(p["budget_mib"]) * MiB),
                total_bytes=int(float(p.get("total_mib", p["budget_mib"])) * MiB),
                bandwidth_gbps=float(p["bandwidth_gbps"]) if p.get("bandwidth_gbps") is not None else None,
            )
            for p in doc["pools"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"{path}: not a valid device preset ({type(exc).__name__}: {exc})") from None
    unified = bool(doc.get("unified", False))
    if not unified and not any(p.kind == "host" for p in pools):
        host = this_machine().pools[0]
        pools = pools + (Pool(name="Host (this machine)", kind="host", budget_bytes=host.budget_bytes,
                              total_bytes=host.total_bytes),)
    sources = tuple((str(k), str(v)) for k, v in (doc.get("sources") or {}).items())
    return Device(
        id=device_id,
        name=str(doc.get("name", device_id)),
        unified=unified,
        pools=pools,
        notes=str(doc.get("notes", "")),
        sources=sources,
    )


def with_rpc(device: Device, endpoints: tuple[str, ...], budgets_gib: tuple[float, ...] = ()) -> Device:
    """`device` plus one RPC device per --rpc endpoint, in order. An RPC server reports its host's free
    memory (this build's ggml-rpc-server has no memory flag), so a budget defaults to this machine's RAM,
    right for loopback; give each remote host's budget (--rpc-gib) for real ones."""
    if any(p.kind == "gpu" for p in device.pools):
        raise BadInput(f"--rpc with {device.name}: the order of RPC and local GPU devices is not modelled yet; "
                       "plan RPC devices on this machine or a --budget-gib host")
    if budgets_gib and len(budgets_gib) != len(endpoints):
        raise BadInput(f"--rpc-gib has {len(budgets_gib)} budgets for {len(endpoints)} --rpc servers")
    host = device.pools[0]
    host = Pool(name=host.name if host.kind == "host" else "Host", kind="host", budget_bytes=host.budget_bytes,
                total_bytes=host.total_bytes, bandwidth_gbps=host.bandwidth_gbps)
    ram = host_ram_bytes()
    rpc = tuple(Pool(name=f"RPC{i}[{ep}]", kind="rpc",
                     budget_bytes=_gib("--rpc-gib", budgets_gib[i]) if budgets_gib else ram,
                     total_bytes=_gib("--rpc-gib", budgets_gib[i]) if budgets_gib else ram)
                for i, ep in enumerate(endpoints))
    return Device(id=f"{device.id}+rpc", name=f"{device.name} + {len(rpc)} RPC server(s)", unified=False,
                  pools=(host, *rpc), notes=device.notes)


def llama_name(pool: Pool) -> str:
    """The name llama.cpp gives the device of an offload pool (what -dev takes): RPC0[host:port] -> RPC0."""
    return pool.name.split("[", 1)[0]


def effective_device(device: Device, flags: ServerFlags) -> Device:
    """The devices llama.cpp uses for this command line (src/llama.cpp llama_prepare_model_devices): -dev picks
    and orders the offload devices (none: no offload), -sm none keeps only device -mg (none when -mg < 0);
    -sm row refuses RPC devices (no split buffers) and -sm tensor is not modelled."""
    offload = [] if device.unified else [p for p in device.pools if p.kind in ("gpu", "rpc")]
    if flags.split_mode == "row":
        if any(p.kind == "rpc" for p in offload):
            rpc = next(p for p in offload if p.kind == "rpc")
            raise BadInput(f"-sm row: device {llama_name(rpc)} does not support split buffers (llama-server refuses it "
                           "when it loads the model)")
        raise BadInput("-sm row changes memory (weights split by rows across GPUs) and kvbook does not model it yet")
    if flags.split_mode == "tensor":
        raise BadInput("-sm tensor changes memory (weights and KV split across GPUs, experimental) and kvbook does not "
                       "model it yet")
    chosen = offload
    if flags.devices:
        by_name = {llama_name(p): p for p in offload}
        unknown = [n for n in flags.devices if n != "none" and n not in by_name]
        if unknown:
            have = ", ".join(by_name) or "none (CPU only)"
            raise BadInput(f"-dev: invalid device: {unknown[0]} (llama-server refuses it); this plan's devices: {have}")
        chosen = [] if flags.devices == ("none",) else [by_name[n] for n in flags.devices]
    if flags.split_mode == "none" and chosen:
        if flags.main_gpu >= len(chosen):
            raise BadInput(f"-mg {flags.main_gpu}: invalid value for main_gpu: {flags.main_gpu} (available devices: "
                           f"{len(chosen)}); llama-server refuses it with -sm none")
        chosen = [] if flags.main_gpu < 0 else [chosen[flags.main_gpu]]
    if chosen == offload:
        return device
    hosts = [p for p in device.pools if p.kind == "host"]
    pools = (*hosts, *chosen) if device.pools[0].kind == "host" else (*chosen, *hosts)
    return Device(id=device.id, name=device.name, unified=device.unified, pools=tuple(pools), notes=device.notes,
                  sources=device.sources)
