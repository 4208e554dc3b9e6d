"""What a llama-server command line loads: the model (GGUF path or URL, preset, config.json, `-hf`, `-mu`) with
its projector (--mmproj, or the one -hf fetches), its draft (-md, -hfd) and its LoRA adapters attached, and notes
on how each was found. This is where a plan's I/O happens (headers read, the hub asked); the planner gets the
result as data (kvbook.plan.api.PlanRequest)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from kvbook.errors import BadInput
from kvbook.interface import LoraAdapter, ModelArch, Note, ServerFlags
from kvbook.model.arch import UnknownArchitecture
from kvbook.model.sources import load_model


@dataclass(frozen=True)
class ResolvedModel:
    """The model a command line loads, with projector, draft and LoRA adapters attached. `has_rule` False: its
    architecture has no kvbook rule, `arch` is only the shape its common keys give, and its memory must come from
    llama.cpp's own accounting of `source` (kvbook.plan.api.FitFallback); `unknown` says why."""

    arch: ModelArch
    source: str  # the file or URL that loads
    notes: tuple[Note, ...] = ()
    has_rule: bool = True
    unknown: str = ""


def _with_token(environ: Mapping[str, str], flags: ServerFlags) -> Mapping[str, str]:
    """-hft wins over HF_TOKEN, as in the server (the flag after the variable)."""
    return {**environ, "HF_TOKEN": flags.hf_token} if flags.hf_token else environ


def model_source(flags: ServerFlags, environ: Mapping[str, str]) -> tuple[str, str, tuple[Note, ...]]:
    """What llama-server loads: the model (a path or URL), the projector ('' for none), and notes on how they
    were found. `-hf` is the file the pinned build would fetch from the hub (MODEL_ENDPOINT / HF_ENDPOINT),
    and it wins over -m; its repo's projector comes too unless --no-mmproj or --mmproj/--mmproj-url is given."""
    if flags.model_url:
        note = Note("model.url", f"-mu: the model is the file llama-server downloads from {flags.model_url}, "
                    "planned from its header")
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
    notes = [Note("model.hf", f"-hf {flags.hf_repo}: {hub.model_path}{shards} from {hub.repo} at {hub.commit[:12]}, "
                  f"as llama-server picks it ({how}); planned from its header over HTTP Range")]
    if flags.model:
        notes.append(Note("model.hf-wins-over-m",
                          f"-m {flags.model} is not what loads: with -hf, llama-server loads the file it fetched"))
    if hub.mmproj_path and flags.no_mmproj:
        notes.append(Note("projector.not-loaded", f"--no-mmproj: the repo's projector {hub.mmproj_path} is not loaded"))
    if auto:
        notes.append(Note("projector.from-hf",
                          f"-hf also fetches the repo's projector {hub.mmproj_path} (--no-mmproj to leave it out)"))
    return hub.model_urls[0], (hub.mmproj_url or "") if auto else flags.mmproj, tuple(notes)


def _draft_source(flags: ServerFlags, environ: Mapping[str, str]) -> tuple[str, tuple[Note, ...]]:
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
    return hub.model_urls[0], (Note("draft.from-hfd",
                                    f"-hfd {flags.draft_hf_repo}: the draft is {hub.model_path}, as llama-server picks it"),)


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


# src/models/<arch>.cpp load_arch_tensors of these architectures: without llama_model_params.load_mtp (common sets it
# only for --spec-type draft-mtp) the NextN/MTP layers' tensors are created with TENSOR_SKIP, and
# src/llama-model-loader.cpp create_tensor then ignores them ("model has unused tensor"): not allocated, not mapped
MTP_SKIPPED_ARCHS = frozenset({"bailingmoe3", "cohere2moe", "deepseek2", "deepseek32", "deepseek4", "glm-dsa", "glm4moe",
                               "glm5-next", "hy_v3", "mimo2", "nemotron_h", "nemotron_h_moe", "qwen35", "qwen35moe",
                               "qwen3next", "qwen4exp", "step35"})


def _nextn_layer(name: str, n_layer: int) -> bool:
    """A tensor (blk.N.*) or tensor group (LN, LN.exps) of a NextN/MTP layer: N at or past the trunk's n_layer."""
    head = name[4:].partition(".")[0] if name.startswith("blk.") else name[1:].partition(".")[0] if name[:1] == "L" else ""
    return head.isdigit() and int(head) >= n_layer


def loaded_weights(arch: ModelArch, flags: ServerFlags) -> ModelArch:
    """The model as llama-server loads it under `flags`: without --spec-type draft-mtp the NextN/MTP layers' tensors
    of MTP_SKIPPED_ARCHS are skipped, so neither their tensors nor their bytes count (a model known only by its
    shapes keeps its file size: the plan then over-counts those layers, on the safe side)."""
    if "draft-mtp" in flags.spec_types or not arch.n_layer_nextn or arch.arch not in MTP_SKIPPED_ARCHS:
        return arch
    tensors = tuple(t for t in arch.tensors if not _nextn_layer(t.name, arch.n_layer))
    groups = tuple((g, n) for g, n in arch.tensor_groups if not _nextn_layer(g, arch.n_layer))
    skipped = (sum(t.nbytes for t in arch.tensors) - sum(t.nbytes for t in tensors) if arch.tensors
               else sum(n for _, n in arch.tensor_groups) - sum(n for _, n in groups))
    if not skipped:
        return arch
    return replace(arch, tensors=tensors, tensor_groups=groups, weights_bytes=arch.weights_bytes - skipped,
                   file_model=arch)


def resolve_model(flags: ServerFlags, environ: Mapping[str, str]) -> ResolvedModel:
    """The model `flags` load, as llama-server would find it (`environ`: the server's environment, for HF_TOKEN
    and the hub endpoint); an architecture without a kvbook rule resolves to its generic shape when llama.cpp's
    own accounting can size it (a local file or a URL), else raises UnknownArchitecture."""
    source, mmproj, notes = model_source(flags, environ)
    projector = None
    if mmproj:
        from kvbook.model.projector import load_projector

        projector = load_projector(mmproj)
        notes = (*notes, Note("projector.loaded", f"projector {projector.projector_type} from {mmproj}: weights exact "
                                                  "(its tensors), compute buffer estimated from the vision tower's shapes"))
    draft_source, draft_notes = _draft_source(flags, environ)
    draft = _draft(flags, draft_source)
    if draft is not None:
        notes = (*notes, *draft_notes, Note("draft.loaded", f"draft model {draft.name} ({draft.arch}) from "
                                            f"{draft_source}: its own context of the target's n_ctx, sized by kvbook's rules"))
    loras = _loras(flags)
    if loras:
        notes = (*notes, Note("lora.loaded", f"LoRA adapters: {len(loras)} file(s), {sum(a.buffer_bytes for a in loras)} "
                                             "bytes of buffers (exact on the CPU; a GPU buffer pads each tensor to its own "
                                             "alignment)"))
    try:
        arch = replace(load_model(source), projector=projector, draft=draft, loras=loras)
    except UnknownArchitecture as e:
        remote = source.startswith(("http://", "https://"))
        if e.generic is None or not (remote or Path(source).expanduser().is_file()):
            raise
        generic = replace(e.generic, projector=projector, draft=draft, loras=loras)
        return ResolvedModel(generic, source, notes, has_rule=False, unknown=str(e))
    for adapter in loras:
        if adapter.arch != arch.arch:
            raise BadInput(f"--lora {adapter.source}: an adapter for '{adapter.arch}', the model is '{arch.arch}' "
                           "(llama-server refuses it)")
    return ResolvedModel(loaded_weights(arch, flags), source, notes)
