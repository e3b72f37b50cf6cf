import numpy as np
import pytest
import torch

import fastreg
from fastreg.ops import dropout as D
from helpers import (Wrapper, assert_each_launches_its_kernel, assert_layout_like, record_launches,
                     views)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1,), (3,), (7, 5), (2, 3, 13), (4, 1, 9, 3), (257,)]


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["seed", "bits"])
def test_forward_matches_reference_bitwise(backend, dtype, mask, gen, via):
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        p = float(torch.rand((), generator=gen)) * 0.9
        ref, keep = D.dropout_reference(x, seed, 3, p)
        for name, xv in views(x):
            with fastreg.use_backend(backend):
                out = fastreg.dropout(xv, p, seed=seed, stream=3, mask=mask)
            assert out.dtype == dtype and out.shape == x.shape
            assert torch.equal(out, ref), (shape, name)
        # the mask really drops: dropped elements are exactly 0, kept ones scaled
        assert torch.equal(ref == 0, ~keep | (x == 0))


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_reference_semantics(backend, gen):
    x = torch.randn(1000, generator=gen, dtype=torch.float64)
    with fastreg.use_backend(backend):
        out = fastreg.dropout(x, 0.25, seed=99)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * (1 / 0.75), rtol=0, atol=0)  # torch: x * (mask / (1-p))
    assert 0.65 < kept.double().mean() < 0.85


def test_keep_fraction_statistics():
    x = torch.ones(1 << 20)
    for p in (0.1, 0.5, 0.9):
        frac = (fastreg.dropout(x, p, seed=1) != 0).double().mean().item()
        assert abs(frac - (1 - p)) < 3e-3


def test_mask_follows_spec_words():
    # keep iff word(i) >= round(p * 2^32)
    from fastreg.ops import rng

    n, seed, stream, p = 203, 77, 5, 0.4
    w = rng.words(n, seed, stream, backend="numba")
    out = fastreg.dropout(torch.ones(n), p, seed=seed, stream=stream)
    assert torch.equal(out != 0, w >= round(p * 2**32))


@pytest.mark.parametrize("start", [0, 2**31 - 8, 2**32 - 16, 2**32 + 8, 2**40])
def test_high_indices_numba_and_triton_kernels(start, gen):
    """64-bit indexing: the kernels' start offset reaches indices past 2^32."""
    import triton  # noqa: F401  (interpreter set by conftest)

    from fastreg.kernels.numba import dropout as nb
    from fastreg.kernels.triton import dropout as tk

    n, seed, stream, p = 999, 12345, 7, 0.3
    x = torch.randn(n, generator=gen)
    ref, keep = D.dropout_reference(x, seed, stream, p, start=start)
    out = np.empty(n, dtype=np.float32)
    bits = np.empty((n + 7) // 8, dtype=np.uint8)
    args = (seed, stream, D.keep_threshold(p), np.float32(D.dropout_scale(p)), start)
    nb.dropout_fwd(x.numpy(), out, *args)
    assert torch.equal(torch.from_numpy(out), ref)
    nb.dropout_fwd_bits(x.numpy(), out, bits, *args)
    assert torch.equal(torch.from_numpy(out), ref)
    assert torch.equal(torch.from_numpy(bits), D.pack_bits_reference(keep))

    tout = torch.empty(n)
    tbits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    tk.dropout_fwd_kernel[tk.grid(n)](x, tout, tbits, torch.tensor(seed), stream,
                                      D.keep_threshold(p), D.dropout_scale_bits(p), start, n,
                                      WITH_BITS=True, COMPUTE_F64=False, BLOCK=tk.BLOCK)
    assert torch.equal(tout, ref)
    assert torch.equal(tbits, D.pack_bits_reference(keep))


def test_numba_threaded_drivers_match_reference(gen):
    """Above SERIAL_BELOW the Numba kernels run their threaded drivers: bit for bit the
    reference too (forward, dropout_add, packed bits and their backward)."""
    from fastreg.kernels.numba import dropout as nb

    n, seed, stream, p = 2 * nb.SERIAL_BELOW + 37, 4321, 1, 0.3
    x = torch.randn(n, generator=gen)
    r = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    ref, keep = D.dropout_reference(x, seed, stream, p)
    scale = np.float32(D.dropout_scale(p))
    args = (seed, stream, D.keep_threshold(p), scale, 0)
    out = np.empty(n, np.float32)
    bits = np.empty((n + 7) // 8, np.uint8)
    nb.dropout_fwd(x.numpy(), out, *args)
    assert torch.equal(torch.from_numpy(out), ref)
    nb.dropout_fwd_bits(x.numpy(), out, bits, *args)
    assert torch.equal(torch.from_numpy(out), ref)
    assert torch.equal(torch.from_numpy(bits), D.pack_bits_reference(keep))
    nb.dropout_add_fwd(x.numpy(), r.numpy(), out, *args)
    assert torch.equal(torch.from_numpy(out), r + ref)
    nb.dropout_bits_apply(g.numpy(), bits, out, scale)
    assert torch.equal(torch.from_numpy(out), g * keep.float() * scale)


@pytest.fixture(params=["fast path", "ops"])
def via(request, monkeypatch):
    """Run fastreg.dropout through the eager fast path or through the torch.library ops."""
    if request.param == "ops":
        monkeypatch.setattr(D, "_eager_fast_path", lambda *t: False)
    return request.param


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
@pytest.mark.parametrize("mask", ["seed", "bits"])
def test_backward_regenerates_the_same_mask(backend, mask, gen, via):
    """The backward's mask is the forward's: same seed and the same stream (a backward that
    regenerated it from stream 0 passes only when the forward used stream 0)."""
    x = torch.randn(6, 37, generator=gen, dtype=torch.float32, requires_grad=True)
    g = torch.randn(6, 37, generator=gen)
    stream = 5
    with fastreg.use_backend(backend):
        out = fastreg.dropout(x, 0.6, seed=2024, stream=stream, mask=mask)
        out.backward(g)
    _, keep = D.dropout_reference(x.detach(), 2024, stream, 0.6)
    assert not torch.equal(keep, D.dropout_reference(x.detach(), 2024, 0, 0.6)[1])
    expected = (g * keep.float() * np.float32(1 / 0.4))
    assert torch.equal(out.detach(), x.detach() * keep.float() * np.float32(1 / 0.4))
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
def test_dropout_add_forward_backward(backend, gen, via):
    for dtype in DTYPES:
        x = torch.randn(5, 33, generator=gen).to(dtype)
        r = torch.randn(5, 33, generator=gen).to(dtype)
        m, _ = D.dropout_multipliers_reference(x.numel(), 11, 2, 0.35, dtype, "cpu")
        ref = (r.reshape(-1).to(m.dtype) + x.reshape(-1).to(m.dtype) * m).to(dtype).view(5, 33)
        xv = x.t().contiguous().t()  # non-contiguous, same values
        with fastreg.use_backend(backend):
            out = fastreg.dropout_add(xv, r, 0.35, seed=11, stream=2)
        assert torch.equal(out, ref), dtype
    x = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    for stream in (0, 6):  # the backward's mask uses the forward's stream
        x.grad = r.grad = None
        with fastreg.use_backend(backend):
            fastreg.dropout_add(x, r, 0.5, seed=3, stream=stream).backward(g)
        m, _ = D.dropout_multipliers_reference(36, 3, stream, 0.5, torch.float64, "cpu")
        assert torch.equal(x.grad, g * m.view(4, 9)), stream
        assert torch.equal(r.grad, g)


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
def test_gradcheck_float64(backend, gen, via):
    x = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    with fastreg.use_backend(backend):
        for mask in ("seed", "bits"):
            # stream != 0: the backward (and the double backward) must use the same stream
            assert torch.autograd.gradcheck(
                lambda t: fastreg.dropout(t, 0.3, seed=5, stream=3, mask=mask), (x,))
            assert torch.autograd.gradgradcheck(
                lambda t: fastreg.dropout(t, 0.3, seed=5, stream=3, mask=mask), (x,))
        assert torch.autograd.gradcheck(
            lambda a, b: fastreg.dropout_add(a, b, 0.3, seed=5, stream=2), (x, r))


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_opcheck(backend, gen):
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    r = torch.randn(4, 6, generator=gen, requires_grad=True)
    seed = torch.tensor(17)
    # The interpreter cannot run kernels on fake tensors, so compiled (aot_dispatch)
    # checks of the Triton path need a GPU: test_gpu_opcheck_and_compile runs them all.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if backend == "numba" else {"test_utils": utils}
    with fastreg.use_backend(backend):
        for with_bits in (False, True):
            torch.library.opcheck(torch.ops.fastreg.dropout_fwd, (x, seed, 1, 0.4, with_bits), **kw)
        torch.library.opcheck(torch.ops.fastreg.dropout_add_fwd, (x, r, seed, 1, 0.4), **kw)
        bits = torch.ops.fastreg.dropout_fwd(x.detach(), seed, 1, 0.4, True)[1]
        torch.library.opcheck(torch.ops.fastreg.dropout_bits_apply, (x, bits, 0.4), **kw)
    if backend == "numba":
        torch.library.opcheck(torch.ops.fastreg.dropout_fwd_cpu, (x.detach(), seed, 1, 0.4, True))


def test_torch_compile_fullgraph_matches_eager(gen):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x, seed):
            h = fastreg.dropout(self.lin(x), 0.25, seed=seed)
            return fastreg.dropout_add(h, x, 0.1, seed=seed, stream=1)

    torch._dynamo.reset()
    model = Block()
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    eager = model(x, 42)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, 42)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    eager.sum().backward()
    torch.testing.assert_close(g_compiled, x.grad, rtol=1e-6, atol=1e-6)


def test_module_is_drop_in():
    ours, theirs = fastreg.nn.Dropout(0.3), torch.nn.Dropout(0.3)
    assert repr(ours) == repr(theirs)
    assert repr(fastreg.nn.Dropout(0.1, inplace=True)) == repr(torch.nn.Dropout(0.1, inplace=True))
    x = torch.randn(10, 10)
    ours.eval()
    assert ours(x) is x
    ours.train()
    y = ours(x)
    assert ((y == 0) | torch.isclose(y, x / 0.7)).all()
    xi = x.clone()
    out = fastreg.nn.Dropout(0.3, inplace=True)(xi)
    assert out is xi and ((xi == 0) | torch.isclose(xi, x / 0.7)).all()


def test_identity_cases_and_extremes(gen):
    x = torch.randn(9, 4, generator=gen)
    assert fastreg.dropout(x, 0.5, training=False) is x
    assert fastreg.dropout(x, 0.0) is x
    e = torch.empty(0, 3)
    assert fastreg.dropout(e, 0.5) is e
    y = fastreg.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    x.requires_grad_(True)
    fastreg.dropout(x, 1.0, mask="bits").sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_nan_inf_propagate_like_torch():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 64)
    out = fastreg.dropout(x, 0.5, seed=8)
    m, keep = D.dropout_multipliers_reference(x.numel(), 8, 0, 0.5, x.dtype, "cpu")
    expected = x * m  # dropped inf -> nan, as torch's input * mask * scale gives
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    same = ~torch.isnan(expected)
    assert torch.equal(out[same], expected[same])


def test_seed_none_is_reproducible_with_manual_seed():
    x = torch.randn(100)
    torch.manual_seed(0)
    a = fastreg.dropout(x, 0.5)
    b = fastreg.dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, fastreg.dropout(x, 0.5))
    assert not torch.equal(a, b)


def test_fast_path_is_taken_only_in_plain_eager():
    x = torch.randn(8)
    assert D._eager_fast_path(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not D._eager_fast_path(torch.empty(8))
    assert not torch.func.vmap(lambda t: torch.tensor(D._eager_fast_path(t)))(torch.ones(2, 3)).any()


@pytest.mark.parametrize("via_name", ["fast path", "ops"])
def test_saved_bytes_both_paths(via_name, monkeypatch):
    import sys, os

    if via_name == "ops":
        monkeypatch.setattr(D, "_eager_fast_path", lambda *t: False)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from _util import saved_bytes_per_elem

    n = 1 << 12
    x = torch.randn(n, requires_grad=True)
    assert saved_bytes_per_elem(lambda: fastreg.dropout(x, 0.5, seed=1), n) == 8 / n
    assert saved_bytes_per_elem(lambda: fastreg.dropout(x, 0.5, seed=1, mask="bits"), n) == 0.125
    assert saved_bytes_per_elem(lambda: fastreg.dropout_add(x, x, 0.5, seed=1), n) == 8 / n


def test_saved_bytes():
    import sys, os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from _util import saved_bytes_per_elem

    n = 1 << 16
    x = torch.randn(n, requires_grad=True)
    seed_mode = saved_bytes_per_elem(lambda: fastreg.dropout(x, 0.5, seed=1), n)
    bits_mode = saved_bytes_per_elem(lambda: fastreg.dropout(x, 0.5, seed=1, mask="bits"), n)
    torch_mode = saved_bytes_per_elem(lambda: torch.nn.functional.dropout(x, 0.5), n)
    assert seed_mode == 8 / n  # the 0-dim int64 seed only
    assert bits_mode == 0.125
    assert torch_mode >= 1.0


def test_bad_input_errors():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="^fastreg.dropout: p must be in"):
        fastreg.dropout(x, 1.5)
    with pytest.raises(ValueError, match="^fastreg.dropout: p must be in"):
        fastreg.dropout(x, float("nan"))
    with pytest.raises(TypeError, match="^fastreg.dropout: p must be a real"):
        fastreg.dropout(x, True)
    for bad in (torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.bool),
                torch.ones(3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="^fastreg.dropout: input must have a floating dtype"):
            fastreg.dropout(bad)
    with pytest.raises(TypeError, match="^fastreg.dropout: input must be a torch.Tensor"):
        fastreg.dropout([1.0, 2.0])
    with pytest.raises(ValueError, match="mask must be one of"):
        fastreg.dropout(x, mask="bytes")
    with pytest.raises(ValueError, match="^fastreg.dropout: seed must be in"):
        fastreg.dropout(x, seed=2**63)
    with pytest.raises(ValueError, match="^fastreg.dropout: seed must be in"):
        fastreg.dropout(x, seed=-1)
    with pytest.raises(TypeError, match="^fastreg.dropout: seed must be an int"):
        fastreg.dropout(x, seed=1.0)
    with pytest.raises(TypeError, match="^fastreg.dropout: training must be a bool, got 1$"):
        fastreg.dropout(x, 0.5, 1)
    with pytest.raises(ValueError, match="^fastreg.dropout: stream must be in"):
        fastreg.dropout(x, 0.5, stream=-1)
    with pytest.raises(ValueError, match="residual must have the same shape"):
        fastreg.dropout_add(x, torch.randn(5))
    with pytest.raises(ValueError, match="residual must have the same dtype"):
        fastreg.dropout_add(x, torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask must be one of"):
        fastreg.nn.Dropout(0.5, mask="x")
    with pytest.raises(ValueError, match="FASTREG_BACKEND|backend must be"):
        fastreg.set_backend("cpu")



def test_dropout_add_errors_name_the_op_and_the_argument():
    """Every dropout_add check names fastreg.dropout_add and the argument at fault."""
    x, r = torch.randn(4), torch.randn(4)
    cases = [
        (TypeError, "fastreg.dropout_add: input must have a floating dtype",
         lambda: fastreg.dropout_add(torch.ones(4, dtype=torch.int32), r)),
        (TypeError, "fastreg.dropout_add: residual must be a torch.Tensor",
         lambda: fastreg.dropout_add(x, [1.0] * 4)),
        (ValueError, r"fastreg.dropout_add: residual must have the same shape as input: "
                     r"input.shape=torch.Size\(\[4\]\), residual.shape",
         lambda: fastreg.dropout_add(x, torch.randn(5))),
        (ValueError, "fastreg.dropout_add: p must be in", lambda: fastreg.dropout_add(x, r, 2.0)),
        (TypeError, "fastreg.dropout_add: training must be a bool",
         lambda: fastreg.dropout_add(x, r, 0.5, 1)),
        (ValueError, "fastreg.dropout_add: stream must be in",
         lambda: fastreg.dropout_add(x, r, 0.5, stream=-1)),
        (ValueError, "fastreg.dropout_add: seed must be in",
         lambda: fastreg.dropout_add(x, r, 0.5, seed=-1)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match="^" + msg):
            call()


def test_dropout_add_defaults_and_shortcuts():
    """p=0.5, training=True and stream=0 by default (the documented signature); training=False
    and p=0 give input + residual, p=1 gives residual, and a one-element input is dropped
    like any other."""
    x, r = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    ref, _ = D.dropout_reference(x, 12, 0, 0.5)
    assert torch.equal(fastreg.dropout_add(x, r, seed=12), r + ref)
    assert torch.equal(fastreg.dropout(x, seed=12), ref)
    assert torch.equal(fastreg.dropout_add(x, r, 0.5, False, seed=12), r + x)
    assert torch.equal(fastreg.dropout_add(x, r, 0.0, seed=12), r + x)
    assert torch.equal(fastreg.dropout_add(x, r, 1.0, seed=12), r)
    for seed in range(8):  # some of these seeds drop the element
        one, _ = D.dropout_reference(x[:1], seed, 3, 0.5)
        assert torch.equal(fastreg.dropout_add(x[:1], r[:1], seed=seed, stream=3), r[:1] + one)


def test_bits_apply_op_keeps_half_dtypes():
    """torch.ops.fastreg.dropout_bits_apply called directly on float16/bfloat16 gradients
    (contiguous and channels_last) returns their dtype, values as the float32 computation
    rounded once (autograd would cast a float32 result back and hide it)."""
    g32 = torch.randn(2, 8, 3, 3)
    keep = torch.rand(g32.numel(), generator=torch.Generator().manual_seed(4)) > 0.3
    bits = D.pack_bits_reference(keep)
    for dtype in (torch.float16, torch.bfloat16):
        for g in (g32.to(dtype), g32.to(dtype).contiguous(memory_format=torch.channels_last)):
            out = torch.ops.fastreg.dropout_bits_apply(g, bits, 0.3)
            want = (g.float().reshape(-1) * torch.where(keep, D.dropout_scale(0.3), 0.0)).to(dtype)
            assert out.dtype == dtype and torch.equal(out.reshape(-1), want)


def test_direct_ops_check_sizes():
    """torch.ops.fastreg.* called directly (no wrapper checks): inconsistent sizes are refused
    before the Numba kernels, which read residual and bits at x's indices, could read past them."""
    x, seed = torch.randn(100), torch.tensor(7)
    for name in ("dropout_add_fwd_cpu", "dropout_add_fwd"):  # each op body checks
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: residual has shape \(10,\)"):
            op(x, torch.randn(10), seed, 0, 0.5)
        with pytest.raises(ValueError, match=r"residual has shape \(200,\).*x's shape \(100,\)"):
            op(x, torch.randn(200), seed, 0, 0.5)
    for name in ("dropout_bits_apply_cpu", "dropout_bits_apply"):
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=f"{name}: bits has 3 bytes, needs 13 for 100 "
                                             "elements"):
            op(x, torch.zeros(3, dtype=torch.uint8), 0.5)
        with pytest.raises(ValueError, match="bits has 0 bytes, needs 1 for 5 elements"):
            op(x[:5], torch.zeros(0, dtype=torch.uint8), 0.5)
        with pytest.raises(TypeError, match="bits must be uint8, got torch.int64"):
            op(x, torch.zeros(13, dtype=torch.int64), 0.5)
        with pytest.raises(ValueError, match="bits must be 1-D"):
            op(x, torch.zeros(13, 2, dtype=torch.uint8), 0.5)
    # consistent sizes still run (longer bits are allowed: the first 13 bytes are read)
    bits = D.pack_bits_reference(torch.rand(100) < 0.5)
    out = torch.ops.fastreg.dropout_bits_apply_cpu(x, torch.cat([bits, bits]), 0.5)
    assert torch.equal(out, torch.ops.fastreg.dropout_bits_apply_cpu(x, bits, 0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_bit_identical_to_cpu(dtype):
    x = torch.randn(3, 1001, 7).to(dtype)
    for mask in ("seed", "bits"):
        cpu = fastreg.dropout(x, 0.37, seed=31337, mask=mask)
        gpu = fastreg.dropout(x.cuda(), 0.37, seed=31337, mask=mask)
        assert torch.equal(cpu, gpu.cpu())
    r = torch.randn_like(x)
    assert torch.equal(fastreg.dropout_add(x, r, 0.2, seed=4),
                       fastreg.dropout_add(x.cuda(), r.cuda(), 0.2, seed=4).cpu())
    xg = x.cuda().requires_grad_(True)
    fastreg.dropout(xg, 0.37, seed=31337).backward(torch.ones_like(xg))
    assert torch.equal(xg.grad.cpu(), fastreg.dropout(torch.ones_like(x), 0.37, seed=31337))


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x = torch.randn(64, 33, device="cuda", requires_grad=True)
    seed = torch.tensor(5, device="cuda")
    torch.library.opcheck(torch.ops.fastreg.dropout_fwd, (x, seed, 0, 0.3, True))
    torch.library.opcheck(torch.ops.fastreg.dropout_add_fwd, (x, x.detach(), seed, 0, 0.3))
    f = torch.compile(lambda t: fastreg.dropout(t, 0.3, seed=5), fullgraph=True)
    assert torch.equal(f(x), fastreg.dropout(x, 0.3, seed=5))


def test_huge_page_allocation_is_plain_memory():
    from fastreg import _alloc

    big = _alloc.empty((3, 1 << 21), torch.float32)  # 24 MiB: advised
    assert big.shape == (3, 1 << 21) and big.dtype == torch.float32 and big.is_contiguous()
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * 3 * (1 << 21)
    a = _alloc.empty_like_numpy(np.zeros((5, 7), dtype=np.float64))
    assert a.shape == (5, 7) and a.dtype == np.float64
    assert _alloc.empty_numpy(0, np.float32).shape == (0,)


# ---------------------------------------------------------------- public API details
def test_set_backend_and_forced_backend(monkeypatch):
    """set_backend(name) forces a backend for this thread and forced_backend() reports it;
    set_backend(None) returns to choosing by device, where FASTREG_BACKEND is read again."""
    monkeypatch.delenv("FASTREG_BACKEND", raising=False)
    x = torch.randn(50)
    try:
        assert fastreg.forced_backend() is None
        fastreg.set_backend("torch")
        assert fastreg.forced_backend() == "torch"
        with fastreg.use_backend("numba"):
            assert fastreg.forced_backend() == "numba"
        assert fastreg.forced_backend() == "torch"
        # the forced backend really runs: "cuda" is not implemented for dropout
        fastreg.set_backend("cuda")
        with pytest.raises(RuntimeError, match="not implemented"):
            fastreg.dropout(x, 0.5, seed=1)
        fastreg.set_backend(None)
        assert fastreg.forced_backend() is None
        assert torch.equal(fastreg.dropout(x, 0.5, seed=1), D.dropout_reference(x, 1, 0, 0.5)[0])
        monkeypatch.setenv("FASTREG_BACKEND", "triton")
        assert fastreg.forced_backend() == "triton"
        monkeypatch.setenv("FASTREG_BACKEND", " ")
        assert fastreg.forced_backend() is None
        fastreg.set_backend("numba")  # the thread's choice wins over the environment
        monkeypatch.setenv("FASTREG_BACKEND", "torch")
        assert fastreg.forced_backend() == "numba"
    finally:
        fastreg.set_backend(None)


def test_module_mask_bits_and_fixed_seed(gen):
    """nn.Dropout(mask="bits") saves the packed mask and gives the same values and gradient as
    mask="seed"; nn.Dropout(seed=s) uses the same mask on every call (that of dropout(seed=s))."""
    x = torch.randn(7, 19, generator=gen, requires_grad=True)
    g = torch.randn(7, 19, generator=gen)
    m = fastreg.nn.Dropout(0.4, mask="bits", seed=123)
    assert repr(m) == "Dropout(p=0.4, inplace=False, mask=bits)"
    y = m(x)
    ref, keep = D.dropout_reference(x.detach(), 123, 0, 0.4)
    assert torch.equal(y, ref)
    y.backward(g)
    assert torch.equal(x.grad, g * keep.float() * np.float32(1 / 0.6))
    from helpers import saved_bytes

    assert saved_bytes(lambda: m(x)) == (x.numel() + 7) // 8  # the packed mask only
    assert torch.equal(m(x), y)  # a fixed seed: the same mask every call
    s = fastreg.nn.Dropout(0.4, seed=123)
    assert torch.equal(s(x), y) and torch.equal(s(x), y)
    free = fastreg.nn.Dropout(0.4)
    assert not torch.equal(free(x), free(x))


@pytest.mark.parametrize("mask", ["seed", "bits"])
def test_backward_every_dtype_and_the_numba_kernels_run(mask, gen, via, monkeypatch):
    """Backward in every dtype, bit for bit the reference (the scale in the compute dtype: a
    float32 scale would be off by ~1e-8 in float64), and on CPU the Numba kernels really run
    (falling back to the reference would give the same values, unnoticed)."""
    from fastreg.kernels.numba import dropout as nb

    calls = []
    for name in ("dropout_fwd", "dropout_fwd_bits", "dropout_bits_apply"):
        kernel = getattr(nb, name)
        monkeypatch.setattr(nb, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    p = 0.3  # 1 / 0.7 is not exact in float32
    for dtype in DTYPES:
        x = torch.randn(5, 41, generator=gen).to(dtype).requires_grad_()
        g = torch.randn(5, 41, generator=gen).to(dtype)
        fastreg.dropout(x, p, seed=77, stream=2, mask=mask).backward(g)
        m, _ = D.dropout_multipliers_reference(x.numel(), 77, 2, p, dtype, "cpu")
        want = (g.reshape(-1).to(m.dtype) * m).to(dtype).view(5, 41)
        assert torch.equal(x.grad, want), dtype
    fwd = "dropout_fwd_bits" if mask == "bits" else "dropout_fwd"
    bwd = "dropout_bits_apply" if mask == "bits" else "dropout_fwd"
    assert calls.count(fwd) >= len(DTYPES) and calls.count(bwd) >= len(DTYPES), calls


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_word_equal_to_the_threshold_is_kept(backend):
    """Keep iff word >= t, not word > t: with p chosen so that t is one element's own word, that
    element is kept (and scaled) by the reference and by the kernels."""
    from fastreg.ops import rng

    n, seed, stream = 64, 9, 4
    w = rng.words(n, seed, stream, backend="numba")
    j = int(torch.argmax(torch.where(w < 2**31, w, torch.zeros_like(w))))  # a word below 2^31
    p = int(w[j]) / 2.0**32  # exact in float64: round(p * 2^32) is w[j]
    assert D.keep_threshold(p) == int(w[j])
    x = torch.ones(n, dtype=torch.float64)
    ref, keep = D.dropout_reference(x, seed, stream, p)
    assert bool(keep[j]) and ref[j] == D.dropout_scale(p)
    assert torch.equal(keep, w >= int(w[j]))
    for mask in ("seed", "bits"):
        with fastreg.use_backend(backend):
            out = fastreg.dropout(x, p, seed=seed, stream=stream, mask=mask)
        assert torch.equal(out, ref), mask


def test_reference_and_numba_kernel_start_offset(gen):
    """start shifts the logical index: the n elements from start are elements start.. of one long
    run, in the reference and in the Numba kernels (the GPU ones: the high-index test)."""
    from fastreg.kernels.numba import dropout as nb

    n, seed, stream, p, start = 37, 555, 6, 0.45, 24
    x = torch.randn(start + n, generator=gen, dtype=torch.float64)
    whole, keep_whole = D.dropout_reference(x, seed, stream, p)
    part, keep = D.dropout_reference(x[start:].clone(), seed, stream, p, start=start)
    assert torch.equal(part, whole[start:]) and torch.equal(keep, keep_whole[start:])
    assert not torch.equal(keep, keep_whole[:n])  # the offset matters for these words
    out = np.empty(n, dtype=np.float64)
    nb.dropout_fwd(x[start:].numpy().copy(), out, seed, stream, D.keep_threshold(p),
                   np.float64(D.dropout_scale(p)), start)
    assert torch.equal(torch.from_numpy(out), part)


# ---------------------------------------------------------------- paths that choose by length,
# layout and tensor kind: each must give the op's values


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_packed_mask_of_every_length(backend, gen):
    """dropout_fwd's packed mask has (n + 7) // 8 bytes, bit b of byte k = keep[8k + b], for
    lengths around and far from a multiple of 8, contiguous and strided (the two Numba paths)."""
    for n in (1, 7, 8, 9, 64, 65, 1000, 1001):
        x = torch.randn(n, 2, generator=gen)
        for name, xv in (("contiguous", x[:, 0].contiguous()), ("strided", x[:, 0])):
            with fastreg.use_backend(backend):
                out, bits = torch.ops.fastreg.dropout_fwd(xv, torch.tensor(6), 2, 0.3, True)
            ref, keep = D.dropout_reference(xv, 6, 2, 0.3)
            assert bits.dtype == torch.uint8 and bits.shape == ((n + 7) // 8,), (n, name)
            assert torch.equal(bits, D.pack_bits_reference(keep)), (n, name)
            assert torch.equal(out, ref), (n, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dropout_add_channels_last_every_dtype(dtype, gen):
    """dropout_add on channels_last input and residual (the Numba memory-order walk, which
    converts a float16/bfloat16 residual to float32 first) equals dropout_add on the
    contiguous tensors, bit for bit, laid out channels_last; forward and gradients."""
    x0 = torch.randn(2, 3, 4, 4, generator=gen).to(dtype)
    r0 = torch.randn(2, 3, 4, 4, generator=gen).to(dtype)
    g = torch.randn(2, 3, 4, 4, generator=gen).to(dtype)
    got, want = [], []
    for layout, out in ((torch.channels_last, got), (torch.contiguous_format, want)):
        x = x0.to(memory_format=layout).requires_grad_()
        r = r0.to(memory_format=layout).requires_grad_()
        with fastreg.use_backend("numba"):
            y = fastreg.dropout_add(x, r, 0.3, seed=5, stream=1)
        y.backward(g)
        out += [y, x.grad, r.grad]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_bits_apply_keeps_a_sliced_channels_last_layout(backend, gen):
    """dropout_bits_apply on a channels_last gradient sliced in W (not dense: the logical-order
    path) returns it laid out as torch.empty_like(grad), channels_last, with the values of the
    contiguous gradient."""
    g = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)[..., :3]
    keep = D.dropout_reference(g.contiguous(), 4, 0, 0.3)[1]
    bits = D.pack_bits_reference(keep.reshape(-1))
    with fastreg.use_backend(backend):
        out = torch.ops.fastreg.dropout_bits_apply(g, bits, 0.3)
        want = torch.ops.fastreg.dropout_bits_apply(g.contiguous(), bits, 0.3)
    assert_layout_like(out, g)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, want)


@pytest.mark.parametrize("where", ["input", "residual", "seed"])
def test_a_subclass_anywhere_takes_the_op_route(where, monkeypatch, gen):
    """A tensor subclass as input, residual or seed sends dropout and dropout_add through the
    registered op (whose dispatch unwraps it), never into the eager fast path that hands
    tensors to the kernels directly; the values are the plain tensors'."""
    x = torch.randn(4, 3, generator=gen)
    r = torch.randn(4, 3, generator=gen)
    plain = [fastreg.dropout_add(x, r, 0.3, seed=3), fastreg.dropout(x, 0.3, seed=3)]

    def refuse(*a, **k):
        raise AssertionError("the eager fast path took a subclass")

    monkeypatch.setattr(D._DropoutFn, "apply", refuse)
    monkeypatch.setattr(D._DropoutAddFn, "apply", refuse)
    xw = Wrapper(x) if where == "input" else x
    rw = Wrapper(r) if where == "residual" else r
    seed = Wrapper(torch.tensor(3)) if where == "seed" else 3
    got = [fastreg.dropout_add(xw, rw, 0.3, seed=seed)]
    if where != "residual":
        got.append(fastreg.dropout(xw, 0.3, seed=seed))
    for a, b in zip(got, plain):
        assert torch.equal(a.inner if isinstance(a, Wrapper) else a, b)


def test_identity_cases_draw_no_seed(gen):
    """training=False, p=0 or an empty input return at once, without drawing a seed: torch's
    default generator is left as it was (what seed=None would otherwise advance), for dropout
    and dropout_add alike, and the values are the identity's."""
    x = torch.randn(5, 3, generator=gen)
    r = torch.randn(5, 3, generator=gen)
    e = torch.empty(0, 3)
    for call, want in ((lambda: fastreg.dropout(x, 0.0), x),
                       (lambda: fastreg.dropout(x, 0.4, training=False), x),
                       (lambda: fastreg.dropout(e, 0.4), e),
                       (lambda: fastreg.dropout_add(x, r, 0.0), x + r),
                       (lambda: fastreg.dropout_add(x, r, 0.4, training=False), x + r),
                       (lambda: fastreg.dropout_add(e, e, 0.4), e)):
        state = torch.get_rng_state()
        assert torch.equal(call(), want)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bits_apply_matches_the_reference_in_every_dtype(backend, dtype, gen):
    """dropout_bits_apply (the packed-mask backward) returns the gradient's dtype with the
    reference's values bit for bit: the scale 1 / (1 - p) in the compute dtype (float64 for
    float64: 1 / 0.7 is not a float32), the product rounded once."""
    g = torch.randn(37, 5, generator=gen).to(dtype)
    want, keep = D.dropout_reference(g, 11, 3, 0.3)
    with fastreg.use_backend(backend):
        out = torch.ops.fastreg.dropout_bits_apply(g, D.pack_bits_reference(keep.reshape(-1)), 0.3)
    assert out.dtype == dtype
    assert torch.equal(out, want)


def test_each_op_launches_its_triton_kernel(monkeypatch, gen):
    """Under the Triton backend each op launches its own kernel once, for 40 elements and for
    one (the torch reference computes the same values, so only the launch tells the two apart;
    a skipped launch leaves the output uninitialised); under the torch backend none is
    launched."""
    from fastreg.kernels.triton import dropout as tk

    launched = record_launches(monkeypatch)
    x = torch.randn(40, generator=gen)
    r = torch.randn(40, generator=gen)
    seed = torch.tensor(2)
    bits = torch.ops.fastreg.dropout_fwd(x, seed, 0, 0.3, True)[1]
    calls = {tk.dropout_fwd_kernel: lambda: torch.ops.fastreg.dropout_fwd(x, seed, 0, 0.3, True),
             tk.dropout_add_fwd_kernel: lambda: torch.ops.fastreg.dropout_add_fwd(x, r, seed, 0,
                                                                                   0.3),
             tk.dropout_bits_apply_kernel: lambda: torch.ops.fastreg.dropout_bits_apply(x, bits,
                                                                                        0.3)}
    for n in (40, 1):
        x, r, bits = x[:n], r[:n], bits[:(n + 7) // 8]  # the calls read these names
        assert_each_launches_its_kernel(launched, calls, n)
