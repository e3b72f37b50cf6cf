"""Layout benchmarks (docs/layout.md): dropout on a channels_last activation against the same
tensor contiguous, fastreg against torch eager's nn.Dropout on each.

Groups: "dropout fwd <layout> ..." and "dropout fwd+bwd <layout> ...", layout "contiguous" or
"channels_last", a (32, 64, 28, 28) float32 tensor, p = 0.1, on CPU (and CUDA when present,
marked gpu). Each result keeps the input's layout (asserted once per benchmark).

`python bench/bench_layout.py [rounds [threads [NxCxHxW]]]` prints the same comparison with the providers
interleaved round by round in one process (medians and ratios), the figures of
docs/layout.md: on a shared machine, interleaving keeps a neighbour's load from landing on
one provider only.
"""

import os
import statistics
import sys
import time

import pytest
import torch

import fastreg

sys.path.insert(0, os.path.dirname(__file__))

P = 0.1
SHAPE = (32, 64, 28, 28)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROVIDERS = ("fastreg", "torch eager", "copy (floor)")


def _make(provider):
    if provider == "fastreg":
        mod = fastreg.nn.Dropout(P)
    else:
        mod = torch.nn.Dropout(P)
    return mod


def _setup(layout, device, requires_grad, shape=SHAPE):
    x = torch.randn(shape, device=device).contiguous(memory_format=LAYOUTS[layout])
    g = torch.randn(shape, device=device).contiguous(memory_format=LAYOUTS[layout])
    return x.requires_grad_(requires_grad), g


def _work(provider, kind, x, g):
    """The callable one round times."""
    if provider == "copy (floor)":
        # forward reads x and writes one tensor of its layout; backward the same again
        if kind == "fwd":
            return lambda: torch.empty_like(x).copy_(x.detach())
        return lambda: (torch.empty_like(x).copy_(x.detach()), torch.empty_like(g).copy_(g))
    mod = _make(provider)
    if kind == "fwd":
        def fn():
            with torch.no_grad():
                return mod(x)
        return fn
    return lambda: torch.autograd.grad(mod(x), x, g)


def _check_layout(provider, kind, x, g):
    if provider == "copy (floor)":
        return
    out = _work(provider, kind, x, g)()
    out = out[0] if isinstance(out, tuple) else out
    assert out.stride() == x.stride(), (provider, kind, out.stride(), x.stride())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dropout_layout(benchmark, provider, kind, layout, device):
    from _util import run

    x, g = _setup(layout, device, kind != "fwd")
    _check_layout(provider, kind, x, g)
    run(benchmark, _work(provider, kind, x, g), device, provider=provider,
        group=f"dropout {kind} {layout} 32x64x28x28 f32 {device}",
        rounds=50 if device == "cuda" else 30)


def interleaved(rounds: int = 41, device: str = "cpu", shape=SHAPE) -> dict:
    """Median seconds per (kind, layout, provider), the providers timed in turn each round."""
    from _util import sync

    cases = {}
    for kind in ("fwd", "fwd+bwd"):
        for layout in LAYOUTS:
            x, g = _setup(layout, device, kind != "fwd", shape)
            for provider in PROVIDERS:
                _check_layout(provider, kind, x, g)
                cases[(kind, layout, provider)] = _work(provider, kind, x, g)
    times = {k: [] for k in cases}
    for fn in cases.values():  # warm-up: Numba compiles, allocator pools fill
        fn(), fn()
    for _ in range(rounds):
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv):
    """argv: [rounds [threads [shape]]]; threads sets torch's and Numba's thread counts, shape
    is NxCxHxW (default 32x64x28x28; H*W odd takes the kernels' per-element path)."""
    rounds = int(argv[1]) if len(argv) > 1 else 41
    if len(argv) > 2:
        import numba

        torch.set_num_threads(int(argv[2]))
        numba.set_num_threads(int(argv[2]))
    shape = tuple(int(v) for v in argv[3].split("x")) if len(argv) > 3 else SHAPE
    med = interleaved(rounds, shape=shape)
    print(f"dropout p={P}, {shape} float32, CPU, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds, medians")
    for kind in ("fwd", "fwd+bwd"):
        for layout in LAYOUTS:
            row = [f"{kind:8s} {layout:13s}"]
            for provider in PROVIDERS:
                row.append(f"{provider} {med[(kind, layout, provider)] * 1e3:7.3f} ms")
            print("  ".join(row))
        f_cl, f_c = med[(kind, "channels_last", "fastreg")], med[(kind, "contiguous", "fastreg")]
        t_cl = med[(kind, "channels_last", "torch eager")]
        print(f"{kind:8s} fastreg channels_last / contiguous = {f_cl / f_c:.2f}; "
              f"torch eager channels_last / fastreg channels_last = {t_cl / f_cl:.2f}")


if __name__ == "__main__":
    main(sys.argv)
