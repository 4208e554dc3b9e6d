"""Plan any model: kvbook's rules where it has them, llama.cpp's own accounting (llama-fit-params on the
file, or on a sparse local copy of a remote file's header) for any other architecture llama.cpp loads,
labelled as such. `-hf` is resolved to the file llama-server would fetch first."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from kvbook.errors import BadInput
from kvbook.interface import Device, LoraAdapter, MemoryPlan, ModelArch, Plan, ServerFlags
from kvbook.memory.rules import draft_memory, with_projector
from kvbook.model.arch import UnknownArchitecture
from kvbook.model.sources import load_model
from kvbook.plan.planner import make_plan
from kvbook.plan.solver import with_placement_alternative


def _with_token(environ: Mapping[str, str], flags: ServerFlags) -> Mapping[str, str]:
    """-hft wins over HF_TOKEN, as in the server (the flag after the variable)."""
    return {**environ, "HF_TOKEN": flags.hf_token} if flags.hf_token else environ


def model_source(flags: ServerFlags, environ: Mapping[str, str]) -> tuple[str, str, tuple[str, ...]]:
    """What llama-server loads: the model (a path or URL), the projector ('' for none), and notes on how they
    were found. `-hf` is the file the pinned build would fetch from the hub (MODEL_ENDPOINT / HF_ENDPOINT),
    and it wins over -m; its repo's projector comes too unless --no-mmproj or --mmproj/--mmproj-url is given."""
    if flags.model_url:
        note = f"-mu: the model is the file llama-server downloads from {flags.model_url}, planned from its header"
        return flags.model_url, flags.mmproj, (note,)
    if not flags.hf_repo:
        return flags.model, flags.mmproj, ()
    from kvbook.model.hub import resolve_hf

    if flags.offline:
        raise BadInput("-hf with --offline: llama-server then picks the file from its local cache, which kvbook does "
                       "not read; pass that file with -m")
    hub = resolve_hf(flags.hf_repo, flags.hf_file, _with_token(environ, flags))
    auto = bool(hub.mmproj_url and not flags.no_mmproj and not flags.mmproj)
    shards = f" ({len(hub.model_urls)} split files)" if len(hub.model_urls) > 1 else ""
    how = f"-hff {hub.model_path}" if flags.hf_file else f"quant '{hub.tag}'" if hub.tag else "the default quant"
    notes = [f"-hf {flags.hf_repo}: {hub.model_path}{shards} from {hub.repo} at {hub.commit[:12]}, as llama-server "
             f"picks it ({how}); planned from its header over HTTP Range"]
    if flags.model:
        notes.append(f"-m {flags.model} is not what loads: with -hf, llama-server loads the file it fetched")
    if hub.mmproj_path and flags.no_mmproj:
        notes.append(f"--no-mmproj: the repo's projector {hub.mmproj_path} is not loaded")
    if auto:
        notes.append(f"-hf also fetches the repo's projector {hub.mmproj_path} (--no-mmproj to leave it out)")
    return hub.model_urls[0], (hub.mmproj_url or "") if auto else flags.mmproj, tuple(notes)


def _fit_memory(source: str, flags: ServerFlags, generic: ModelArch) -> tuple[MemoryPlan, str]:
    """llama-fit-params' accounting for a local file, or for a sparse copy of a remote file's header."""
    from kvbook.ops.fit_params import memory_from_fit

    path = Path(source).expanduser()
    if path.is_file():
        return memory_from_fit(path, flags, generic), "llama-fit-params on this file"
    if source.startswith(("http://", "https://")):
        from kvbook.model.ggufio import sparse_remote_copy

        with tempfile.TemporaryDirectory(prefix="kvbook-sparse-") as tmp:
            first = sparse_remote_copy(source, Path(tmp))
            return (memory_from_fit(first, flags, generic),
                    "llama-fit-params on a sparse local copy of the remote header: tensor data not downloaded")
    raise BadInput(f"{source}: no GGUF to run llama-fit-params on")


def _draft_source(flags: ServerFlags, environ: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """The draft file: -md, or the model file of the -hfd repo as llama-server picks it (common/arg.cpp: with
    no --spec-type it looks for speculative sidecars in that repo first)."""
    if not flags.draft_hf_repo:
        return flags.draft_model, ()
    if flags.draft_model:
        raise BadInput("-md with -hfd: which file llama-server then loads is not modelled yet; give one of them")
    from kvbook.model.hub import resolve_hf

    hub = resolve_hf(flags.draft_hf_repo, flags.draft_hf_file, _with_token(environ, flags))
    if hub.sidecars and not flags.draft_hf_file:  # a named draft file turns the sidecar search off
        raise BadInput(f"-hfd {flags.draft_hf_repo}: the repo ships the speculative sidecar {hub.sidecars[0]}, which "
                       "llama-server would run instead of a draft model (MTP/EAGLE3/DFlash), not modelled yet")
    return hub.model_urls[0], (f"-hfd {flags.draft_hf_repo}: the draft is {hub.model_path}, as llama-server picks it",)


def _draft(flags: ServerFlags, source: str) -> ModelArch | None:
    """The -md / -hfd draft model, which kvbook must have a rule for (its context is planned like the target's)."""
    if not source:
        return None
    try:
        draft = load_model(source)
    except UnknownArchitecture as e:
        raise BadInput(f"-md {source}: {e}; a draft of an architecture without a kvbook rule is not "
                       "planned yet") from None
    if draft.n_layer_nextn:
        raise BadInput(f"-md {source}: the draft has NextN/MTP layers, so llama-server runs it as an MTP "
                       "draft, which kvbook does not model yet")
    if not draft.weights_exact:
        raise BadInput(f"-md {source}: a draft model must be a GGUF (path or URL) or a preset whose tensor "
                       "listing is exact")
    return draft


def _loras(flags: ServerFlags) -> tuple[LoraAdapter, ...]:
    if not flags.lora:
        return ()
    from kvbook.model.lora import load_lora

    return tuple(load_lora(f) for f in flags.lora)


def plan_any(flags: ServerFlags, device: Device, environ: Mapping[str, str] | None = None) -> Plan:
    """The plan for `flags` on `device`; an architecture without a kvbook rule is sized by llama-fit-params. The
    user's saved compute calibrations (kvbook check-log --save-calibration) come with the device."""
    from kvbook.ops.calibration import with_calibrations

    device = with_calibrations(device)
    source, mmproj, notes = model_source(flags, os.environ if environ is None else environ)
    projector = None
    if mmproj:
        from kvbook.model.projector import load_projector

        projector = load_projector(mmproj)
        notes = (*notes, f"projector {projector.projector_type} from {mmproj}: weights exact (its tensors), compute "
                         "buffer estimated from the vision tower's shapes")
    draft_source, draft_notes = _draft_source(flags, os.environ if environ is None else environ)
    draft = _draft(flags, draft_source)
    if draft is not None:
        notes = (*notes, *draft_notes, f"draft model {draft.name} ({draft.arch}) from {draft_source}: its own context "
                                       "of the target's n_ctx, sized by kvbook's rules")
    loras = _loras(flags)
    if loras:
        notes = (*notes, f"LoRA adapters: {len(loras)} file(s), {sum(a.buffer_bytes for a in loras)} bytes of buffers "
                         "(exact on the CPU; a GPU buffer pads each tensor to its own alignment)")
    try:
        arch = replace(load_model(source), projector=projector, draft=draft, loras=loras)
    except UnknownArchitecture as e:
        remote = source.startswith(("http://", "https://"))
        if e.generic is None or not (remote or Path(source).expanduser().is_file()):
            raise
        generic = replace(e.generic, projector=projector, draft=draft, loras=loras)
        memory, how = _fit_memory(source, flags, generic)
        memory = replace(memory, projector=with_projector(generic, memory.shape, flags),
                         draft=draft_memory(generic, memory.shape, flags),
                         lora_bytes=sum(a.buffer_bytes for a in loras))
        plan = make_plan(generic, flags, device, memory=memory, accounting="llama-fit-params")
        note = (f"architecture '{e.generic.arch}' has no kvbook rule: caches and compute are llama.cpp's own "
                f"accounting ({how}, MiB to two decimals); the largest context and alternatives are not searched")
        return replace(plan, notes=(*notes, note, *plan.notes))
    for adapter in loras:
        if adapter.arch != arch.arch:
            raise BadInput(f"--lora {adapter.source}: an adapter for '{adapter.arch}', the model is '{arch.arch}' "
                           "(llama-server refuses it)")
    plan = with_placement_alternative(make_plan(arch, flags, device), arch, flags, device)
    return replace(plan, notes=(*notes, *plan.notes)) if notes else plan
