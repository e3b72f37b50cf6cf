"""Benchmark conventions shared by every family (see bench/summary.py).

Each benchmark sets
    benchmark.group = "<op> <size>"            e.g. "dropout fwd 2^24 f32"
    benchmark.extra_info["provider"] = name    "fastreg", "torch eager", "torch.compile", "copy (floor)", ...
    benchmark.extra_info["saved_bytes_per_elem"] = x   where it applies (bench/_util.saved_bytes_per_elem)
and the summary prints every provider's median and its ratio to fastreg's.
"""

import os
import sys

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"  # never used for timing; keeps imports uniform

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
