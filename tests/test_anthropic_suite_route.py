"""A few cases of llama.cpp's own Anthropic-compatible suite (tools/server/tests/unit/test_compat_anthropic.py of the
pinned sdist, unmodified) through kvbook's LiteLLM anthropic/ route to a real llama-server (SmolLM2): a streamed
message, token counts (three cases), a streamed tool call, an image the model cannot take. The whole suite, direct
against both routes and timed, is benchmarks/bench_anthropic_suite.py; this keeps a route regression in `make test`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbook.ops.litellm import ANTHROPIC, start_proxy
from kvbook.ops.llama_server import start_llama_server
from kvbook.testing.anthropic_suite import SERVER_ARGS, run_suite, suite_dir, suite_routes

pytestmark = pytest.mark.slow
CASES = ("test_anthropic_messages_streaming", "test_anthropic_count_tokens", "test_anthropic_tool_streaming",
         "test_anthropic_vision_format_accepted")


@pytest.fixture(scope="module")
def suite_runs(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    """The selected cases through the route; where any fails, the same cases direct too (to tell a route defect from
    one the server has as well)."""
    work = tmp_path_factory.mktemp("anthropic-suite")
    tests = suite_dir()
    with start_llama_server(["-m", str(smollm2), *SERVER_ARGS], run_dir=work) as server, \
            start_proxy(suite_routes(server.base_url)[ANTHROPIC], run_dir=work / "proxy") as proxy:
        routed = run_suite(tests, ANTHROPIC, proxy.base_url, proxy.master_key, select=CASES, out_dir=work)
        direct = None
        if not all(c.passed for c in routed.cases):
            direct = run_suite(tests, "direct", server.base_url, select=CASES, out_dir=work)
    return routed, direct, work


def test_suite_cases_pass_through_the_anthropic_route(suite_runs):
    routed, direct, work = suite_runs
    ran = {c.name for c in routed.cases}
    assert all(any(name.startswith(case) for name in ran) for case in CASES), f"cases not run: {sorted(ran)}"
    failed = {c.name: c.message for c in routed.cases if not c.passed}
    direct_failed = {c.name for c in direct.cases if not c.passed} if direct else set()
    assert not failed, (f"through the route: {failed}; direct these failed too: {sorted(direct_failed) or 'none'}; "
                        f"pytest logs in {work}")
