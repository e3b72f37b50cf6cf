"""Test set-up: fresh compile caches; Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection, unless the caller chose already.
"""

import atexit
import os
import shutil
import tempfile
import zlib

# A fresh inductor cache per test session: a graph compiled from an older tree and served from
# the shared on-disk cache could make a compile-against-eager test pass on stale code. Set
# before torch is imported (inductor reads it when it first compiles).
_inductor_cache = tempfile.mkdtemp(prefix="fastreg-test-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

# CI: a fresh Numba cache too (cache=True kernels otherwise load what an earlier tree compiled,
# from __pycache__ or a machine-wide NUMBA_CACHE_DIR). One folder for the whole run, inherited
# by the tests' subprocesses, so each kernel still compiles once per run. Numba reads it at
# import, which comes later (fastreg imports it).
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    _numba_cache = tempfile.mkdtemp(prefix="fastreg-test-numba-")
    os.environ["NUMBA_CACHE_DIR"] = _numba_cache
    atexit.register(shutil.rmtree, _numba_cache, ignore_errors=True)

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
