"""Shared test setup: Triton runs interpreted on CPU-only machines; seeds are fresh per run but printed
so that any failure can be replayed (OPTIMAS_TEST_SEED=<n> pytest ...)."""
import os
import random

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
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def pytest_report_header(config):
    return f"optimas-fast test seed: {_RUN_SEED} (replay with OPTIMAS_TEST_SEED={_RUN_SEED})"


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
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="GPU-only test: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
