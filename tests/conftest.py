"""Shared test setup: Triton runs interpreted on CPU-only machines; seeds are fresh per run but printed
so that any failure can be replayed (OPTIMAS_TEST_SEED=<n> pytest ...)."""

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# Must happen before anything imports triton: on a machine without CUDA the Triton kernels run on the
# CPU under the interpreter, which is how CI checks them against their references.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest

_RUN_SEED = int(os.environ.get("OPTIMAS_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"optimas-fast test seed: {_RUN_SEED} (replay with OPTIMAS_TEST_SEED={_RUN_SEED})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The documentation code blocks tests/test_docs.py did not run (or ran from the repository root only), with
    their reasons: every one carries an explicit marker, and CI prints how many there are."""
    notes = getattr(config, "docs_not_executed", None)
    if notes is not None:
        terminalreporter.section(f"documentation blocks not executed: {sum(' not run: ' in n for n in notes)}")
        for line in notes:
            terminalreporter.write_line(line)


@pytest.fixture
def seed(request) -> int:
    """A per-test seed: fresh each run (from the run seed), stable within a run for replay."""
    import zlib

    return (_RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)


@pytest.fixture
def gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    _vllm_items(items)
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="GPU-only test: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _vllm_items(items) -> None:
    """`vllm`-marked tests need vllm, which pins its own transformers and lives in its own virtual environment
    (.ci/run's second step runs them there with OPTIMAS_REQUIRE_VLLM=1). Elsewhere they are skipped with that
    reason; where vllm is required, its absence is an error, never a skip."""
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("OPTIMAS_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("OPTIMAS_REQUIRE_VLLM=1 but vllm is not importable in this environment")
    skip = pytest.mark.skip(reason="needs vllm: runs in its own venv (README 'vLLM on CPU', .ci/run step 2)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------------------
# A real OpenAI-compatible server for the LM client tests: llama.cpp's own server (llama-cpp-python[server], in the
# test extra) serving the embedded SmolLM2 GGUF on a free loopback port, started once per test session.
_SERVER_START_S = 120  # bounded start: a server that is not answering by then fails the tests with its log tail
_SERVER_LIFETIME_S = 1800  # bounded life: the server exits by itself even if this process is killed


@pytest.fixture(scope="session")
def llama_server():
    """Base URL (``http://127.0.0.1:<port>/v1``) of a running ``python -m llama_cpp.server``."""
    from optimas_fast.lm.embedded import find_embedded_gguf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    # the real server, loading its model without llama.cpp's repacked weight buffers as LlamaCppLM does by
    # default (their AMX path segfaults on a VM that advertises AMX; see LlamaCppLM's repack_weights)
    boot = (
        "import runpy, llama_cpp; from optimas_fast.lm.llamacpp import _model_params; "
        "cm = _model_params(llama_cpp, use_extra_bufts=False); cm.__enter__(); "
        "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
    )
    cmd = [
        sys.executable,
        "-c",
        boot,
        "--model",
        str(find_embedded_gguf()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "2",
        "--model_alias",
        "smollm2",
        "--verbose",
        "False",
    ]
    # `timeout` bounds the server's life even if pytest dies without running the teardown
    proc = subprocess.Popen(
        ["timeout", "-s", "KILL", str(_SERVER_LIFETIME_S), *cmd],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + _SERVER_START_S
    try:
        while True:
            try:
                with opener.open(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log.name, errors="replace") as f:
                    tail = f.read()[-3000:]
                pytest.fail(
                    f"llama_cpp.server did not come up on {url} within {_SERVER_START_S} s "
                    f"(exit code {proc.poll()}); log tail:\n{tail}"
                )
            time.sleep(0.25)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
        os.unlink(log.name)
