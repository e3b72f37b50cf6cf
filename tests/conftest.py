"""Test set-up: fresh compile caches; Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection, unless the caller chose already.
"""

import atexit
import inspect
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

import triton_launches  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    triton_launches.install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    triton_launches.CURRENT_TEST = item.nodeid  # launches are counted per test
    try:
        return (yield)
    finally:
        triton_launches.CURRENT_TEST = None


def pytest_report_header(config):
    import triton

    return f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}, " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"


def _runs_the_triton_backend(item) -> bool:
    """Whether a test runs Triton kernels, so that `make test` reruns it with the oldest and
    the newest supported Triton (marker triton_backend): a test parametrised by backend runs
    Triton iff its backend is "triton"; any other test iff its source names Triton. The
    ahead-of-time compile files compile with every Triton themselves. test_zz_triton_compile
    checks that every test that launched a kernel in the full run carries the marker."""
    if item.path.name in ("test_triton_compile.py", "test_zz_triton_compile.py"):
        return False
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "backend" in params:
        return params["backend"] == "triton"
    fn = getattr(item, "function", None)
    try:
        return fn is not None and "triton" in inspect.getsource(fn).lower()
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_the_triton_backend(item):
            item.add_marker(pytest.mark.triton_backend)
            triton_launches.MARKED.add(item.nodeid)
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
