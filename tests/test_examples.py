"""Every script in examples/ runs as `python examples/NAME.py` and does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join("examples", name)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_tested():
    scripts = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert scripts == sorted(CHECKS), "an example without a test, or a test without its example"


def _transformer(out):
    assert "replaced 3 torch.nn.Dropout modules" in out
    m = re.search(r"stopped at epoch (\d+) \((\w[\w+]*)\); best epoch (\d+)", out)
    assert m, "the run did not stop early"
    stopped, best = int(m.group(1)), int(m.group(3))
    assert best < stopped < 30
    acc = re.search(r"test accuracy with the restored weights: ([\d.]+)", out)
    assert acc and float(acc.group(1)) > 0.8


def _variational(out):
    m = re.search(r"\(([\d.]+)% pruned\), test accuracy ([\d.]+)", out)
    assert m, out
    assert float(m.group(1)) > 50 and float(m.group(2)) > 0.9


def _hypergradient(out):
    vals = [float(v) for v in re.findall(r"validation loss ([\d.]+)", out)]
    assert len(vals) == 5 and vals[-1] < 0.8 * vals[0], vals  # the schedule learned


CHECKS = {
    "transformer_early_stopping.py": _transformer,
    "variational_dropout_pruning.py": _variational,
    "hypergradient_lr_schedule.py": _hypergradient,
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example(name):
    CHECKS[name](run_example(name))
