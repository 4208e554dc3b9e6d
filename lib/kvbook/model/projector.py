"""Read a multimodal projector GGUF (`--mmproj`, `--mmproj-url`, the one `-hf` fetches) into a ProjectorArch:
its clip.* keys (tools/mtmd/clip-impl.h names them) and the bytes of its tensors, from the header only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvbook.errors import BadInput, ModelError
from kvbook.interface import ProjectorArch
from kvbook.model.ggufio import read_local, read_remote


def _u32(meta: dict[str, Any], key: str, source: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or value < 0:
        raise ModelError(f"{source}: projector GGUF lacks '{key}'")
    return value


def projector_from_metadata(meta: dict[str, Any], weights_bytes: int, source: str) -> ProjectorArch:
    """The vision tower's shapes; an audio-only or mixed projector is refused by name (its compute is not
    modelled)."""
    if meta.get("general.architecture") != "clip":
        raise BadInput(f"{source}: not a projector GGUF (general.architecture is "
                       f"'{meta.get('general.architecture')}', a projector's is 'clip')")
    vision, audio = bool(meta.get("clip.has_vision_encoder")), bool(meta.get("clip.has_audio_encoder"))
    kind = str(meta.get("clip.vision.projector_type") or meta.get("clip.projector_type") or "unknown")
    if audio:
        raise BadInput(f"{source}: a projector with an audio encoder ({kind}): kvbook does not model its "
                       "memory yet")
    if not vision:
        raise BadInput(f"{source}: the projector has no vision encoder, which is all kvbook models")

    def g(key: str) -> int:
        return _u32(meta, f"clip.vision.{key}", source)

    return ProjectorArch(source=source, projector_type=kind, vision=vision, audio=audio, n_embd=g("embedding_length"),
                         n_ff=g("feed_forward_length"), n_layer=g("block_count"), n_head=g("attention.head_count"),
                         image_size=g("image_size"), patch_size=g("patch_size"), weights_bytes=weights_bytes)


def load_projector(spec: str) -> ProjectorArch:
    """A projector from a local path or an http(s) URL (header over HTTP Range)."""
    if spec.startswith(("http://", "https://")):
        header = read_remote(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BadInput(f"--mmproj: file not found: {spec}")
        header = read_local(path)
    return projector_from_metadata(header.metadata, header.tensor_bytes, spec)
