"""`-hf user/repo[:quant]`, `-hff FILE` and the built-in presets (`--gpt-oss-20b-default`, ...) are planned
from the file the pinned llama-server fetches, read over HTTP Range from its header only.

huggingface.co is unreachable from the test machines, so a loopback hub (kvbook.testing.hub) stands in
for it: it answers the listing API the pinned build calls (refs, tree), redirects `resolve/` to a content
URL, and serves HEAD, GET and Range. The real llama-server is pointed at the same hub (MODEL_ENDPOINT) and
downloads from it: what it fetched, and what it then allocated, is compared with kvbook's plan. The files
served are the bundled SmolLM2 under the repo names the presets ask for (the real repos' models are GBs).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.errors import BadInput
from kvbook.model import hub
from kvbook.ops.components import find_tool
from kvbook.ops.llama_server import start_llama_server
from kvbook.ops.measured import compare_memory
from kvbook.plan.flags import PRESET_DRAFT_FILE, PRESETS, _spellings, parse_server_args
from kvbook.testing.hub import LoopbackHub

# ---------------------------------------------------------------- the selection rules (common/download.cpp)

FILES = ["README.md", "sub/smol-Q8_0.gguf", "smol-Q4_K_M-00002-of-00002.gguf", "smol-Q4_K_M-00001-of-00002.gguf",
         "smol-F16.gguf", "mmproj-smol-F16.gguf", "mmproj-smol-Q8_0.gguf", "smol-imatrix.gguf", "mtp-smol-Q8_0.gguf"]


@pytest.mark.parametrize("tag, want", [
    ("", "smol-Q4_K_M-00001-of-00002.gguf"),  # the default Q4_K_M, first shard only
    ("q8_0", "sub/smol-Q8_0.gguf"),  # case-insensitive, any folder
    ("F16", "smol-F16.gguf"),  # never the mmproj, imatrix or MTP sidecar that also match
    ("Q2_K", None),  # a tag that matches nothing: no fallback
])
def test_the_model_file_is_the_one_llama_server_picks(tag, want) -> None:
    assert hub.best_model(FILES, tag) == want


def test_without_the_default_quants_the_first_model_file_is_taken() -> None:
    assert hub.best_model(["mmproj-x-f16.gguf", "x-IQ2_XS.gguf", "x-Q5_K_M.gguf"], "") == "x-IQ2_XS.gguf"
    assert hub.best_model(["x-Q5_K_M.gguf", "x-Q8_0.gguf"], "") == "x-Q8_0.gguf"  # Q8_0 before the first file


def test_split_files_and_the_projector() -> None:
    assert hub.split_files(FILES, "smol-Q4_K_M-00001-of-00002.gguf") == (
        "smol-Q4_K_M-00001-of-00002.gguf", "smol-Q4_K_M-00002-of-00002.gguf")
    # the projector closest in bits to the model's quant; one in a deeper folder wins over bits
    assert hub.best_mmproj(FILES, "smol-Q4_K_M-00001-of-00002.gguf") == "mmproj-smol-Q8_0.gguf"
    assert hub.best_mmproj(FILES, "smol-F16.gguf") == "mmproj-smol-F16.gguf"
    assert hub.best_mmproj([*FILES, "sub/mmproj-F16.gguf"], "sub/smol-Q8_0.gguf") == "sub/mmproj-F16.gguf"
    assert hub.best_mmproj(["a/mmproj-Q8_0.gguf", "m-Q8_0.gguf"], "m-Q8_0.gguf") is None  # not above the model


def test_the_endpoint_and_the_repo_name_as_the_pinned_build_reads_them() -> None:
    assert hub.endpoint({}) == "https://huggingface.co/"
    assert hub.endpoint({"HF_ENDPOINT": "http://a:1"}) == "http://a:1/"
    assert hub.endpoint({"HF_ENDPOINT": "http://a:1", "MODEL_ENDPOINT": "http://b:2/"}) == "http://b:2/"
    assert hub.split_repo_tag("u/r:Q4_K_M") == ("u/r", "Q4_K_M")
    assert hub.valid_repo_id("ggml-org/gpt-oss-20b-GGUF") and not hub.valid_repo_id("u/-r")
    with pytest.raises(BadInput, match="expected <user>/<model>"):
        hub.split_repo_tag("just-a-name")


# ---------------------------------------------------------------- presets as the parser expands them

def test_every_preset_setting_is_a_flag_of_the_pinned_build() -> None:
    table = _spellings()
    for preset, settings in PRESETS.items():
        assert preset in table, preset
        for flag, value in settings:
            assert flag in table and table[flag][1] == (value is not None), (preset, flag)


def test_a_preset_applies_where_it_stands() -> None:
    """arg.cpp runs the preset's handler in order: later flags win over it, it wins over earlier ones."""
    after = parse_server_args(["--gpt-oss-20b-default", "-c", "4096"])
    before = parse_server_args(["-c", "4096", "-np", "4", "--gpt-oss-20b-default"])
    assert (after.ctx, after.parallel, after.ubatch, after.batch) == (4096, 2, 2048, 32768)
    assert (before.ctx, before.parallel) == (262144, 2)
    assert (after.hf_repo, after.hf_file) == ("ggml-org/gpt-oss-20b-GGUF", "gpt-oss-20b-mxfp4.gguf")
    read = [(f, src) for f, src, _ in after.read]
    assert read[:3] == [("--gpt-oss-20b-default", "command line"),
                        ("-hf ggml-org/gpt-oss-20b-GGUF", "preset --gpt-oss-20b-default"),
                        ("-hff gpt-oss-20b-mxfp4.gguf", "preset --gpt-oss-20b-default")]
    assert read[-1] == ("-c 4096", "command line")


@pytest.mark.parametrize("preset, words", [("--embd-gemma-default", "sets --embedding")])
def test_presets_that_set_what_kvbook_does_not_model_are_refused_by_name(preset, words) -> None:
    with pytest.raises(BadInput, match=words) as e:
        parse_server_args([preset])
    assert preset in str(e.value)


# ---------------------------------------------------------------- against the loopback hub

@pytest.fixture(scope="module")
def shards(tmp_path_factory, smollm2) -> Path:
    folder = tmp_path_factory.mktemp("hub-split")
    subprocess.run([str(find_tool("llama-gguf-split")), "--split", "--split-max-tensors", "100", str(smollm2),
                    str(folder / "smol-Q4_1")], check=True, capture_output=True)
    return folder


def _plan(capsys, *args: str) -> tuple[int, dict, str]:
    code = cli.main(["plan", "--json", "--", "llama-server", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def test_hf_plans_the_chosen_split_file_from_headers_only(capsys, monkeypatch, tmp_path, smollm2, shards) -> None:
    from kvbook.testing.synthetic import ProjectorShape, write_synthetic_projector

    projector = write_synthetic_projector(ProjectorShape(), tmp_path / "mmproj-smol-F16.gguf")
    repo = {"smol-Q8_0.gguf": smollm2, **{f"q41/{p.name}": p for p in sorted(shards.iterdir())},
            "mmproj-smol-F16.gguf": projector}
    with LoopbackHub({"kv/smol-GGUF": repo}) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        local = _plan(capsys, "-m", str(smollm2), "-c", "4096")[1]
        code, doc, err = _plan(capsys, "-hf", "kv/smol-GGUF:q4_1", "--no-mmproj", "-c", "4096")
        assert code == 0, err
        assert doc["source"] == f"{loop.endpoint}kv/smol-GGUF/resolve/{loop.state.commit}/q41/smol-Q4_1-00001-of-00003.gguf"
        assert doc["weights_bytes"] == local["weights_bytes"] and doc["caches"] == local["caches"]
        assert doc["weights_note"] == "exact: sum of tensor sizes in 3 remote shards' headers"
        assert any(n["code"] == "model.hf" and "q41/smol-Q4_1-00001-of-00003.gguf (3 split files)" in n["text"] for n in doc["notes"])
        assert any(n["code"] == "projector.not-loaded" and "mmproj-smol-F16.gguf is not loaded" in n["text"] for n in doc["notes"])
        for name in (p.name for p in shards.iterdir()):
            assert 0 < loop.state.sent[f"q41/{name}"] < (shards / name).stat().st_size / 4  # headers, not weights
        # the projector the server would load too is planned (tests/test_projector.py checks its figures)
        code, doc, err = _plan(capsys, "-hf", "kv/smol-GGUF:q8_0")
        assert code == 0 and doc["projector"]["source"].endswith("/mmproj-smol-F16.gguf"), err
        assert doc["projector"]["weights_bytes"] > 0
        code, _, err = _plan(capsys, "-hf", "kv/smol-GGUF", "-hff", "nope.gguf")
        assert code == 2 and "-hff nope.gguf: not in kv/smol-GGUF" in err and len(err.strip().splitlines()) == 1
        code, _, err = _plan(capsys, "-hf", "kv/absent-GGUF")
        assert code == 2 and "HTTP 404" in err


def _server_fetched(loop: LoopbackHub) -> list[str]:
    """The content paths the real server downloaded (whole-file GETs of /cdn/REPO/PATH)."""
    return sorted({p.split("/cdn/", 1)[1] for m, p in loop.state.requests if m == "GET" and p.startswith("/cdn/")})


def test_every_preset_fetches_the_repo_and_file_kvbook_plans(tmp_path, llama_server) -> None:
    """For each preset the real server is run against the loopback hub (serving a 4 KiB stand-in under the
    preset's repos, which fails to load): the repos it lists and the files it downloads are the ones
    kvbook names. Repos a preset names without a file get a listing shaped like the real repo's."""
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF" + bytes(4092))
    listings = {"ggml-org/gpt-oss-120b-GGUF": ["gpt-oss-120b-mxfp4-00001-of-00003.gguf",
                                               "gpt-oss-120b-mxfp4-00002-of-00003.gguf",
                                               "gpt-oss-120b-mxfp4-00003-of-00003.gguf"],
                "ggml-org/gemma-3-4b-it-qat-GGUF": ["gemma-3-4b-it-qat-Q4_0.gguf", "mmproj-model-f16-4B.gguf"],
                "ggml-org/gemma-3-12b-it-qat-GGUF": ["gemma-3-12b-it-qat-Q4_0.gguf", "mmproj-model-f16-12B.gguf"]}
    checked = 0
    for preset, settings in PRESETS.items():
        values = dict(settings)
        if "-hf" not in values:
            continue  # --spec-default sets no model
        repos = {values["-hf"]: listings.get(values["-hf"], [values.get("-hff", "")])}
        if "-hfd" in values:
            repos[values["-hfd"]] = [PRESET_DRAFT_FILE[preset]]
        with LoopbackHub({r: {p: stub for p in files} for r, files in repos.items()}) as loop:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ARG_", "HF_"))}
            env.update(MODEL_ENDPOINT=loop.endpoint, LLAMA_CACHE=str(tmp_path / preset))
            subprocess.run([str(llama_server), preset, "--port", "0", "-t", "1"], env=env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
            fetched = _server_fetched(loop)
            want = hub.resolve_hf(values["-hf"], values.get("-hff", ""), {"MODEL_ENDPOINT": loop.endpoint})
        expected = {f"{want.repo}/{u.rsplit('/', 1)[-1]}" for u in want.model_urls}
        if want.mmproj_path:
            expected.add(f"{want.repo}/{want.mmproj_path}")
        if "-hfd" in values:
            expected.add(f"{values['-hfd']}/{PRESET_DRAFT_FILE[preset]}")
        assert set(fetched) == expected, (preset, fetched)
        checked += 1
    assert checked == 11


@pytest.mark.parametrize("args", [["--gpt-oss-20b-default", "-c", "8192"], ["--fim-qwen-1.5b-default", "-np", "1"],
                                  ["-hf", "kv/smol-GGUF:Q4_1", "--no-mmproj", "-c", "4096", "-np", "2"],
                                  ["--fim-qwen-7b-spec", "-np", "2"],
                                  ["-mu", "{hub}cdn/kv/smol-GGUF/smol-Q4_1-00001-of-00003.gguf", "-m",
                                   "{tmp}/dl/smol-Q4_1-00001-of-00003.gguf", "-c", "2048"]])
def test_what_kvbook_plans_is_what_the_server_fetches_and_allocates(tmp_path, monkeypatch, smollm2, shards,
                                                                    args) -> None:
    """The real server downloads from the loopback hub and loads the model; every exact figure of its log
    (context, slots, ubatch, caches, logits, weights) equals the plan, and it fetched the file kvbook read."""
    repos = {"ggml-org/gpt-oss-20b-GGUF": {"gpt-oss-20b-mxfp4.gguf": smollm2},
             "ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF": {"qwen2.5-coder-7b-q8_0.gguf": smollm2},
             "ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF": {"qwen2.5-coder-0.5b-q8_0.gguf": smollm2},
             "ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF": {"qwen2.5-coder-1.5b-q8_0.gguf": smollm2},
             "kv/smol-GGUF": {"smol-Q8_0.gguf": smollm2, "mmproj-smol-F16.gguf": smollm2,
                              **{p.name: p for p in sorted(shards.iterdir())}}}
    with LoopbackHub(repos) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "cache"))
        args = [a.replace("{hub}", loop.endpoint).replace("{tmp}", str(tmp_path)) for a in args]
        with start_llama_server([*args, "-t", "1", "--no-warmup"], run_dir=tmp_path) as server:
            logged = server.measured()
            logged_draft = server.measured_draft()
            plan = server.plan
        fetched = _server_fetched(loop)
    assert plan is not None and plan.model.source.startswith(loop.endpoint)
    if args[0] == "-mu":
        assert sorted(fetched) == [f"kv/smol-GGUF/smol-Q4_1-0000{i}-of-00003.gguf" for i in (1, 2, 3)], fetched
    else:
        repo_path = plan.model.source.split("/resolve/", 1)[0].removeprefix(loop.endpoint)
        first = plan.model.source.rsplit("/", 1)[-1]
        assert f"{repo_path}/{first}" in fetched and not any("mmproj" in f for f in fetched), fetched
    rows = compare_memory(plan.memory, logged)
    bad = [r for r in rows if r.matches is False]
    assert not bad, bad
    assert (plan.memory.draft is None) == (logged_draft is None) == ("-hfd" not in dict(PRESETS.get(args[0], ())))
    if plan.memory.draft is not None:  # the preset's draft, fetched from its own repo, has its own context
        assert "ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF/qwen2.5-coder-0.5b-q8_0.gguf" in fetched
        draft_rows = compare_memory(plan.memory.draft, logged_draft)
        assert not [r for r in draft_rows if r.matches is False], draft_rows
    assert logged.n_ctx == plan.memory.shape.n_ctx and logged.n_ubatch == plan.memory.shape.n_ubatch


def test_a_remote_gguf_of_an_architecture_without_a_rule_is_sized_by_fit_params_on_a_sparse_header_copy(
        capsys, monkeypatch, tmp_path) -> None:
    """llama-fit-params loads with no_alloc and reads no tensor data, so a local file holding only the remote
    header (the rest a hole of the right size) gives the same accounting as the whole file: compared here with
    the plan from the local file (tests/test_fit_fallback.py compares that one with the real server)."""
    from kvbook.model.arch import RULES
    from kvbook.testing.synthetic import write_synthetic_gguf

    unknown = "internlm2"  # llama.cpp loads it, kvbook has no rule
    assert unknown not in RULES, f"{unknown} gained a kvbook rule: pick another architecture for this test"
    meta = {"general.architecture": unknown, **{f"{unknown}.{k}": v for k, v in {
        "context_length": 32768, "embedding_length": 1024, "block_count": 6, "feed_forward_length": 2048,
        "attention.head_count": 8, "attention.head_count_kv": 2, "rope.dimension_count": 128,
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, "vocab_size": 32000}.items()}}
    model = write_synthetic_gguf(meta, tmp_path / f"{unknown}-Q8_0.gguf")
    with LoopbackHub({"kv/unknown-GGUF": {model.name: model}}) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        for args in (["-c", "8192", "-np", "2"], ["-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]):
            code, local, err = _plan(capsys, "-m", str(model), *args)
            assert code == 0, err
            code, remote, err = _plan(capsys, "-hf", "kv/unknown-GGUF:Q8_0", *args)
            assert code == 0, err
            assert remote["accounting"] == local["accounting"] == "llama-fit-params"
            for key in ("caches", "compute_bytes", "output_bytes", "weights_bytes", "n_ctx", "n_ctx_seq"):
                assert remote[key] == local[key], key
            assert any("sparse local copy of the remote header" in n["text"] for n in remote["notes"]
                       if n["code"] == "accounting.llama-fit-params")
        # headers only: 1 MiB ranges, four reads (two plans, each reading the header, then its sparse copy)
        assert loop.state.sent[model.name] <= 4 << 20 and model.stat().st_size > 10 * (4 << 20)


def test_a_draft_repo_with_a_speculative_sidecar_is_refused_by_name(capsys, monkeypatch, smollm2) -> None:
    """With no --spec-type, llama-server runs an MTP/EAGLE3/DFlash sidecar of the -hfd repo instead of its
    model (common/arg.cpp); kvbook does not model those, and says so."""
    with LoopbackHub({"kv/draft-GGUF": {"d-Q8_0.gguf": smollm2, "mtp-d-Q8_0.gguf": smollm2}}) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        code, _, err = _plan(capsys, "-m", str(smollm2), "-hfd", "kv/draft-GGUF")
        assert code == 2 and "speculative sidecar mtp-d-Q8_0.gguf" in err
        code, doc, err = _plan(capsys, "-m", str(smollm2), "-hfd", "kv/draft-GGUF:Q8_0", "-c", "2048")
        assert code == 2  # still the sidecar: the tag picks the model file, not whether sidecars count
        with LoopbackHub({"kv/plain-GGUF": {"d-Q8_0.gguf": smollm2}}) as plain:
            monkeypatch.setenv("MODEL_ENDPOINT", plain.endpoint)
            code, doc, err = _plan(capsys, "-m", str(smollm2), "-hfd", "kv/plain-GGUF", "-c", "2048")
            assert code == 0 and doc["draft"]["source"].endswith("/d-Q8_0.gguf"), err


def test_a_token_is_never_echoed() -> None:
    """HF_TOKEN (read for -hf, as -hft) and API keys are listed as read, with their value hidden."""
    token = "hf_" + "a" * 34
    flags = parse_server_args(["-m", "x.gguf", "--api-key", "sekrit", "-hft", token], {"HF_TOKEN": token})
    assert token not in repr(flags.read) + repr(flags.from_env) and "sekrit" not in repr(flags.read)
    assert "HF_TOKEN=***" in flags.from_env


def test_the_hub_token_is_sent_and_offline_is_refused(capsys, monkeypatch, smollm2) -> None:
    """-hft (or HF_TOKEN) goes to the hub's API as a bearer token, as llama-server sends it; with --offline the
    server reads its local cache instead, which kvbook does not."""
    token = "hf_" + "b" * 34
    with LoopbackHub({"kv/smol-GGUF": {"smol-Q4_1.gguf": smollm2}}) as loop:
        monkeypatch.setenv("MODEL_ENDPOINT", loop.endpoint)
        code, doc, err = _plan(capsys, "-hf", "kv/smol-GGUF", "-hft", token, "-np", "1")
        assert code == 0, err
        assert loop.state.authorization and set(loop.state.authorization) == {f"Bearer {token}"}
        assert token not in json.dumps(doc["flags_read"]) + json.dumps(doc["notes"])
        code, _, err = _plan(capsys, "-hf", "kv/smol-GGUF", "--offline")
        assert code == 2 and "--offline" in err and "local cache" in err
