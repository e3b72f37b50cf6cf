import pytest
import torch

from fastreg import _native
from fastreg.ops import rng

CPU_BACKENDS = ["torch", "numba", "triton", "host"]
FAST_BACKENDS = CPU_BACKENDS[1:]


def test_known_answer_random123():
    # Random123 kat_vectors: philox4x32_10, counter 0, key 0.
    r = rng.philox4x32_10_reference(0, 0, 0, 0, 0, 0)
    assert [int(x) for x in r] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # Random123 kat_vectors: all-ones counter and key.
    m = 0xFFFFFFFF
    r = rng.philox4x32_10_reference(m, m, m, m, m, m)
    assert [int(x) for x in r] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    # Random123 kat_vectors: pi digits.
    r = rng.philox4x32_10_reference(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344,
                                    0xA4093822, 0x299F31D0)
    assert [int(x) for x in r] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_words_kat_every_backend(backend):
    # counter 0, stream 0, seed 0: the first four words are the Random123 vector.
    w = rng.words(4, 0, 0, backend=backend)
    assert w.tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("backend", FAST_BACKENDS)  # against "torch", the reference
@pytest.mark.parametrize("start", [0, 3, 2**32 - 7, 2**32 + 1, 2**40 + 2, 2**62 - 100])
def test_words_bit_identical(backend, start):
    seed, stream = 0x123456789ABCDEF, 2**33 + 5
    n = 67
    ref = rng.words(n, seed, stream, start=start, backend="torch")
    got = rng.words(n, seed, stream, start=start, backend=backend)
    assert torch.equal(ref, got)
    assert int(ref.min()) >= 0 and int(ref.max()) < 2**32


@pytest.mark.parametrize("backend", FAST_BACKENDS)  # against "torch", the reference
def test_uniforms_bit_identical(backend):
    ref = rng.uniforms(101, 7, 3, start=2**32 - 50, backend="torch")
    got = rng.uniforms(101, 7, 3, start=2**32 - 50, backend=backend)
    assert torch.equal(ref, got)
    assert float(ref.min()) > 0.0 and float(ref.max()) < 1.0


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_normals_agree(backend):
    ref = rng.normals(203, 11, 9, start=2**32 - 101, backend="torch")
    got = rng.normals(203, 11, 9, start=2**32 - 101, backend=backend)
    torch.testing.assert_close(got, ref, rtol=4e-6, atol=4e-6)


def test_uniform_and_normal_statistics():
    u = rng.uniforms(1 << 18, 42, 0, backend="numba")
    assert abs(float(u.mean()) - 0.5) < 3e-3
    z = rng.normals(1 << 18, 42, 1, backend="numba")
    assert abs(float(z.mean())) < 1e-2 and abs(float(z.std()) - 1.0) < 1e-2


def test_streams_and_seeds_differ():
    a = rng.words(64, 1, 0)
    assert not torch.equal(a, rng.words(64, 1, 1))
    assert not torch.equal(a, rng.words(64, 2, 0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        rng.words(4, -1)
    with pytest.raises(ValueError, match="seed"):
        rng.words(4, 2**63)
    with pytest.raises(TypeError, match="stream"):
        rng.words(4, 0, 1.5)


def test_native_extension_built_and_cuda_part_imports():
    C = _native.native()
    assert C is not None, "fastreg._C was not built"
    if torch.version.cuda is not None:
        # The project's machines have nvcc and a CUDA torch: the CUDA part must be in.
        assert C.with_cuda, "fastreg._C was built without its CUDA part"
        assert hasattr(C, "philox_words_cuda")
        assert C.cuda_device_count() == torch.cuda.device_count()


@pytest.mark.gpu
def test_words_cuda_backends_bit_identical():
    for backend in ("triton", "cuda"):
        for start in (0, 2**32 - 5, 2**45):
            ref = rng.words(1001, 5, 6, start=start, backend="torch")
            got = rng.words(1001, 5, 6, start=start, device="cuda", backend=backend).cpu()
            assert torch.equal(ref, got)
