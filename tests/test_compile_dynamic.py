"""torch.compile(fullgraph=True, dynamic=True) with the ops' float arguments passed into the
compiled function: dynamo then traces them as symbolic floats, and every validation on the
way to the custom op must trace (comparisons do; math.isfinite did not), with the compiled
result equal to the eager one for each value."""

import pytest
import torch

from fastreg.ops import adversarial as A
from fastreg.ops import dropout as D
from fastreg.ops import noise as N
from fastreg.ops import variational as V

G = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
CASES = {
    "dropout": lambda x, f: D.dropout(x, f, seed=3),
    "dropout_add": lambda x, f: D.dropout_add(x, x * 2, f, seed=3),
    "gaussian_dropout": lambda x, f: N.gaussian_dropout(x, f, seed=3),
    "multiplicative_noise": lambda x, f: N.multiplicative_noise(x, f, seed=3),
    "input_noise": lambda x, f: N.input_noise(x, f, seed=3),
    "vd_sample": lambda x, f: V.vd_sample(x, x.detach().abs(), seed=3, eps=f),
    "fgsm": lambda x, f: A.fgsm(x.detach(), G, f),
    "pgd_step": lambda x, f: A.pgd_step(x.detach(), x.detach() * 0.5, G, f, f / 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float_arguments_trace_under_dynamic_shapes(name):
    torch._dynamo.reset()
    fn = CASES[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for f in (0.25, 0.375):  # the second value reuses the symbolic graph
        got, want = compiled(x, f), fn(x, f)
        assert torch.equal(got, want), (name, f)
        if want.requires_grad:
            (gx, ), (wx, ) = torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x)
            assert torch.equal(gx, wx), (name, f)
