"""Sparsifying variational dropout, then pruning (Molchanov et al., 2017).

Each VariationalDropoutLinear weight learns its own Gaussian noise level alpha; weights
whose noise dwarfs their value (log alpha >= 3) carry no information and are pruned in
eval mode. Noise is regenerated from a seed in backward: nothing per element is stored
for it. Trained here on scikit-learn's digits, with GaussianDropout on the input.

    python examples/variational_dropout_pruning.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastreg

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
perm = torch.randperm(len(y))
tr, te = perm[:1400], perm[1400:]

model = torch.nn.Sequential(
    fastreg.nn.GaussianDropout(p=0.1),  # multiplicative noise x * (1 + sigma * eps)
    fastreg.nn.VariationalDropoutLinear(64, 128, stream=1),
    torch.nn.ReLU(),
    fastreg.nn.VariationalDropoutLinear(128, 10, stream=2),
)
vd_layers = [m for m in model if isinstance(m, fastreg.nn.VariationalDropoutLinear)]
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
n_train = len(tr)


def accuracy(idx):
    model.eval()  # eval mode: no noise, pruned weights are zero
    with torch.no_grad():
        acc = (model(X[idx]).argmax(1) == y[idx]).float().mean().item()
    model.train()
    return acc


epochs = 24
for epoch in range(epochs):
    kl_weight = min(1.0, epoch / 8)  # warm up the KL term, as the paper does
    for batch in tr[torch.randperm(n_train)].split(200):
        # the data term is a sum over the training set: N * mean cross-entropy
        data = n_train * F.cross_entropy(model(X[batch]), y[batch])
        loss = (data + kl_weight * sum(m.kl() for m in vd_layers)) / n_train
        opt.zero_grad()
        loss.backward()
        opt.step()
    if epoch % 8 == 7:
        sparsity = [round(m.sparsity(), 3) for m in vd_layers]
        print(f"epoch {epoch + 1}: test accuracy {accuracy(te):.3f}, pruned per layer {sparsity}")

kept = sum(int(m.mask().sum()) for m in vd_layers)
total = sum(m.weight.numel() for m in vd_layers)
print(f"after pruning: {kept} of {total} weights kept ({100 * (1 - kept / total):.1f}% pruned), "
      f"test accuracy {accuracy(te):.3f}")
