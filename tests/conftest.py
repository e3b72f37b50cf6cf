"""Test set-up: Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection, unless the caller chose already.
"""

import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton_launches  # noqa: E402

    triton_launches.install()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded generator for fresh random test inputs."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g
