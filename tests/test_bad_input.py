"""Bad input: one clear error line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import pytest

from kvbook import cli


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kvbook: error: "), err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def plan(capsys, *server_args: str, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    return run_cli(capsys, "plan", *extra, "--", "llama-server", *server_args)


# ---------------------------------------------------------------- files


def test_not_a_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am not a model\n" * 10)
    assert_one_line_error(*plan(capsys, "-m", str(bad)), "not a GGUF file")


def test_truncated_gguf(capsys, tmp_path, smollm2):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2.read_bytes()[:4000])
    assert_one_line_error(*plan(capsys, "-m", str(cut)), "truncated")


def test_truncated_tensor_data(capsys, tmp_path, smollm2):
    data = smollm2.read_bytes()
    cut = tmp_path / "short.gguf"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*plan(capsys, "-m", str(cut)), "truncated")


def test_absurd_metadata_count(capsys, tmp_path):
    evil = tmp_path / "evil.gguf"
    evil.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + b"\0" * 64)
    assert_one_line_error(*plan(capsys, "-m", str(evil)), "metadata entries")


def test_absurd_array_count(capsys, tmp_path):
    # one key whose value is an array of UINT8 claiming 2^60 entries
    key = b"general.junk"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 2**60)
    evil = tmp_path / "array.gguf"
    evil.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + b"\0" * 64)
    assert_one_line_error(*plan(capsys, "-m", str(evil)), "array claims")


def test_unknown_architecture(capsys, tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(*plan(capsys, "-m", str(path)), "frobnicator", "not modelled")


def test_missing_file(capsys, tmp_path):
    assert_one_line_error(*plan(capsys, "-m", str(tmp_path / "nope.gguf")), "not found")


def test_unknown_preset(capsys):
    assert_one_line_error(*plan(capsys, "-m", "no-such-model"), "unknown model")


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-c", "-5"], "-c must be >= 0"),
        (["-c", "abc"], "-c expects a whole number, got 'abc'"),
        (["-ctk", "q3_k"], "unknown value 'q3_k'"),
        (["--frobnicate"], "unknown llama-server flag '--frobnicate'"),
        (["-ot", "ffn=CUDA0"], "-ot ffn=CUDA0: CUDA0 is not a device of this plan"),
        (["-ot", "ex(ps=CPU"], "does not compile"),
        (["-ot", "exps=CUDA_Host"], "unknown buffer type 'CUDA_Host'"),
        (["-ot", "exps"], "invalid value"),
        (["-dev", "CUDA0"], "-dev: invalid device: CUDA0"),
        (["-dev", "none,CUDA0"], "invalid device: none"),
        (["-sm", "none", "-mg", "1", "--rpc", "127.0.0.1:1", "-ngl", "all"], "-mg 1: invalid value for main_gpu"),
        (["-sm", "row", "--rpc", "127.0.0.1:1", "-ngl", "all"], "does not support split buffers"),
        (["-sm", "tensor"], "-sm tensor without an offload device: llama-server refuses it"),  # as the real one does
        (["-sm", "tensor", "--rpc", "127.0.0.1:1", "-ngl", "all"], "-sm tensor changes memory"),
        (["--rpc", "127.0.0.1:1", "-ngl", "5", "-ts", "1,1"], "-ts has 2 entries but the plan has 1 device (RPC0)"),
        (["--rpc", "127.0.0.1", "-ngl", "5"], "is not host:port"),
        (["-c"], "-c needs a value"),
        (["-fa", "off", "-ctv", "q4_0"], "needs flash attention"),
        (["-np", "0"], "-np 0"),
        (["stray"], "positional"),
    ],
)
def test_bad_flags(capsys, smollm2, args, needle):
    assert_one_line_error(*plan(capsys, "-m", str(smollm2), *args), needle)


def test_missing_model_flag(capsys):
    assert_one_line_error(*plan(capsys, "-c", "4096"), "no model: give -m MODEL or -hf USER/REPO[:QUANT]")


def test_bad_hub_sources(capsys, monkeypatch):
    monkeypatch.setenv("MODEL_ENDPOINT", "http://127.0.0.1:9/")  # nothing listens: refused before any request
    assert_one_line_error(*plan(capsys, "-hf", "no-slash"), "invalid Hugging Face repo, expected <user>/<model>")
    assert_one_line_error(*plan(capsys, "-hf", "a/-b"), "not a valid repository name")
    assert_one_line_error(*plan(capsys, "-hff", "x.gguf"), "-hff FILE needs -hf")
    assert_one_line_error(*plan(capsys, "-hf", "a/b"), "cannot fetch")
    assert_one_line_error(*plan(capsys, "-mu", "http://127.0.0.1:9/m.gguf"), "starts in router mode")


def test_unknown_device(capsys, smollm2):
    assert_one_line_error(*plan(capsys, "-m", str(smollm2), extra=("--device", "rtx-9999")), "unknown device 'rtx-9999'")


def test_bad_budget(capsys, smollm2):
    assert_one_line_error(*plan(capsys, "-m", str(smollm2), extra=("--budget-gib", "-3")), "--budget-gib")


def test_usage_error_is_one_line(capsys):
    assert_one_line_error(*run_cli(capsys, "plan", "--budget-gib", "x"), "invalid float value")


def test_unknown_bundled_model(capsys):
    assert_one_line_error(*run_cli(capsys, "models", "path", "llama-70b"), "unknown model")


# ---------------------------------------------------------------- remote GGUF


class _Handler(BaseHTTPRequestHandler):
    """Serves one GGUF with or without Range support, and 404 elsewhere."""

    payload = b""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.path not in ("/model.gguf", "/norange.gguf"):
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        if self.path == "/norange.gguf" or not rng:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload[: 1 << 16])
            return
        start, end = (int(x) for x in rng.split("=")[1].split("-"))
        end = min(end, len(self.payload) - 1)
        if start >= len(self.payload):
            self.send_response(416)
            self.end_headers()
            return
        body = self.payload[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_gguf(smollm2_module):
    _Handler.payload = smollm2_module.read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def smollm2_module() -> Path:
    from kvbook.ops.components import model_path

    return model_path("smollm2-135m")


def test_remote_gguf_header_only(capsys, http_gguf, smollm2_module):
    code, out, err = plan(capsys, "-m", f"{http_gguf}/model.gguf", "-c", "4096", extra=("--json",))
    assert code == 0, err
    code2, out2, _ = plan(capsys, "-m", str(smollm2_module), "-c", "4096", extra=("--json",))
    import json

    remote, local = json.loads(out), json.loads(out2)
    for key in ("n_ctx_seq", "kv_bytes", "weights_bytes", "compute_bytes", "caches"):
        assert remote[key] == local[key]


def test_remote_404(capsys, http_gguf):
    assert_one_line_error(*plan(capsys, "-m", f"{http_gguf}/missing.gguf"), "HTTP 404")


def test_remote_ignores_range(capsys, http_gguf):
    assert_one_line_error(*plan(capsys, "-m", f"{http_gguf}/norange.gguf"), "ignores HTTP Range")


def test_nothing_written(capsys, tmp_path, monkeypatch, smollm2):
    monkeypatch.chdir(tmp_path)
    plan(capsys, "-m", str(smollm2), "-c", "abc")
    plan(capsys, "-m", str(tmp_path / "x.gguf"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- run and report paths


def test_a_notebook_path_and_its_name_are_the_same_notebook(monkeypatch) -> None:
    from kvbook.notebook.runner import plan_jobs
    from kvbook.paths import repo_root

    monkeypatch.chdir(repo_root())
    params = "params/runs/blog-post-m1max.yaml"
    by_path = plan_jobs(["notebooks/01-sizing.ipynb"], [params])
    by_name = plan_jobs(["01-sizing"], [params])
    assert [j.notebook for j in by_path] == [j.notebook for j in by_name] == [repo_root() / "notebooks" / "01-sizing.ipynb"]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_report_on_a_missing_or_plain_file_outputs_folder_is_one_line(capsys, tmp_path, monkeypatch, kind) -> None:
    target = tmp_path / "outputs"
    if kind == "file":
        target.write_text("not a folder\n")
    monkeypatch.setenv("KVBOOK_OUTPUTS", str(target))
    assert_one_line_error(*run_cli(capsys, "report"), str(target),
                          "is a file, not a folder" if kind == "file" else "does not exist")
    assert (target.read_text() == "not a folder\n") if kind == "file" else not target.exists()


@pytest.mark.parametrize("args", [["-ncmoe", "9" * 5000], ["-c", "-" + "9" * 5000], ["--rpc", "127.0.0.1:" + "1" * 5000]])
def test_numbers_longer_than_python_converts_are_one_line(args) -> None:
    """Found by the fuzzer: a 5000-digit number must be 'out of range', not Python's int() limit error."""
    from kvbook.errors import BadInput
    from kvbook.plan.flags import parse_server_args

    with pytest.raises(BadInput, match="out of range|not host:port"):
        parse_server_args(["-m", "x.gguf", *args, "-ngl", "1"])


def test_sm_tensor_on_the_cpu_is_refused_as_the_real_server_refuses_it(capsys, llama_server, smollm2):
    """The pinned server on this CPU-only build fails to load with -sm tensor (no device for the meta device)."""
    import subprocess

    proc = subprocess.run([str(llama_server), "-m", str(smollm2), "-sm", "tensor", "-c", "512", "-t", "1",
                           "--port", "0", "--no-warmup"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "LLAMA_SPLIT_MODE_TENSOR needs >= 1 devices" in proc.stdout + proc.stderr
    assert_one_line_error(*plan(capsys, "-m", str(smollm2), "-sm", "tensor"), "LLAMA_SPLIT_MODE_TENSOR needs >= 1")
