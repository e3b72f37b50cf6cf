"""fastreg.nn.replace_dropout on a torch.nn.TransformerEncoder model: every torch.nn.Dropout
is swapped (p, inplace, training flag kept), other dropout kinds are left, training runs,
and torch.compile(fullgraph=True) compiles the swapped model."""

import pytest
import torch
from torch import nn

import fastreg
from fastreg.nn import replace_dropout


class Tagger(nn.Module):
    """A small encoder classifier with dropout at every level torch puts one."""

    def __init__(self, d=16, layers=2, p=0.25):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.drop_in = nn.Dropout(p)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=p, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.feature_drop = nn.Dropout1d(0.5)  # another kind: left as it is
        self.alpha = nn.AlphaDropout(0.1)      # left as it is
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.encoder(self.drop_in(self.embed(x)))
        return self.head(self.alpha(h.mean(1)))


def torch_dropouts(model):
    return [m for m in model.modules() if type(m) is nn.Dropout]


def test_swaps_every_dropout_and_keeps_its_settings():
    torch.manual_seed(0)
    model = Tagger()
    # TransformerEncoderLayer holds dropout, dropout1, dropout2 per layer, plus drop_in
    before = {name: (m.p, m.inplace) for name, m in model.named_modules() if type(m) is nn.Dropout}
    assert len(before) == 1 + 3 * 2
    model.encoder.layers[1].dropout1.inplace = True
    before["encoder.layers.1.dropout1"] = (0.25, True)
    model.encoder.layers[0].dropout2.eval()  # a module with its own training flag
    n = replace_dropout(model, mask="bits")
    assert n == len(before)
    assert torch_dropouts(model) == []
    after = dict(model.named_modules())
    for name, (p, inplace) in before.items():
        m = after[name]
        assert isinstance(m, fastreg.nn.Dropout) and (m.p, m.inplace, m.mask) == (p, inplace, "bits")
    assert after["encoder.layers.0.dropout2"].training is False
    assert after["encoder.layers.1.dropout2"].training is True
    assert type(model.feature_drop) is nn.Dropout1d and type(model.alpha) is nn.AlphaDropout
    assert replace_dropout(model) == 0  # nothing left to swap


def test_shared_module_stays_shared():
    d = nn.Dropout(0.3)
    model = nn.Sequential(nn.Linear(4, 4), d, nn.Linear(4, 4), d)
    assert replace_dropout(model) == 1
    assert model[1] is model[3] and isinstance(model[1], fastreg.nn.Dropout)


def test_refuses_a_non_module():
    with pytest.raises(TypeError, match="model"):
        replace_dropout([nn.Dropout()])


def test_training_runs_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = Tagger()
    replace_dropout(model)
    x = torch.randn(32, 5, 8)
    y = x[:, :, :3].mean(1).argmax(1)  # a learnable rule
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    model.train()
    assert not torch.equal(model(x), model(x))  # the swapped dropouts draw fresh masks
    model.eval()
    assert torch.equal(model(x), model(x))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = Tagger()
    assert replace_dropout(model) == 7
    x = torch.randn(4, 5, 8)
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    model.train()
    out = compiled(x)
    out.sum().backward()
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()
