"""Device budgets: presets from params/devices/*.yaml, custom budgets (--budget-gib, --gpu-gib, --device-budget),
RPC servers, and this machine built from the facts ops/host.py detected (its NVIDIA GPUs, Apple's Metal, its RAM
and CPU). Nothing here looks at the host: a Host record comes in where this machine's RAM or CPU is meant."""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Sequence
from dataclasses import replace

from kvbook.errors import BadInput
from kvbook.interface import CpuFeatures, Device, GiB, Host, MiB, Pool, ServerFlags
from kvbook.paths import params_dir, preset_ids
from kvbook.yamlio import read_yaml

THIS_MACHINE = "this-machine"


def device_ids() -> list[str]:
    return preset_ids("devices") + [THIS_MACHINE]


# macOS's default Metal working set (recommendedMaxWorkingSetSize) as a share of RAM. Older releases: about 2/3 up
# to 32 GiB, 3/4 above (model-facts.md 3: 16 GB -> 10922.67 MB, 32 GB -> 21845.34, 64 GB -> 49152 MiB, 96 GB ->
# 73728 MB). Current macOS gives more (the Apple presets): 74% at 16-24 GB, 78% at 32 GB, 81% at 64 GB (53084 MiB),
# 84% at 128 GB (110100 MiB). The estimate takes the older, lower share; llama-server's log prints the real value.
def metal_working_set_estimate(ram_bytes: int) -> int:
    """The default Metal budget llama.cpp would see (ggml-metal-device.m ggml_metal_device_get_memory reports
    recommendedMaxWorkingSetSize) estimated from RAM: 2/3 up to 36 GiB, else 3/4 (older macOS: a lower bound)."""
    return ram_bytes * 2 // 3 if ram_bytes <= 36 * GiB else ram_bytes * 3 // 4


# What macOS keeps of physical RAM for itself, as an interval: about 4 GB at idle on a headless 64 GB M2 Max
# (jundot/omlx #1533); 8 GiB is an UNVERIFIED allowance for a desktop session with apps. Plans take the high end.
MACOS_KEEPS_BYTES = (4 * GiB, 8 * GiB)


def apple_ram_pool(ram_bytes: int) -> Pool:
    """Apple's second limit: physical RAM less what macOS keeps (the high end of MACOS_KEEPS_BYTES); everything
    counts against it, Metal buffers, CPU tensors, the prompt cache and checkpoints."""
    return Pool(name="RAM", kind="host", budget_bytes=max(ram_bytes - MACOS_KEEPS_BYTES[1], ram_bytes // 2),
                total_bytes=ram_bytes)


def ram_note(device: Device) -> str:
    """A line for plans on two-limit unified memory: how the RAM limit was set ('' elsewhere)."""
    ram = next((p for p in device.pools if p.kind == "host"), None)
    if not device.unified or ram is None or not any(p.kind == "gpu" for p in device.pools):
        return ""
    kept = ram.total_bytes - ram.budget_bytes
    return (f"{ram.name}: {ram.total_bytes / GiB:.0f} GiB physical less {kept / GiB:.2f} GiB for macOS (it keeps about "
            f"{MACOS_KEEPS_BYTES[0] // GiB}-{MACOS_KEEPS_BYTES[1] // GiB} GiB: 4 GB idle and headless, more with "
            "apps); "
            "everything counts against it, the prompt cache and checkpoints included, while only Metal buffers "
            "count against the Metal working set; --device-budget CPU=SIZE sets it for your machine")


RAM_NOTE = "Host budget is all physical RAM; the OS and other programs need some of it."


def detection_note(device: Device) -> str:
    """What `host_device` found beyond its RAM (GPUs, Metal's estimate, an nvidia-smi failure), for the plan's
    notes; '' for a preset or a plain CPU-only machine."""
    return device.notes if device.id == THIS_MACHINE and device.notes != RAM_NOTE else ""


def host_device(host: Host) -> Device:
    """This machine as a device, from what ops/host.py found: each NVIDIA GPU nvidia-smi lists as a CUDA<i> pool
    (budget: its free memory, what llama.cpp's CUDA backend reads with cudaMemGetInfo for the default split and
    --fit) plus host RAM; on macOS one unified Metal pool (an estimate from hw.memsize); else host RAM only (CPU).
    Its CPU is the host's, which decides what llama.cpp repacks."""
    ram = host.ram_bytes
    if host.platform == "darwin":
        budget = metal_working_set_estimate(ram)
        return Device(
            id=THIS_MACHINE, name=f"this machine (Apple, {ram / GiB:.0f} GiB unified memory, Metal)", unified=True,
            pools=(Pool(name="Metal", kind="gpu", budget_bytes=budget, total_bytes=ram), apple_ram_pool(ram)),
            notes=f"Metal budget {budget / GiB:.1f} GiB is an estimate (2/3 of RAM up to 36 GiB, else 3/4: the "
                  "older macOS default recommendedMaxWorkingSetSize; current macOS gives 74-84%, and sudo sysctl "
                  "iogpu.wired_limit_mb sets it); llama-server's log prints the real value "
                  "(recommendedMaxWorkingSetSize): pass it as --device-budget Metal=<MiB>MiB",
            cpu=host.cpu)
    hostpool = Pool(name="Host", kind="host", budget_bytes=ram, total_bytes=ram)
    gpus, note = host.gpus, host.gpu_note
    ram_note = RAM_NOTE
    if not gpus:
        return Device(id=THIS_MACHINE, name=f"this machine ({ram / GiB:.1f} GiB RAM, CPU only)", unified=True,
                      pools=(hostpool,), notes=" ".join(filter(None, (ram_note, note and note + "."))), cpu=host.cpu)
    pools = tuple(Pool(name=f"CUDA{i}", kind="gpu", budget_bytes=g.free_mib * MiB, total_bytes=g.total_mib * MiB)
                  for i, g in enumerate(gpus))
    names = ", ".join(f"CUDA{i} {g.name} {g.free_mib} of {g.total_mib} MiB free" for i, g in enumerate(gpus))
    return Device(
        id=THIS_MACHINE, name=f"this machine ({len(gpus)} NVIDIA GPU(s) + {ram / GiB:.1f} GiB RAM)", unified=False,
        pools=(*pools, hostpool),
        notes=f"nvidia-smi: {names}. GPU budgets are the memory free now (what llama.cpp's default split and --fit "
              f"read); other processes can take more before the server starts. {ram_note}"
              + (f" {note}." if note else ""),
        sources=(("budget", "nvidia-smi --query-gpu=index,name,memory.total,memory.free"),), cpu=host.cpu)


def _host_ram(host: Host | None, what: str) -> int:
    """This machine's RAM for `what` (a host pool or an RPC server's budget nothing declares); the caller detects
    the host (kvbook.ops.host.detect_host): the planner never reads it."""
    if host is None:
        raise BadInput(f"{what} is this machine's RAM, and no host was given: detect it with "
                       "kvbook.ops.host.detect_host (or declare the budget)")
    return host.ram_bytes


def _gib(option: str, gib: float) -> int:
    if not gib > 0 or gib > 1 << 20:
        raise BadInput(f"{option} must be a positive number of GiB, got {gib}")
    return int(gib * GiB)


def custom_budget(gib: float, cpu: CpuFeatures | None = None) -> Device:
    """One unified pool with the given budget in GiB (everything, host growth included, counts against it,
    as on Apple silicon or a CPU-only machine); `cpu`: the CPU that repacks (kvbook plan gives this machine's)."""
    size = _gib("--budget-gib", gib)
    return Device(
        id=f"budget-{gib:g}gib",
        name=f"custom budget {gib:g} GiB",
        unified=True,
        pools=(Pool(name="Budget", kind="host", budget_bytes=size, total_bytes=size),),
        cpu=cpu,
    )


def custom_discrete(gpu_gib: float, host_gib: float | None = None, machine: Host | None = None) -> Device:
    """A discrete GPU with `gpu_gib` GiB, named CUDA0 as llama.cpp names the common case (other backends:
    --device-budget ROCm0=...), and a host with `host_gib` GiB (this machine's RAM when not given)."""
    gpu = _gib("--gpu-gib", gpu_gib)
    host = (_gib("--host-gib", host_gib) if host_gib is not None
            else _host_ram(machine, "--gpu-gib's host (no --host-gib)"))
    return Device(
        id=f"gpu-{gpu_gib:g}gib",
        name=f"custom GPU {gpu_gib:g} GiB + host {host / GiB:.1f} GiB",
        unified=False,
        pools=(Pool(name="CUDA0", kind="gpu", budget_bytes=gpu, total_bytes=gpu),
               Pool(name="Host", kind="host", budget_bytes=host, total_bytes=host)),
    )


def load_device(device_id: str, host: Host | None = None) -> Device:
    """A preset by id (see `device_ids()`), or this machine; `host` (ops/host.py detect_host) is needed for this
    machine and for a discrete preset without a host pool (its host is this machine's RAM)."""
    if device_id == THIS_MACHINE:
        if host is None:
            raise BadInput("this-machine is the machine kvbook runs on, and no host was given: detect it with "
                           "kvbook.ops.host.detect_host")
        return host_device(host)
    if device_id not in device_ids():
        raise BadInput(f"unknown device '{device_id}'. Try one of: {', '.join(device_ids())}")
    path = params_dir() / "devices" / f"{device_id}.yaml"
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
        pools = tuple(_preset_pool(p, doc["pools"][i]) for i, p in enumerate(pools))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"{path}: not a valid device preset ({type(exc).__name__}: {exc})") from None
    unified = bool(doc.get("unified", False))
    rpc = [p for p in pools if p.kind == "rpc"]
    if [p.name.split("[")[0] for p in rpc] != [f"RPC{i}" for i in range(len(rpc))] or (rpc and unified):
        raise BadInput(f"{path}: RPC pools are named RPC0, RPC1, ... in --rpc order, on a preset with unified: false")
    if not unified and not any(p.kind == "host" for p in pools):
        ram = _host_ram(host, f"the host pool of {device_id} (it declares none)")
        pools = pools + (Pool(name="Host (this machine)", kind="host", budget_bytes=ram, total_bytes=ram),)
    sources = tuple((str(k), str(v)) for k, v in (doc.get("sources") or {}).items())
    if rpc:  # llama.cpp's order whatever the file's: RPC devices first, then the local GPUs
        pools = _ordered(Device(id=device_id, name="", unified=False, pools=tuple(p for p in pools if p.kind != "rpc")), rpc)
    return Device(
        id=device_id,
        name=str(doc.get("name", device_id)),
        unified=unified,
        pools=pools,
        notes=str(doc.get("notes", "")),
        sources=sources,
        cpu=_preset_cpu(path, doc, pools),
    )


def _preset_cpu(path: object, doc: dict[str, Any], pools: tuple[Pool, ...]) -> CpuFeatures:
    """The CPU a preset assumes beside its devices: its `cpu_features` list (avx2, avx512, neon, dotprod, i8mm),
    else the family default (Apple M-series beside Metal: NEON with dotprod; x86-64 with AVX2 otherwise)."""
    from kvbook.plan.weights import host_cpu

    features = doc.get("cpu_features")
    if features is None:
        return host_cpu(Device(id="", name="", unified=False, pools=pools))
    known = ("avx2", "avx512", "neon", "dotprod", "i8mm")
    if not isinstance(features, list) or not all(f in known for f in features):
        raise BadInput(f"{path}: cpu_features must be a list of {', '.join(known)}, got {features!r}")
    return CpuFeatures(f"{doc.get('name', 'the preset')}'s CPU ({', '.join(features) or 'no repack features'}, "
                       "as the preset states)", **{f: True for f in features})


def endpoint_of(pool: Pool) -> str:
    """The endpoint in an RPC pool's name (RPC0[host:port] -> host:port; '' when the name gives none)."""
    return pool.name.split("[", 1)[1].rstrip("]") if "[" in pool.name else ""


def _ordered(device: Device, rpc: Sequence[Pool]) -> tuple[Pool, ...]:
    """llama.cpp's device order (src/llama.cpp llama_prepare_model_devices, default selection): RPC servers
    first ("to minimize network transfers"), then the local GPUs; the host keeps its place in the list."""
    hosts = [p for p in device.pools if p.kind == "host"]
    gpus = [p for p in device.pools if p.kind == "gpu"]
    return (*hosts, *rpc, *gpus) if device.pools[0].kind == "host" else (*rpc, *gpus, *hosts)


def _preset_pool(pool: Pool, entry: dict[str, Any]) -> Pool:
    """A preset's pool checked: kind gpu, host or rpc; an RPC pool's optional `endpoint` (host:port) goes into
    its name as llama.cpp prints it, RPC0[host:port]."""
    if pool.kind not in ("gpu", "host", "rpc"):
        raise ValueError(f"pool {pool.name}: kind must be gpu, host or rpc, not {pool.kind}")
    endpoint = str(entry.get("endpoint") or "")
    if endpoint and pool.kind != "rpc":
        raise ValueError(f"pool {pool.name}: only an rpc pool has an endpoint")
    if not endpoint:
        return pool
    return Pool(name=f"{pool.name}[{endpoint}]", kind=pool.kind, budget_bytes=pool.budget_bytes,
                total_bytes=pool.total_bytes, bandwidth_gbps=pool.bandwidth_gbps)


def with_rpc(device: Device, endpoints: tuple[str, ...], budgets_gib: tuple[float, ...] = (),
             host: Host | None = None) -> Device:
    """`device` with one RPC device per --rpc endpoint, in llama.cpp's order: RPC devices before the local GPUs
    (`_ordered`). RPC pools a preset declares are matched to the endpoints by position (RPC<n> is the n-th;
    a declared endpoint must be that one). An RPC server reports its host's free memory (this build's
    ggml-rpc-server has no memory flag), so an undeclared budget is this machine's RAM, right for loopback;
    give each remote host's budget (--rpc-gib, --device-budget RPC<n>=SIZE) for real ones. `host` gives this
    machine's RAM (ops/host.py); without it an undeclared budget is refused."""
    declared = [p for p in device.pools if p.kind == "rpc"]
    if not endpoints and not declared:
        return device
    if device.unified and any(p.kind == "gpu" for p in device.pools):
        raise BadInput(f"--rpc with {device.name}: RPC devices beside unified memory (Metal) are not modelled yet")
    if budgets_gib and len(budgets_gib) != len(endpoints):
        raise BadInput(f"--rpc-gib has {len(budgets_gib)} budgets for {len(endpoints)} --rpc servers")
    if declared and len(declared) != len(endpoints):
        names = ", ".join(p.name for p in declared)
        if not endpoints:
            raise BadInput(f"{device.id} has {len(declared)} RPC devices ({names}): give llama-server --rpc "
                           "HOST:PORT,... with one endpoint each, in that order")
        raise BadInput(f"{device.id} has {len(declared)} RPC devices ({names}) but llama-server has "
                       f"{len(endpoints)} --rpc endpoints ({','.join(endpoints)})")
    rpc = []
    for i, ep in enumerate(endpoints):
        base = declared[i] if declared else None
        if base is not None and endpoint_of(base) and endpoint_of(base) != ep:
            raise BadInput(f"--rpc: endpoint {i} is {ep} but {device.id} declares {base.name}; fix one of them")
        size = _gib("--rpc-gib", budgets_gib[i]) if budgets_gib else None
        ram = 0 if size or base else _host_ram(host, f"the budget of --rpc {ep} (loopback: this machine's RAM)")
        budget = size or (base.budget_bytes if base else ram)
        rpc.append(Pool(name=f"RPC{i}[{ep}]", kind="rpc", budget_bytes=budget,
                        total_bytes=size or (base.total_bytes if base else ram),
                        bandwidth_gbps=base.bandwidth_gbps if base else None))
    if [p.name for p in declared] == [p.name for p in rpc] and not budgets_gib:
        return device  # already bound to these endpoints
    base_device = replace(device, unified=False, pools=tuple(p for p in device.pools if p.kind != "rpc"))
    name = device.name if declared else f"{device.name} + {len(rpc)} RPC server(s)"
    return replace(device, id=device.id if declared else f"{device.id}+rpc", name=name, unified=False,
                   pools=_ordered(base_device, rpc))


# ------------------------------------------------------------------ --device-budget NAME=SIZE

_UNITS = {"kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024 * GiB, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b)", re.IGNORECASE)
# llama.cpp's device names (ggml_backend_dev_name): one family per backend, numbered; Metal and the CPU alone
_FAMILIES = {"cuda": "CUDA", "rocm": "ROCm", "vulkan": "Vulkan", "sycl": "SYCL", "rpc": "RPC"}
# backend registration order (ggml/src/ggml-backend-reg.cpp ggml_backend_registry): CUDA (ROCm in a HIP build), SYCL, Vulkan
_REG_ORDER = {"CUDA": 0, "ROCm": 0, "SYCL": 1, "Vulkan": 2}
HOST_NAMES = ("CPU", "Host")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes of a size like 24GiB, 22.5GiB, 20000MiB (binary units) or 24GB (decimal)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise BadInput(f"{what}: '{text}' is not a size like 24GiB, 22.5GiB or 20000MiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if not 0 < size <= 1 << 50:
        raise BadInput(f"{what}: '{text}' must be more than 0 and at most 1 PiB")
    return size


def canonical_name(name: str) -> str:
    """A device name as llama.cpp spells it (cuda1 -> CUDA1, host -> CPU); BadInput for any other name."""
    low = name.strip().lower()
    if low in ("cpu", "host"):
        return "CPU"
    if low == "metal":
        return "Metal"
    m = re.fullmatch(r"([a-z]+)(\d+)", low)
    if not m or m.group(1) not in _FAMILIES:
        raise BadInput(f"--device-budget: unknown device name '{name}'; use CUDA<n>, ROCm<n>, Vulkan<n>, SYCL<n>, "
                       "Metal, RPC<n> (the n-th --rpc server) or CPU/Host")
    return f"{_FAMILIES[m.group(1)]}{int(m.group(2))}"


def tensor_limits(values: Sequence[str]) -> dict[str, int]:
    """The `@SIZE` suffixes of --device-budget NAME=SIZE@SIZE: the largest tensor that device accepts (a Vulkan
    device without 64-bit indexing: its maxStorageBufferRange, as vulkaninfo prints it), by llama.cpp name."""
    out = {}
    for item in (x.strip() for v in values for x in v.split(",")):
        name, _, size = item.partition("=")
        if "@" in size:
            canon = canonical_name(name)
            out[canon] = parse_size(size.split("@", 1)[1], f"--device-budget {canon} largest tensor (@SIZE)")
    return out


def parse_device_budgets(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """--device-budget NAME=SIZE entries (repeated and/or comma-separated) as (llama.cpp name, bytes), in the
    order given; one line for a malformed entry or size, an unknown name, a duplicate. A `@SIZE` suffix is the
    device's largest tensor (tensor_limits)."""
    out: dict[str, int] = {}
    for item in (x.strip() for v in values for x in v.split(",")):
        if not item:
            continue
        name, eq, size = item.partition("=")
        size = size.split("@", 1)[0]
        if not eq or not name.strip() or not size.strip():
            raise BadInput(f"--device-budget: '{item}' is not NAME=SIZE (e.g. CUDA0=24GiB)")
        canon = canonical_name(name)
        if canon in out:
            raise BadInput(f"--device-budget: {canon} is given twice")
        out[canon] = parse_size(size, f"--device-budget {canon}")
    if not out:
        raise BadInput("--device-budget: give NAME=SIZE, e.g. CUDA0=24GiB")
    return tuple(out.items())


def _family(name: str) -> str:
    return name.rstrip("0123456789")


def device_from_budgets(budgets: Sequence[tuple[str, int]], host_bytes: int | None = None,
                        machine: Host | None = None) -> Device:
    """The device set the names build (RPC<n> entries are left to `apply_budgets` once --rpc is bound): the
    GPUs in llama.cpp's order (backend registration, then number) plus the host (CPU=, --host-gib, else this
    machine's RAM); Metal alone is one unified pool."""
    local = [(n, b) for n, b in budgets if _family(n) != "RPC"]
    names = [n for n, _ in local]
    gpus = [(n, b) for n, b in local if n not in ("CPU", "Metal")]
    host = dict(local).get("CPU", host_bytes)
    if "Metal" in names:
        if gpus:
            raise BadInput(f"--device-budget: Metal is unified memory and cannot be mixed with discrete GPUs ({gpus[0][0]})")
        if len(budgets) != len(local):
            raise BadInput("--device-budget: RPC devices beside unified memory (Metal) are not modelled yet")
        size = dict(local)["Metal"]
        if host is not None:  # two limits: the Metal working set, and RAM (less what macOS keeps) for everything
            return Device(id="custom-metal", name=f"custom Metal {size / GiB:g} GiB + RAM {host / GiB:g} GiB",
                          unified=True, pools=(Pool(name="Metal", kind="gpu", budget_bytes=size, total_bytes=size),
                                               Pool(name="RAM", kind="host", budget_bytes=host, total_bytes=host)))
        return Device(id="custom-metal", name=f"custom Metal {size / GiB:g} GiB", unified=True,
                      pools=(Pool(name="Metal", kind="gpu", budget_bytes=size, total_bytes=size),),
                      notes="one limit: with no RAM given (CPU=SIZE or --host-gib) everything, host growth included, "
                            "is counted against the Metal working set")
    if {"CUDA", "ROCm"} <= {_family(n) for n, _ in gpus}:
        raise BadInput("--device-budget: CUDA and ROCm devices come from different llama.cpp builds; use one")
    gpus.sort(key=lambda nb: (_REG_ORDER[_family(nb[0])], int(nb[0][len(_family(nb[0])):])))
    ram = host if host is not None else _host_ram(machine, "the host of --device-budget (no CPU=, no --host-gib)")
    host_pool = Pool(name="Host" if host is not None else "Host (this machine)", kind="host", budget_bytes=ram,
                     total_bytes=ram)
    pools = tuple(Pool(name=n, kind="gpu", budget_bytes=b, total_bytes=b) for n, b in gpus) + (host_pool,)
    label = " + ".join(f"{n} {b / GiB:g} GiB" for n, b in gpus) or "CPU only"
    return Device(id="custom-devices", name=f"custom {label} + host {ram / GiB:.1f} GiB", unified=not gpus,
                  pools=pools if gpus else (host_pool,))


def apply_budgets(device: Device, budgets: Sequence[tuple[str, int]]) -> Device:
    """`device` with the named pools' budgets replaced (CPU/Host: the host pool; RPC<n>: the n-th RPC device);
    one line for a name the device does not have."""
    by_name = {("CPU" if p.kind == "host" else llama_name(p)): p for p in device.pools}
    if device.unified and len(device.pools) == 1 and device.pools[0].kind == "host":
        by_name = {"CPU": device.pools[0]}
    new = {}
    for name, size in budgets:
        if name not in by_name:
            have = ", ".join(by_name)
            hint = " (RPC<n> is the n-th llama-server --rpc endpoint)" if _family(name) == "RPC" else ""
            raise BadInput(f"--device-budget: {device.name} has no device {name}{hint}; its devices: {have}")
        new[by_name[name].name] = size
    pools = tuple(Pool(name=p.name, kind=p.kind, budget_bytes=new[p.name], total_bytes=max(p.total_bytes, new[p.name]),
                       bandwidth_gbps=p.bandwidth_gbps) if p.name in new else p for p in device.pools)
    return replace(device, pools=pools)


def resolve_device(*, preset: str | None = None, budget_gib: float | None = None, gpu_gib: float | None = None,
                   host_gib: float | None = None, device_budgets: Sequence[str] = (), rpc_gib: str | None = None,
                   endpoints: tuple[str, ...] = (), host: Host | None = None) -> Device:
    """The device `kvbook plan` plans on, from its options and llama-server's --rpc list; `host` is this machine
    as ops/host.py detected it (this-machine, a custom budget's CPU, a host no option gives). --device-budget
    overrides pools of the preset (or this machine) or, without --device, names the devices itself; it does
    not go with --budget-gib / --gpu-gib (they name the devices too); --host-gib sets the host with --gpu-gib
    or --device-budget; RPC budgets come from --rpc-gib or RPC<n>=, not both."""
    budgets = parse_device_budgets(device_budgets) if device_budgets else ()
    names = [n for n, _ in budgets]
    for option, value in (("--budget-gib", budget_gib), ("--gpu-gib", gpu_gib)):
        if value is not None and budgets:
            raise BadInput(f"--device-budget with {option}: both name the devices; use one "
                           "(--device-budget CUDA0=24GiB --host-gib 64 for a GPU and a host)")
    if host_gib is not None and gpu_gib is None and not budgets and not preset:
        raise BadInput("--host-gib goes with --gpu-gib, --device-budget or --device (a discrete GPU); for one unified pool "
                       "use --budget-gib")
    if host_gib is not None and "CPU" in names:
        raise BadInput("--host-gib with --device-budget CPU=...: both give the host's budget; use one")
    rpc_named = [n for n in names if _family(n) == "RPC"]
    if rpc_gib is not None:
        if not endpoints:
            raise BadInput("--rpc-gib goes with llama-server --rpc host:port,...")
        if rpc_named:
            raise BadInput(f"--rpc-gib with --device-budget {rpc_named[0]}=...: both give RPC budgets; use one")
    for name in rpc_named:
        if int(name[3:]) >= len(endpoints):
            raise BadInput(f"--device-budget {name}: no matching llama-server --rpc endpoint ({name} is endpoint "
                           f"{int(name[3:]) + 1} of --rpc; the command line has {len(endpoints)})")
    rpc_budgets: tuple[float, ...] = ()
    if rpc_gib is not None:
        try:
            rpc_budgets = tuple(float(x) for x in rpc_gib.split(","))
        except ValueError:
            raise BadInput(f"--rpc-gib: '{rpc_gib}' is not a comma-separated list of GiB") from None
    if budget_gib is not None:
        device = custom_budget(budget_gib, host.cpu if host else None)
    elif gpu_gib is not None:
        device = custom_discrete(gpu_gib, host_gib, host)
    elif preset:
        device = load_device(preset, host)
    elif budgets:
        device = device_from_budgets(budgets, _gib("--host-gib", host_gib) if host_gib is not None else None, host)
    else:
        device = load_device(THIS_MACHINE, host)
    if preset and host_gib is not None:
        budgets = (*budgets, ("CPU", _gib("--host-gib", host_gib)))
    device = with_rpc(device, endpoints, rpc_budgets, host)
    overrides = budgets if preset else tuple((n, b) for n, b in budgets if _family(n) == "RPC")
    device = apply_budgets(device, overrides) if overrides else device
    limits = tensor_limits(device_budgets)
    if not limits:
        return device
    unknown = set(limits) - {llama_name(p) for p in device.pools}
    if unknown:
        raise BadInput(f"--device-budget {sorted(unknown)[0]}@...: no such device in this plan")
    return replace(device, pools=tuple(replace(p, max_tensor_bytes=limits.get(llama_name(p), p.max_tensor_bytes))
                                       for p in device.pools))


def llama_name(pool: Pool) -> str:
    """The name llama.cpp gives the device of an offload pool (what -dev takes): RPC0[host:port] -> RPC0."""
    return pool.name.split("[", 1)[0]


# llama_max_devices() (src/llama.cpp): common/arg.cpp refuses -ts with that many entries or more
MAX_DEVICES = 16
METAL_DEVICE = "MTL0"  # the name llama.cpp's Metal backend gives its device (ggml-metal-device.m: "MTL%d")


def split_shares(tensor_split: Sequence[float], n_devices: int) -> list[float]:
    """The -ts shares llama.cpp uses over `n_devices` offload devices (src/llama-model.cpp load_tensors):
    missing entries are 0 (arg.cpp fills them), all zero means the default split (by free memory: [] here), and
    one device or none splits nothing ([]); more entries than devices is refused (checked in `effective_device`)."""
    if n_devices < 2:
        return []
    if len(tensor_split) > n_devices:
        raise BadInput(f"-ts has {len(tensor_split)} entries but the plan has {n_devices} offload devices")
    shares = [float(x) for x in tensor_split] + [0.0] * (n_devices - len(tensor_split))
    return shares if any(shares) else []


def _unified_gpu(device: Device) -> Pool | None:
    """The one GPU of unified memory (Metal), which llama.cpp counts as a device; None otherwise."""
    return next((p for p in device.pools if p.kind == "gpu"), None) if device.unified else None


def _check_split(flags: ServerFlags, have: Sequence[str], used: Sequence[str]) -> None:
    """-ts against the devices (llama.cpp ignores entries past its device count; kvbook refuses more entries
    than the plan's devices, as the issue asks): with two or more devices in use, at most one entry each;
    with one device or none in use (-dev, -sm none, one GPU, CPU only) -ts changes nothing, and is refused
    only when it names more devices than the machine has (a CPU-only plan takes any -ts, as llama.cpp does)."""
    n = len(flags.tensor_split)
    if not n:
        return
    if n >= MAX_DEVICES:
        raise BadInput(f"-ts: got {n} input configs, but system only has {MAX_DEVICES} devices (llama-server refuses it)")
    if len(used) > 1 and n > len(used):
        raise BadInput(f"-ts has {n} entries but the plan has {len(used)} devices ({', '.join(used)})")
    if len(used) <= 1 and have and n > len(have):
        raise BadInput(f"-ts has {n} entries but the plan has {len(have)} device{'s' if len(have) > 1 else ''} "
                       f"({', '.join(have)})")


def split_note(flags: ServerFlags, device: Device) -> str:
    """A note when -ts is given but changes nothing: one offload device in use, or none ('' otherwise)."""
    gpu = _unified_gpu(device)
    used = [gpu.name] if gpu is not None else [p.name for p in device.pools if p.kind in ("gpu", "rpc")]
    if gpu is not None and (flags.devices == ("none",) or (flags.split_mode == "none" and flags.main_gpu < 0)):
        used = []
    if not flags.tensor_split or len(used) > 1:
        return ""
    where = f"one offload device ({used[0]})" if used else "no offload device (CPU only)"
    return (f"-ts {','.join(f'{x:g}' for x in flags.tensor_split)} changes nothing with {where}: llama.cpp "
            "splits layers only between several devices (src/llama-model.cpp load_tensors)")


def sm_tensor_refusal(device: Device, flags: ServerFlags) -> str:
    """Why -sm tensor is refused, in one line: without an offload device the server itself refuses it (src/llama.cpp
    llama_prepare_model_devices skips every CPU-buffer device: "LLAMA_SPLIT_MODE_TENSOR needs >= 1 devices"); with
    one, every tensor is split over a meta device (ggml_backend_meta_device, llama_meta_device_get_split_state),
    which kvbook does not model and this CPU-only machine cannot check."""
    if flags.devices == ("none",) or not any(p.kind in ("gpu", "rpc") for p in device.pools):
        return ("-sm tensor without an offload device: llama-server refuses it (LLAMA_SPLIT_MODE_TENSOR needs >= 1 "
                "devices; the CPU is never one) and fails to load the model; use -sm layer")
    return ("-sm tensor changes memory (every weight, KV and compute tensor split over a meta device of the GPUs: "
            "ggml_backend_meta_device) and kvbook does not model it yet; its split is unchecked here (no GPU)")


def effective_device(device: Device, flags: ServerFlags) -> Device:
    """The devices llama.cpp uses for this command line (src/llama.cpp llama_prepare_model_devices): -dev picks
    and orders the offload devices (names case-insensitive, as ggml_backend_dev_by_name; none: no offload),
    -sm none keeps only device -mg (none when -mg < 0); -sm row needs split buffers on every device in use
    (`_check_row`) and -sm tensor is not modelled. On unified memory the one device is Metal's MTL0 and the pool stays as it is."""
    offload = [] if device.unified else [p for p in device.pools if p.kind in ("gpu", "rpc")]
    if flags.split_mode == "tensor":
        raise BadInput(sm_tensor_refusal(device, flags))
    gpu = _unified_gpu(device)
    if gpu is not None:
        _unified_selection(flags, gpu)
        _check_row(flags, [] if flags.devices == ("none",) else [METAL_DEVICE])
        return device
    chosen = offload
    if flags.devices:
        by_name = {llama_name(p).lower(): p for p in offload}
        unknown = [n for n in flags.devices if n != "none" and n.lower() not in by_name]
        if unknown:
            have = ", ".join(llama_name(p) for p in offload) or "none (CPU only)"
            raise BadInput(f"-dev: invalid device: {unknown[0]} (llama-server refuses it); this plan's devices: {have}")
        twice = next((n for i, n in enumerate(flags.devices) if n.lower() in (m.lower() for m in flags.devices[:i])), None)
        if twice:
            raise BadInput(f"-dev {','.join(flags.devices)}: {twice} is named twice (llama.cpp would use it as two "
                           "devices, which kvbook does not model); name each device once")
        chosen = [] if flags.devices == ("none",) else [by_name[n.lower()] for n in flags.devices]
    if flags.split_mode == "none" and chosen:
        if flags.main_gpu >= len(chosen):
            raise BadInput(f"-mg {flags.main_gpu}: invalid value for main_gpu: {flags.main_gpu} (available devices: "
                           f"{len(chosen)}); llama-server refuses it with -sm none")
        chosen = [] if flags.main_gpu < 0 else [chosen[flags.main_gpu]]
    _check_split(flags, [llama_name(p) for p in offload], [llama_name(p) for p in chosen])
    _check_row(flags, [llama_name(p) for p in chosen])
    if chosen == offload:
        return device
    hosts = [p for p in device.pools if p.kind == "host"]
    pools = (*hosts, *chosen) if device.pools[0].kind == "host" else (*chosen, *hosts)
    return replace(device, pools=tuple(pools))


def _check_row(flags: ServerFlags, used: Sequence[str]) -> None:
    """-sm row as the pinned build takes it (src/llama-model.cpp make_gpu_buft_list): each device in use must offer
    a split buffer type, which only SYCL (and Hexagon) do here (CUDA, ROCm, Vulkan, Metal and RPC do not: llama-server
    fails to load the model); with no device in use it changes nothing."""
    if flags.split_mode != "row" or not used:
        return
    plain = next((n for n in used if _family(n) != "SYCL"), None)
    if plain is not None:
        raise BadInput(f"-sm row: device {plain} does not support split buffers (llama-server refuses it when it loads "
                       "the model; this build splits rows on SYCL only)")
    raise BadInput("-sm row changes memory (weights split by rows across SYCL GPUs) and kvbook does not model it yet")


def _unified_selection(flags: ServerFlags, gpu: Pool) -> None:
    """-dev / -sm none / -ts on unified memory, checked as llama.cpp checks them against its one device (MTL0);
    whichever is chosen, everything stays in the one pool (with -dev none the CPU backend computes)."""
    for name in flags.devices:
        if name != "none" and name.lower() != METAL_DEVICE.lower():
            hint = f" (Metal's device is {METAL_DEVICE})" if name.lower() == gpu.name.lower() else ""
            raise BadInput(f"-dev: invalid device: {name} (llama-server refuses it){hint}; this plan's devices: "
                           f"{METAL_DEVICE}")
    if len(flags.devices) > 1:
        raise BadInput(f"-dev {','.join(flags.devices)}: {METAL_DEVICE} is named twice (name each device once)")
    used = 0 if flags.devices == ("none",) else 1
    if flags.split_mode == "none" and used and flags.main_gpu >= 1:
        raise BadInput(f"-mg {flags.main_gpu}: invalid value for main_gpu: {flags.main_gpu} (available devices: 1); "
                       "llama-server refuses it with -sm none")
    _check_split(flags, [METAL_DEVICE], [METAL_DEVICE] * used)
