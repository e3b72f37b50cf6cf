"""A small transformer on the CPU with fastreg dropout, penalties and early stopping.

Each 8x8 digit from scikit-learn is read as a sequence of 8 rows. The model is plain
torch.nn; one call swaps its torch.nn.Dropout layers for fastreg's (same p, no mask
saved for backward), fastreg.penalty adds L1 and L2 gradients over every parameter in
one fused pass, and fastreg.EarlyStopping stops on Prechelt's generalisation-loss
criterion and puts the best epoch's weights back.

    python examples/transformer_early_stopping.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastreg

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 8, 8)  # (batch, rows, pixels)
y = torch.tensor(y)
perm = torch.randperm(len(y))
tr, va, te = perm[:1100], perm[1100:1450], perm[1450:]


class RowTransformer(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.embed = torch.nn.Linear(8, d)
        self.pos = torch.nn.Parameter(torch.zeros(8, d))
        layer = torch.nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.1,
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


model = RowTransformer()
swapped = fastreg.nn.replace_dropout(model)  # every torch.nn.Dropout -> fastreg.nn.Dropout
print(f"replaced {swapped} torch.nn.Dropout modules with fastreg.nn.Dropout")

opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
# Stop at the first epoch whose validation loss is more than 5% above the best so far
# (GL > alpha), or after 6 epochs without improvement; then restore the best weights.
stop = fastreg.EarlyStopping(["gl", "patience"], alpha=5.0, patience=6, restore_best=True)


def evaluate(idx):
    model.eval()
    with torch.no_grad():
        out = model(X[idx])
        loss, acc = F.cross_entropy(out, y[idx]).item(), (out.argmax(1) == y[idx]).float().mean()
    model.train()
    return loss, acc.item()


for epoch in range(1, 31):
    total = 0.0
    for batch in tr[torch.randperm(len(tr))].split(256):
        opt.zero_grad()
        loss = F.cross_entropy(model(X[batch]), y[batch])
        loss.backward()
        # grads += d/dw (l1 |w|_1 + l2 |w|^2) over all parameters, one fused kernel call
        fastreg.penalty.accumulate_(model.parameters(), l1=1e-5, l2=1e-4)
        opt.step()
        total += loss.item() * len(batch)
    val_loss, val_acc = evaluate(va)
    print(f"epoch {epoch:2d}: train loss {total / len(tr):.4f}  val loss {val_loss:.4f}  "
          f"val acc {val_acc:.3f}")
    if stop.step(val_loss, train_loss=total / len(tr), model=model):
        break

print(f"stopped at epoch {stop.stopped_epoch} ({stop.reason}); best epoch {stop.best_epoch} "
      f"with val loss {stop.best_value:.4f}, restored")
test_loss, test_acc = evaluate(te)
print(f"test accuracy with the restored weights: {test_acc:.3f}")
