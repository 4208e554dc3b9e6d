"""Resolve `-hf user/repo[:quant]` (and `-hff FILE`) to the files the pinned llama-server would fetch.

Facts from the pinned build (common/download.cpp, common/hf-cache.cpp, common/common.cpp), re-stated:
- the hub is `MODEL_ENDPOINT`, else `HF_ENDPOINT`, else https://huggingface.co/ (a trailing `/` added);
- the listing: GET `api/models/REPO/refs` (branch `main`, else the first valid one, gives a 40-hex commit),
  then GET `api/models/REPO/tree/COMMIT?recursive=true` (entries of type `file`); each file is fetched
  from `REPO/resolve/COMMIT/PATH`;
- `preset.ini` at the repo root makes the server fetch only that (router mode);
- with `-hff`, the file with exactly that path; else the first model file (not mmproj, imatrix or a
  speculative sidecar) whose path matches `TAG[.-]` (case-insensitive; TAG defaults to Q4_K_M then
  Q8_0), skipping split shards other than the first; with no tag given and no match, the first model file;
- the split files of the chosen model (same prefix and shard count) are all fetched;
- an mmproj is picked among the `.gguf` files with `mmproj` in the path that sit in the model's folder or
  one above it: the deepest folder, then the quantization bits closest to the model's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvbook.errors import BadInput, ModelError

DEFAULT_ENDPOINT = "https://huggingface.co/"
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
SIDECARS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")  # never the model itself
MAX_LISTING_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class HubFiles:
    """What llama-server fetches for one `-hf`: the model (every split shard, first one first) and the
    projector it loads automatically, as URLs on the hub."""

    repo: str
    tag: str
    commit: str
    model_path: str
    model_urls: tuple[str, ...]
    mmproj_path: str | None
    mmproj_url: str | None
    sidecars: tuple[str, ...] = ()  # speculative sidecars the repo ships (mtp-, eagle3-, dflash-, dspark- GGUFs)


def endpoint(environ: Mapping[str, str]) -> str:
    """The hub llama-server talks to: MODEL_ENDPOINT, else HF_ENDPOINT, else huggingface.co."""
    value = environ.get("MODEL_ENDPOINT") or environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return value if value.endswith("/") else value + "/"


def split_repo_tag(value: str) -> tuple[str, str]:
    """`user/model[:quant]` -> (repo, quant); the quant is the text after the last ':'."""
    parts = value.split(":")
    repo, tag = parts[0], (parts[-1] if len(parts) > 1 else "")
    if len(repo.split("/")) != 2:
        raise BadInput(f"-hf '{value}': invalid Hugging Face repo, expected <user>/<model>[:quant]")
    return repo, tag


def valid_repo_id(repo: str) -> bool:
    """The pinned build's check: letters, digits, '_' and single '-', '.', '/' between them; one '/'."""
    if not repo or len(repo) > 256 or repo.count("/") != 1:
        return False
    return re.fullmatch(r"[A-Za-z0-9_]+(?:[-./][A-Za-z0-9_]+)*", repo) is not None


@dataclass(frozen=True)
class SplitInfo:
    prefix: str
    tag: str
    index: int
    count: int


_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


def split_info(path: str) -> SplitInfo | None:
    """A GGUF path's name without shard suffix, its quant tag (upper case), shard index and count."""
    if not path.endswith(".gguf"):
        return None
    prefix, index, count = path[:-5], 1, 1
    match = _SPLIT.match(prefix)
    if match:
        prefix, index, count = match.group(1), int(match.group(2)), int(match.group(3))
    tag = _TAG.search(prefix)
    return SplitInfo(prefix, tag.group(1).upper() if tag else "", index, count)


def quant_bits(tag: str) -> int:
    """Q4_K_M -> 4, F16 -> 16, MXFP4 -> 4: the number from the first digit on (0 without digits)."""
    match = re.search(r"\d+", tag)
    return int(match.group(0)) if match else 0


def is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(s in name for s in SIDECARS)


def _first_shard(path: str) -> bool:
    info = split_info(path)
    return info is None or info.count <= 1 or info.index == 1


def best_model(files: Sequence[str], tag: str) -> str | None:
    """The model file llama-server picks for `tag` ('' = its defaults, then any model file)."""
    for t in ([tag] if tag else list(DEFAULT_TAGS)):
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        for f in files:
            if is_model_file(f) and pattern.search(f) and _first_shard(f):
                return f
    if not tag:
        return next((f for f in files if is_model_file(f) and _first_shard(f)), None)
    return None


def split_files(files: Sequence[str], primary: str) -> tuple[str, ...]:
    """Every shard of `primary` among `files` (just `primary` when it is not split), first shard first."""
    info = split_info(primary)
    if info is None or info.count <= 1:
        return (primary,)
    shards = [f for f in files if (s := split_info(f)) and s.count == info.count and s.prefix == info.prefix]
    return tuple(sorted(shards, key=lambda f: split_info(f).index))  # type: ignore[union-attr]


def best_mmproj(files: Sequence[str], model: str) -> str | None:
    """The projector llama-server fetches with `model`: deepest shared folder, then closest quant bits."""
    model_dirs = model.split("/")[:-1]
    model_info = split_info(model)
    want = quant_bits(model_info.tag) if model_info else 0
    best, best_key = None, None
    for f in files:
        if not f.endswith(".gguf") or "mmproj" not in f:
            continue
        dirs = f.split("/")[:-1]
        if dirs != model_dirs[:len(dirs)]:
            continue  # only the model's folder or one above it
        info = split_info(f)
        key = (len(dirs), -abs(quant_bits(info.tag if info else "") - want))
        if best_key is None or key > best_key:
            best, best_key = f, key
    return best


def _get_json(http: Any, url: str, token: str | None, timeout: float) -> Any:
    import requests

    headers = {"Accept": "application/json"}
    if token and re.fullmatch(r"hf_[A-Za-z0-9]{34,253}", token):
        headers["Authorization"] = f"Bearer {token}"
    try:
        with http.get(url, headers=headers, timeout=timeout, stream=True) as resp:
            body = resp.raw.read(MAX_LISTING_BYTES + 1, decode_content=True)
            status, reason = resp.status_code, resp.reason
    except requests.RequestException as exc:
        raise ModelError(f"{url}: cannot fetch ({type(exc).__name__}: {exc})") from None
    if status != 200:
        raise ModelError(f"{url}: HTTP {status} {reason}")
    if len(body) > MAX_LISTING_BYTES:
        raise ModelError(f"{url}: listing larger than {MAX_LISTING_BYTES} bytes")
    import json

    try:
        return json.loads(body)
    except ValueError:
        raise ModelError(f"{url}: the hub answered something that is not JSON") from None


def repo_commit(http: Any, hub: str, repo: str, token: str | None, timeout: float) -> str:
    """The commit llama-server lists: branch main, else the first branch with a valid commit."""
    doc = _get_json(http, f"{hub}api/models/{repo}/refs", token, timeout)
    branches = doc.get("branches") if isinstance(doc, dict) else None
    if not isinstance(branches, list):
        raise ModelError(f"{hub}api/models/{repo}/refs: no 'branches' in the answer")
    valid = [(b["name"], b["targetCommit"]) for b in branches
             if isinstance(b, dict) and isinstance(b.get("name"), str) and isinstance(b.get("targetCommit"), str)
             and re.fullmatch(r"[0-9a-fA-F]{40}", b["targetCommit"])]
    if not valid:
        raise ModelError(f"{repo}: no branch with a valid commit on {hub}")
    commit: str = next((c for n, c in valid if n == "main"), valid[0][1])
    return commit


def repo_files(http: Any, hub: str, repo: str, commit: str, token: str | None, timeout: float) -> list[str]:
    """Every file path of the repo at `commit`, in the hub's order."""
    url = f"{hub}api/models/{repo}/tree/{commit}?recursive=true"
    doc = _get_json(http, url, token, timeout)
    if not isinstance(doc, list):
        raise ModelError(f"{url}: the listing is not a JSON array")
    return [item["path"] for item in doc if isinstance(item, dict) and item.get("type") == "file"
            and isinstance(item.get("path"), str)]


def resolve_hf(repo_with_tag: str, hf_file: str, environ: Mapping[str, str], *, timeout: float = 30.0,
               session: Any = None) -> HubFiles:
    """The files llama-server fetches for `-hf repo_with_tag [-hff hf_file]`, from the hub's listing."""
    import requests

    repo, tag = split_repo_tag(repo_with_tag)
    if not valid_repo_id(repo):
        raise BadInput(f"-hf '{repo_with_tag}': '{repo}' is not a valid repository name")
    hub = endpoint(environ)
    http = session or requests.Session()
    token = environ.get("HF_TOKEN")
    commit = repo_commit(http, hub, repo, token, timeout)
    files = repo_files(http, hub, repo, commit, token, timeout)
    ggufs = ", ".join(f for f in files if f.endswith(".gguf")) or "none"
    if "preset.ini" in files:
        raise BadInput(f"-hf {repo}: the repo has a preset.ini, so llama-server starts in router mode with its "
                       "models, which kvbook does not plan; pass one model with -hf REPO:QUANT from another repo, or -m")
    if hf_file:
        if hf_file not in files:
            raise BadInput(f"-hff {hf_file}: not in {repo} (GGUF files there: {ggufs})")
        primary = hf_file
    else:
        found = best_model(files, tag)
        if found is None:
            raise BadInput(f"-hf {repo_with_tag}: no GGUF file for quant '{tag or 'default'}' in {repo} "
                           f"(GGUF files there: {ggufs})")
        primary = found
    shards = split_files(files, primary)
    mmproj = best_mmproj(files, primary)

    def url(path: str) -> str:
        return f"{hub}{repo}/resolve/{commit}/{path}"

    sidecars = tuple(f for f in files if f.endswith(".gguf") and any(k in f for k in SIDECARS[2:]))
    return HubFiles(repo=repo, tag=tag, commit=commit, model_path=primary, model_urls=tuple(url(s) for s in shards),
                    mmproj_path=mmproj, mmproj_url=url(mmproj) if mmproj else None, sidecars=sidecars)
