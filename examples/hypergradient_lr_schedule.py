"""Hypergradients of a learning-rate schedule with exact reversible SGD.

ReversibleSGD trains in fixed point and keeps the bits momentum decay would destroy,
so `reverse()` can run training backwards bit for bit and return d(validation loss) /
d(learning rate at every step) without storing the trajectory. Here: a per-step
schedule for logistic regression on scikit-learn's digits, improved by a few steps of
gradient descent on the schedule itself.

    python examples/hypergradient_lr_schedule.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastreg

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float64)  # float64 parameters: the exact grid
y = torch.tensor(y)
Xtr, ytr, Xva, yva = X[:1000], y[:1000], X[1000:1400], y[1000:1400]

T = 30  # training steps per run
# One learning rate per step (a leaf tensor: reverse() accumulates into its .grad).
lr = torch.full((T,), 0.3, dtype=torch.float64, requires_grad=True)


def train_and_reverse():
    """One training run with the current schedule, then reverse() for the hypergradient."""
    torch.manual_seed(1)  # the same initial weights every run
    model = torch.nn.Linear(64, 10).double()
    opt = fastreg.optim.ReversibleSGD(model.parameters(), lr=lr, momentum=0.9)

    def train_loss(t):  # full-batch here; with minibatches, step t must see batch t again
        return F.cross_entropy(model(Xtr), ytr)

    for t in range(T):
        opt.zero_grad()
        train_loss(t).backward()
        opt.step()
    lr.grad = None
    # Backwards through all T steps: d val_loss / d lr_t for every t lands in lr.grad.
    val = opt.reverse(lambda: F.cross_entropy(model(Xva), yva), train_loss, inputs=[lr])
    return val.item()


for meta_step in range(5):
    val = train_and_reverse()
    g = lr.grad * lr.detach()  # d val / d log(lr_t): step sizes change multiplicatively
    print(f"meta-step {meta_step}: validation loss {val:.4f}  |d val / d log lr| = {g.norm():.3g}")
    with torch.no_grad():
        lr *= torch.exp(-0.5 * g / (g.abs().max() + 1e-12))  # a normalised step in log space

print("learned schedule, lr at steps 0, 10, 20, 29:",
      " ".join(f"{v:.3f}" for v in lr[[0, 10, 20, 29]].tolist()))
