"""Test set-up: Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection, unless the caller chose already.
"""

import os
import zlib

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
def gen(request):
    """A seeded generator for fresh random test inputs (DESIGN.md: fresh each run).

    The seed is printed, and pytest shows it with a failure's captured output;
    FASTREG_TEST_SEED=<int> replays it, FASTREG_TEST_SEED=id derives it from the test's id
    (the same inputs every run)."""
    choice = os.environ.get("FASTREG_TEST_SEED", "").strip()
    if choice == "id":
        seed = zlib.crc32(request.node.nodeid.encode())
    elif choice:
        seed = int(choice)
    else:
        seed = int.from_bytes(os.urandom(4), "little")
    print(f"gen seed: {seed} (FASTREG_TEST_SEED={seed} replays it)")
    return torch.Generator().manual_seed(seed)
