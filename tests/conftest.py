"""Shared fixtures: real components found through kvbook.ops.components, and no process left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbook.ops import procs

_VULKAN_DESELECTED: list[str] = []  # why the Vulkan tests did not run, for the session summary


def pytest_collection_modifyitems(config, items):
    """Tests marked `vulkan` need the cached Vulkan build (`make vulkan`): without it they are deselected and the
    summary says why, never skipped in silence; KVBOOK_VULKAN=require (make test-vulkan) makes them fail instead."""
    import os

    from kvbook.ops.components import ComponentMissing, vulkan_llama_server

    marked = [item for item in items if item.get_closest_marker("vulkan")]
    if not marked or os.environ.get("KVBOOK_VULKAN") == "require":
        return
    try:
        vulkan_llama_server()
    except ComponentMissing as e:
        _VULKAN_DESELECTED.extend([str(len(marked)), str(e)])
        config.hook.pytest_deselected(items=marked)
        items[:] = [item for item in items if not item.get_closest_marker("vulkan")]


def pytest_terminal_summary(terminalreporter):
    if _VULKAN_DESELECTED:
        n, why = _VULKAN_DESELECTED
        terminalreporter.write_sep("=", f"{n} Vulkan test(s) DESELECTED: {why}", yellow=True, bold=True)


@pytest.fixture(scope="session", autouse=True)
def litellm_forkserver():
    """Proxies start as forks of one process that imported LiteLLM once (kvbook.ops.forkserver: about 17 s of CPU
    saved per proxy, the largest single cost of the suite); it starts now and imports while the first tests run.
    Subprocesses (kvbook run, notebooks' kernels) inherit it through the environment. Modules marked
    `litellm_command` run the `litellm` command instead, as users' `kvbook serve` and `kvbook run` do."""
    import os
    import shutil
    import tempfile

    from kvbook.ops import forkserver
    from kvbook.ops.litellm import OFFLINE_ENV

    folder = tempfile.mkdtemp(prefix="kvbook-fs-")  # short: a Unix socket path has at most 107 bytes
    path = os.path.join(folder, "litellm.sock")
    server = forkserver.start_server(path, OFFLINE_ENV)
    os.environ[forkserver.ENV_VAR] = path
    yield path
    os.environ.pop(forkserver.ENV_VAR, None)
    server.terminate()  # its forked proxies get SIGTERM with it (PR_SET_PDEATHSIG)
    server.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def litellm_command_where_marked(request):
    """In a module marked `litellm_command`, LiteLLM starts as the `litellm` command (no fork server)."""
    import os

    from kvbook.ops import forkserver

    if request.node.get_closest_marker("litellm_command") is None:
        yield
        return
    saved = os.environ.pop(forkserver.ENV_VAR, None)
    yield
    if saved is not None:
        os.environ[forkserver.ENV_VAR] = saved


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The llama-server under test (KVBOOK_LLAMA_SERVER, PATH, or the pinned build); fails, never skips."""
    from kvbook.ops.components import find_llama_server

    return find_llama_server()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from kvbook.ops.components import model_path

    return model_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    from kvbook.ops.components import model_path

    return model_path("gemma3-270m")


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every server a test starts is stopped when it ends, pass or fail; a leak fails the test."""
    yield
    leaked = [p.spec.name for p in procs.live_processes()]
    procs.stop_all()
    assert not leaked, f"test left processes running: {leaked}"


@pytest.fixture()
def rpc_endpoints(tmp_path):
    """Three loopback ggml-rpc-server devices per test, as host:port (they start in milliseconds; the
    no-leftover check above covers them). Tests take the first N they need."""
    from kvbook.ops.rpc import start_rpc_server

    servers = [start_rpc_server(tmp_path) for _ in range(3)]
    yield [f"{s.spec.host}:{s.spec.port}" for s in servers]
    for s in servers:
        s.stop()
