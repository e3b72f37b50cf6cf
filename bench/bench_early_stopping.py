"""fastreg.EarlyStopping.step cost (docs/early_stopping.md). Target: at most 20 µs per step
without restore_best.

Each round times 1000 steps (one benchmark group per criterion) over a noisy validation curve that keeps going (so no criterion
stops it early: alphas and patience are set out of reach); the per-step figure is the
median round / 1000 (extra_info["us_per_step"]). Providers:
  "fastreg"                 EarlyStopping.step with Python floats
  "fastreg, 0-dim tensors"  the same with tensors (float() of each is part of the cost)
  "bare Python rule"        the patience rule written inline: the floor for any Python step
  group "restore 1M": restore_best on a 1M-parameter model whose best improves at 1 epoch
        in 50, against "copy (floor)", the 20 state-dict copies alone: a copy happens only
        at an improvement, so the two should be close
"""

import math
import random

import pytest
import torch

from fastreg import EarlyStopping

N = 1000


def curve(n=N, seed=0):
    r = random.Random(seed)
    return [1.0 + 0.1 * math.sin(t / 7.0) + 0.01 * r.random() for t in range(n)]


def _time(benchmark, group, provider, fn, rounds=30):
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    for _ in range(2):
        fn()
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    benchmark.extra_info["us_per_step"] = 1e6 * benchmark.stats.stats.median / N


CASES = {
    "gl": dict(criteria="gl", alpha=1e9),
    "pq": dict(criteria="pq", alpha=1e9),
    "up": dict(criteria="up", s=10**6),
    "patience": dict(criteria="patience", patience=10**9),
    "gl+pq+up+patience": dict(criteria=["gl", "pq", "up", "patience"], alpha=1e9, s=10**6,
                              patience=10**9),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step(benchmark, name):
    va = curve()
    tr = curve(seed=1)

    def steps():
        stop = EarlyStopping(**CASES[name])
        step = stop.step
        for v, t in zip(va, tr):
            step(v, train_loss=t)

    _time(benchmark, f"EarlyStopping.step x1000 {name}", "fastreg", steps)


def test_step_tensors(benchmark):
    va = [torch.tensor(v) for v in curve()]
    tr = [torch.tensor(v) for v in curve(seed=1)]

    def steps():
        stop = EarlyStopping(**CASES["gl+pq+up+patience"])
        for v, t in zip(va, tr):
            stop.step(v, train_loss=t)

    _time(benchmark, "EarlyStopping.step x1000 gl+pq+up+patience", "fastreg, 0-dim tensors", steps)


def test_bare_patience_rule(benchmark):
    va = curve()

    def steps():
        best, wait, patience, min_delta = math.inf, 0, 10**9, 0.0
        for v in va:
            if v < best - min_delta:
                best, wait = v, 0
            else:
                wait += 1
                if wait >= patience:
                    break

    _time(benchmark, "EarlyStopping.step x1000 patience", "bare Python rule", steps)


def test_restore_best(benchmark):
    # improves at one epoch in 50: 20 copies of 1M float32 in 1000 steps
    va = [1.0 - 1e-3 * t if t % 50 == 0 else 10.0 for t in range(N)]
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1))

    def steps():
        stop = EarlyStopping("patience", patience=10**9, restore_best=True)
        for v in va:
            stop.step(v, model=model)
        assert stop.checkpoints_saved == N // 50

    _time(benchmark, "EarlyStopping.step x1000 restore 1M", "fastreg", steps, rounds=10)


def test_restore_best_copy_floor(benchmark):
    """The same 20 copies of the state dict alone: what restore_best cannot avoid."""
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1))

    def copies():
        for _ in range(N // 50):
            {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    _time(benchmark, "EarlyStopping.step x1000 restore 1M", "copy (floor)", copies, rounds=10)
