"""The supported stacks: what pyproject.toml declares, what the Makefile installs and tests
with, and which Triton this run really imported (`make test` reruns the Triton-backend
tests with the oldest and the newest supported Triton put first on PYTHONPATH, and sets
FASTREG_EXPECT_TRITON to the version it means to test)."""

import importlib.metadata
import os
import re
import tomllib

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {r.name: r.specifier for r in map(Requirement, deps)}


def makefile_var(name: str) -> str:
    with open(os.path.join(ROOT, "Makefile")) as f:
        m = re.search(rf"^{name}\s*:?=\s*(\S+)\s*$", f.read(), re.M)
    assert m, f"Makefile sets no {name}"
    return m.group(1)


@pytest.mark.triton_backend
def test_the_intended_triton_is_imported():
    import triton

    print(f"triton {triton.__version__} from {triton.__file__}")
    # the package imported is the distribution found first on the path, not a mix
    assert triton.__version__ == importlib.metadata.version("triton")
    expected = os.environ.get("FASTREG_EXPECT_TRITON")
    if expected:
        assert triton.__version__ == expected, (triton.__version__, triton.__file__)
        assert os.environ.get("TRITON_INTERPRET") == "1"
    assert Version(triton.__version__) in _declared()["triton"]


def test_declared_range_covers_oldest_and_newest_stacks():
    declared = _declared()
    # torch 2.11 ships Triton 3.6, torch 2.15 Triton 3.9: both ends are supported
    for v in ("2.11.0", "2.15.0"):
        assert Version(v) in declared["torch"], (v, declared["torch"])
    for v in (makefile_var("TRITON_OLDEST"), makefile_var("TRITON_NEWEST")):
        assert Version(v) in declared["triton"], (v, declared["triton"])
    assert Version(makefile_var("TRITON_OLDEST")) == Version("3.6.0")
    assert not declared["triton"].contains("3.5.1")


def test_makefile_installs_a_torch_inside_the_declared_range():
    declared = _declared()["torch"]
    pin = Requirement(makefile_var("TORCH_SPEC"))
    bounds = [s.version for s in pin.specifier]
    assert bounds and all(Version(b) in declared for b in bounds), (str(pin.specifier), declared)
    assert Version(torch.__version__.split("+")[0]) in declared
