"""A split GGUF is summed over every shard, local or remote: a remote one is sized from each shard's header
alone (HTTP Range against a loopback server that serves files as a hub does), never from shard 1 only."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kvbook import cli
from kvbook.ops.components import find_tool


class _Files(BaseHTTPRequestHandler):
    """Serves a folder with Range support and counts the bytes it sent per file."""

    folder: Path = Path(".")
    sent: dict[str, int] = {}

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.folder / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        rng = self.headers.get("Range")
        if rng is None:  # a plain GET (config.json): the whole file
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        start, end = (int(x) for x in rng.split("=")[1].split("-"))
        end = min(end, size - 1)
        with path.open("rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.sent[path.name] = self.sent.get(path.name, 0) + len(body)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, smollm2) -> Path:
    folder = tmp_path_factory.mktemp("split")
    subprocess.run([str(find_tool("llama-gguf-split")), "--split", "--split-max-tensors", "100", str(smollm2),
                    str(folder / "smol")], check=True, capture_output=True)
    assert sorted(p.name for p in folder.iterdir()) == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return folder


@pytest.fixture()
def hub(shards):
    _Files.folder, _Files.sent = shards, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def weights(capsys, model: str) -> tuple[int, str]:
    assert cli.main(["plan", "--json", "--", "llama-server", "-m", model, "-c", "4096"]) == 0
    doc = json.loads(capsys.readouterr().out)
    return doc["weights_bytes"], doc["weights_note"]


def test_remote_split_is_summed_over_every_shard_from_headers_only(capsys, hub, shards, smollm2) -> None:
    whole, _ = weights(capsys, str(smollm2))
    local, _ = weights(capsys, str(shards / "smol-00001-of-00003.gguf"))
    remote, note = weights(capsys, f"{hub}/smol-00001-of-00003.gguf")
    assert whole == local == remote
    assert note == "exact: sum of tensor sizes in 3 remote shards' headers"
    for name in (f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)):
        assert 0 < _Files.sent[name] < (shards / name).stat().st_size / 4, _Files.sent  # headers, not weights


def test_a_missing_remote_shard_is_one_line(capsys, hub, shards, tmp_path) -> None:
    (shards / "smol-00003-of-00003.gguf").rename(tmp_path / "away.gguf")
    try:
        code = cli.main(["plan", "--", "llama-server", "-m", f"{hub}/smol-00001-of-00003.gguf"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert "smol-00003-of-00003.gguf: HTTP 404" in err
    finally:
        (tmp_path / "away.gguf").rename(shards / "smol-00003-of-00003.gguf")


def test_a_remote_config_json_plans_like_the_local_file(capsys, hub, shards, tmp_path) -> None:
    config = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
              "max_position_embeddings": 40960, "vocab_size": 151936}
    (shards / "config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        docs = []
        for model in (f"{hub}/config.json", str(tmp_path / "config.json")):
            assert cli.main(["plan", "--json", "--", "llama-server", "-m", model, "-c", "8192", "-np", "1"]) == 0
            docs.append(json.loads(capsys.readouterr().out))
        assert docs[0]["caches"] == docs[1]["caches"] and docs[0]["weights_bytes"] == docs[1]["weights_bytes"]
        assert cli.main(["plan", "--", "llama-server", "-m", f"{hub}/missing.json"]) == 2
        assert "HTTP 404" in capsys.readouterr().err
    finally:
        (shards / "config.json").unlink()
