"""Early stopping by Prechelt's three classes of criteria, and by patience (docs/early_stopping.md).

L. Prechelt, "Early Stopping -- But When?", in Neural Networks: Tricks of the Trade (2012).

    stop = fastreg.EarlyStopping(["gl", "up"], alpha=5.0, s=3, restore_best=True)
    for epoch in range(max_epochs):
        ...
        if stop.step(val_loss, train_loss=train_loss, model=model):
            break
    stop.stopped_epoch, stop.reason, stop.best_epoch, stop.best_value

Definitions (epochs count from 1; E_va(t), E_tr(t) are the values passed at epoch t; with
mode="max" both are negated first, so lower is always better inside):

    E_opt(t) = min_{t' <= t} E_va(t')          GL(t) = 100 (E_va(t) / E_opt(t) - 1)
    P_k(t)   = 1000 (sum_{strip} E_tr / (k min_{strip} E_tr) - 1)   at strip ends t = k, 2k, ...

    "gl"       GL(t) > alpha, checked every epoch
    "pq"       GL(t) / P_k(t) > alpha at a strip end (P_k(t) = 0: GL(t) > 0)
    "up"       E_va(t) > E_va(t - k) > ... > E_va(t - s k) at a strip end (needs s k earlier epochs)
    "patience" `patience` epochs without E_va < best - min_delta (the Keras/Lightning rule)
"""

from __future__ import annotations

import math
import numbers
import os

import torch

__all__ = ["EarlyStopping", "CRITERIA"]

CRITERIA = ("gl", "pq", "up", "patience")
_STATE_VERSION = 1


def _positive_real(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fastreg.EarlyStopping: {name} must be a real number > 0, got {v!r}")
    v = float(v)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"fastreg.EarlyStopping: {name} must be a finite number > 0, got {v}")
    return v


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"fastreg.EarlyStopping: {name} must be an int >= 1, got {v!r}")
    if v < 1:
        raise ValueError(f"fastreg.EarlyStopping: {name} must be >= 1, got {v}")
    return int(v)


def _number(v, name):
    """A float from a Python number or a one-element tensor (float() of a tensor is ~1 us)."""
    if isinstance(v, float):
        return v
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"fastreg.EarlyStopping.step: {name} must be a number or a one-element "
                             f"tensor, got a tensor of shape {tuple(v.shape)}")
        return float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fastreg.EarlyStopping.step: {name} must be a real number or a one-element "
                        f"tensor, got {type(v).__name__}")
    return float(v)


class EarlyStopping:
    """Decides after each epoch whether to stop training (criteria above).

    Args:
        criteria: "gl", "pq", "up", "patience", or a list of them.
        alpha: the threshold of "gl" and "pq" (> 0), in percent for GL.
        s: the number of successive strip-end rises "up" needs (>= 1).
        strip: k, the strip length of "pq" and "up" (>= 1, default 5).
        patience, min_delta: the rule "patience" (patience >= 1, min_delta >= 0).
        any: with several criteria, stop when one holds (True) or only when all hold at the
            same epoch (False).
        mode: "min" (lower is better) or "max" (both values are negated).
        restore_best: keep the best epoch's model.state_dict() (a CPU copy, or a file at
            checkpoint_path) and load it back into the model when step returns True. A copy
            is made only at epochs that improve on the best value.

    After a stop: stopped_epoch, reason ("gl", "gl+up", ..., or "nonfinite" when a value
    was NaN or infinite), best_epoch and best_value (as passed, mode's sign undone).
    """

    def __init__(self, criteria="gl", *, alpha=None, s=None, strip=5, patience=None,
                 min_delta=0.0, any=True, mode="min", restore_best=False,  # noqa: A002 - the issue's name
                 checkpoint_path=None):
        crit = [criteria] if isinstance(criteria, str) else criteria
        if not isinstance(crit, (list, tuple)) or not crit:
            raise ValueError("fastreg.EarlyStopping: criteria must be one of "
                             f"{list(CRITERIA)} or a non-empty list of them, got {criteria!r}")
        for c in crit:
            if c not in CRITERIA:
                raise ValueError(f"fastreg.EarlyStopping: unknown criterion {c!r} in criteria; "
                                 f"choose from {list(CRITERIA)}")
        if len(set(crit)) != len(crit):
            raise ValueError(f"fastreg.EarlyStopping: criteria lists a criterion twice: {list(crit)}")
        self.criteria = tuple(crit)
        if mode not in ("min", "max"):
            raise ValueError(f"fastreg.EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        if "gl" in crit or "pq" in crit:
            if alpha is None:
                raise ValueError("fastreg.EarlyStopping: criteria 'gl' and 'pq' need alpha (> 0)")
            alpha = _positive_real(alpha, "alpha")
        self.alpha = alpha
        self.strip = _positive_int(strip, "strip")
        if "up" in crit:
            if s is None:
                raise ValueError("fastreg.EarlyStopping: criterion 'up' needs s (an int >= 1)")
            s = _positive_int(s, "s")
        self.s = s
        if "patience" in crit:
            if patience is None:
                raise ValueError("fastreg.EarlyStopping: criterion 'patience' needs patience "
                                 "(an int >= 1)")
            patience = _positive_int(patience, "patience")
        self.patience = patience
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not (
                math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"fastreg.EarlyStopping: min_delta must be a finite number >= 0, "
                             f"got {min_delta!r}")
        self.min_delta = float(min_delta)
        if not isinstance(any, bool):
            raise TypeError(f"fastreg.EarlyStopping: any must be True or False, got {any!r}")
        self.any = any
        if not isinstance(restore_best, bool):
            raise TypeError(f"fastreg.EarlyStopping: restore_best must be True or False, "
                            f"got {restore_best!r}")
        if checkpoint_path is not None and not restore_best:
            raise ValueError("fastreg.EarlyStopping: checkpoint_path is only used with "
                             "restore_best=True")
        if checkpoint_path is not None and not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"fastreg.EarlyStopping: checkpoint_path must be a path, got "
                            f"{type(checkpoint_path).__name__}")
        self.restore_best = restore_best
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        # flags read once per step instead of searching the tuple
        self._gl = "gl" in crit
        self._pq = "pq" in crit
        self._up = "up" in crit
        self._pat = "patience" in crit
        self._ratio = self._gl or self._pq
        self._sign = -1.0 if mode == "max" else 1.0
        self.reset()

    def reset(self) -> None:
        """Forget the run (the configuration stays)."""
        self.epoch = 0
        self.stopped_epoch = None
        self.reason = None
        self.best_epoch = None
        self._opt = math.inf        # E_opt, in the internal sign
        self._pat_best = math.inf   # the patience rule's best (improvements > min_delta only)
        self._pat_wait = 0
        self._strip_sum = 0.0       # E_tr over the current strip
        self._strip_min = math.inf
        self._ends = []             # E_va at the last s + 1 strip ends ("up")
        self._best_state = None
        self.checkpoints_saved = 0  # copies of the model made (one per improvement)

    @property
    def best_value(self):
        """The best validation value so far, as passed (None before the first finite one)."""
        return None if self.best_epoch is None else self._sign * self._opt

    # ------------------------------------------------------------ the decision
    def step(self, val_loss, train_loss=None, model=None) -> bool:
        """Records epoch t's values; True when training should stop after this epoch."""
        e = _number(val_loss, "val_loss")
        tr = None if train_loss is None else _number(train_loss, "train_loss")
        if self._pq and tr is None:
            raise ValueError("fastreg.EarlyStopping.step: criterion 'pq' needs train_loss")
        if self.restore_best and model is None:
            raise ValueError("fastreg.EarlyStopping.step: restore_best=True needs model=")
        if not math.isfinite(e) or (tr is not None and not math.isfinite(tr)):
            self.epoch += 1
            return self._stop("nonfinite", model)
        # checked before any state changes, so a caller may catch the error and go on
        e *= self._sign
        if self._ratio and e <= 0.0:
            raise ValueError(f"fastreg.EarlyStopping.step: criteria 'gl' and 'pq' need val_loss > 0 "
                             f"(the ratio E_va / E_opt), got {self._sign * e} at epoch "
                             f"{self.epoch + 1}" + (" (mode='max' negates it)" if self._sign < 0 else ""))
        if self._pq:
            tr *= self._sign
            if tr <= 0.0:
                raise ValueError(f"fastreg.EarlyStopping.step: criterion 'pq' needs train_loss > 0 "
                                 f"(the training progress divides by it), got {self._sign * tr} at "
                                 f"epoch {self.epoch + 1}")
        self.epoch = t = self.epoch + 1
        if e < self._opt:
            self._opt = e
            self.best_epoch = t
            if self.restore_best:
                self._save(model)
        fired = []
        if self._gl or self._pq:
            gl = 100.0 * (e / self._opt - 1.0)
            if self._gl and gl > self.alpha:
                fired.append("gl")
        k = self.strip
        end = t % k == 0
        if self._pq:
            self._strip_sum += tr
            if tr < self._strip_min:
                self._strip_min = tr
            if end:
                p = 1000.0 * (self._strip_sum / (k * self._strip_min) - 1.0)
                if (gl > 0.0) if p <= 0.0 else (gl / p > self.alpha):
                    fired.append("pq")
                self._strip_sum, self._strip_min = 0.0, math.inf
        if self._up and end:
            ends = self._ends
            ends.append(e)
            if len(ends) > self.s + 1:
                del ends[0]
            if len(ends) == self.s + 1 and all(a < b for a, b in zip(ends, ends[1:])):
                fired.append("up")
        if self._pat:
            if e < self._pat_best - self.min_delta:
                self._pat_best = e
                self._pat_wait = 0
            else:
                self._pat_wait += 1
                if self._pat_wait >= self.patience:
                    fired.append("patience")
        if not fired or (not self.any and len(fired) < len(self.criteria)):
            return False
        return self._stop("+".join(fired), model)

    def _stop(self, reason, model):
        if self.stopped_epoch is None:
            self.stopped_epoch = self.epoch
            self.reason = reason
        if self.restore_best and self.best_epoch is not None:
            self.restore(model)
        return True

    # ------------------------------------------------------------ best weights
    def _save(self, model):
        sd = model.state_dict()
        if self.checkpoint_path is not None:
            torch.save(sd, self.checkpoint_path)
        else:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
        self.checkpoints_saved += 1

    def restore(self, model) -> None:
        """Loads the best epoch's weights into model (restore_best=True)."""
        if not self.restore_best:
            raise RuntimeError("fastreg.EarlyStopping.restore: restore_best=False keeps no weights")
        if self.best_epoch is None:
            raise RuntimeError("fastreg.EarlyStopping.restore: no epoch has been recorded yet")
        if self.checkpoint_path is not None:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        else:
            state = self._best_state
        model.load_state_dict(state)

    # ------------------------------------------------------------ resuming
    def _config(self):
        return {"criteria": list(self.criteria), "alpha": self.alpha, "s": self.s,
                "strip": self.strip, "patience": self.patience, "min_delta": self.min_delta,
                "any": self.any, "mode": self.mode, "restore_best": self.restore_best}

    def state_dict(self) -> dict:
        """Everything a resumed run needs (with restore_best in memory: the best weights)."""
        return {"version": _STATE_VERSION, "config": self._config(), "epoch": self.epoch,
                "stopped_epoch": self.stopped_epoch, "reason": self.reason,
                "best_epoch": self.best_epoch, "opt": self._opt, "pat_best": self._pat_best,
                "pat_wait": self._pat_wait, "strip_sum": self._strip_sum,
                "strip_min": self._strip_min, "ends": list(self._ends),
                "best_state": self._best_state, "checkpoints_saved": self.checkpoints_saved}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("fastreg.EarlyStopping.load_state_dict: state must come from "
                             f"EarlyStopping.state_dict() (version {_STATE_VERSION})")
        if state["config"] != self._config():
            raise ValueError("fastreg.EarlyStopping.load_state_dict: the state was saved with "
                             f"{state['config']}, this object has {self._config()}")
        self.epoch = state["epoch"]
        self.stopped_epoch = state["stopped_epoch"]
        self.reason = state["reason"]
        self.best_epoch = state["best_epoch"]
        self._opt = state["opt"]
        self._pat_best = state["pat_best"]
        self._pat_wait = state["pat_wait"]
        self._strip_sum = state["strip_sum"]
        self._strip_min = state["strip_min"]
        self._ends = list(state["ends"])
        self._best_state = state["best_state"]
        self.checkpoints_saved = state["checkpoints_saved"]

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items() if v is not None)
        return f"EarlyStopping({cfg})"
