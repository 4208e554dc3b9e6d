"""Token counts as the server counts them: /v1/messages/count_tokens through both LiteLLM routes returns llama-server's
own count (system prompt, tools, tool results), and llama-server's own error for an image the model cannot take, on
both bundled models. Claude Code uses this count for its context meter and auto-compaction."""

from __future__ import annotations

import pytest
import requests

from kvbook.ops.litellm import VIA_OPENAI, alias_routes, start_proxy
from kvbook.ops.llama_server import start_llama_server
from kvbook.smoke.checks import TOOLS

pytestmark = pytest.mark.slow
ALIAS = "llama-3.1-8b-local"
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
BODIES = {
    "plain": {"messages": [{"role": "user", "content": "Hello there"}]},
    "system": {"system": "You are terse.", "messages": [{"role": "user", "content": "Hello there"}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
    "tool result": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18 C, sunny"}]}]},
}
IMAGE = {"messages": [{"role": "user", "content": [
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
    {"type": "text", "text": "What is this?"}]}]}


def _count(base: str, model: str, body: dict, key: str | None = None) -> requests.Response:
    headers = {"anthropic-version": "2023-06-01", **({"x-api-key": key} if key else {})}
    return requests.post(base + "/v1/messages/count_tokens", json={"model": model, **body}, headers=headers, timeout=60)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_count_tokens_through_both_routes_is_the_servers(model, request, tmp_path):
    gguf = request.getfixturevalue(model)
    with start_llama_server(["-m", str(gguf), "-c", "4096", "-np", "1", "-t", "1", "--jinja"], run_dir=tmp_path) as server, \
            start_proxy(alias_routes(server.base_url, (ALIAS,)), run_dir=tmp_path) as proxy:
        for name, body in BODIES.items():
            direct = _count(server.base_url, "local", body)
            assert direct.status_code == 200, (name, direct.text)
            want = direct.json()["input_tokens"]
            for routed in (ALIAS, ALIAS + VIA_OPENAI):
                got = _count(proxy.base_url, routed, body, proxy.master_key)
                assert got.status_code == 200 and got.json()["input_tokens"] == want, \
                    f"{name} via {routed}: {got.status_code} {got.text[:200]}, llama-server counted {want}"
        # neither bundled model takes images: llama-server says so, and so must each route (no tiktoken guess)
        direct = _count(server.base_url, "local", IMAGE)
        assert direct.status_code >= 400 and "image input is not supported" in direct.text
        for routed in (ALIAS, ALIAS + VIA_OPENAI):
            got = _count(proxy.base_url, routed, IMAGE, proxy.master_key)
            assert got.status_code >= 400 and "image input is not supported" in got.text, (routed, got.text[:300])
