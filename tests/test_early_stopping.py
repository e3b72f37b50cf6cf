"""fastreg.EarlyStopping: Prechelt's GL, PQ and UP criteria and patience, against sequences
computed by hand (ties, plateaus, first strips), against a from-the-definitions oracle on
random sequences, restore_best (in memory and to a file), resuming, and every bad argument."""

import math
import random

import pytest
import torch

import fastreg
from fastreg import EarlyStopping


def run(stop, vals, trs=None, model=None):
    """The epoch at which stop.step first returns True (None if never)."""
    for t, v in enumerate(vals):
        tr = None if trs is None else trs[t]
        if stop.step(v, train_loss=tr, model=model):
            return t + 1
    return None


# ------------------------------------------------------------ hand-computed sequences
def test_gl_fires_at_first_epoch_above_alpha():
    # E_opt = 0.9 from epoch 2; GL(3) = 2.2, GL(4) = 5.6 > 5
    stop = EarlyStopping("gl", alpha=5.0)
    assert run(stop, [1.0, 0.9, 0.92, 0.95, 0.94]) == 4
    assert (stop.stopped_epoch, stop.reason, stop.best_epoch, stop.best_value) == (4, "gl", 2, 0.9)


def test_gl_is_strict_and_ties_keep_the_first_best():
    # 0.5625 / 0.5 = 1.125 exactly: GL = 12.5 = alpha does not fire, 0.5626 does
    stop = EarlyStopping("gl", alpha=12.5)
    assert run(stop, [0.5, 0.5, 0.5625, 0.5625, 0.5626]) == 5
    assert stop.best_epoch == 1  # the tie at epoch 2 is not an improvement
    plateau = EarlyStopping("gl", alpha=0.001)
    assert run(plateau, [2.0] * 50) is None and plateau.best_epoch == 1


def test_gl_can_fire_at_epoch_two():
    stop = EarlyStopping("gl", alpha=1.0)
    assert run(stop, [1.0, 1.02]) == 2


def test_pq_strip_ends_and_zero_progress():
    # k = 2. Strip 1: P = 1000 (3 / (2 * 1) - 1) = 500, GL(2) = 0. Strip 2: P = 0, GL(4) = 0:
    # no stop. Epoch 7 has a huge GL but is no strip end. Strip 4: P = 0 and GL(8) = 1.25 > 0.
    tr = [2.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    va = [1.0, 0.8, 0.9, 0.8, 0.8, 0.88, 2.0, 0.81]
    stop = EarlyStopping("pq", alpha=1.0, strip=2)
    assert run(stop, va, tr) == 8
    assert stop.reason == "pq" and stop.best_epoch == 2


def test_pq_ratio_threshold():
    # k = 2: strip 2 has P = 1000 (2.02 / 2 - 1) = 10 and GL(4) = 100 (0.84 / 0.8 - 1) = 5: ratio 0.5
    tr = [1.1, 1.0, 1.02, 1.0]
    va = [1.0, 0.8, 0.85, 0.84]
    assert run(EarlyStopping("pq", alpha=0.4, strip=2), va, tr) == 4
    assert run(EarlyStopping("pq", alpha=0.6, strip=2), va, tr) is None


def test_pq_first_strip():
    # k = 3: P(3) = 1000 (6 / 3 - 1) = 1000, GL(3) = 300: ratio 0.3
    assert run(EarlyStopping("pq", alpha=0.2, strip=3), [1.0, 0.5, 2.0], [3.0, 2.0, 1.0]) == 3
    assert run(EarlyStopping("pq", alpha=0.3, strip=3), [1.0, 0.5, 2.0], [3.0, 2.0, 1.0]) is None


def test_up_needs_s_strips_of_rises():
    big = 100.0  # the epochs between strip ends do not count
    # k = 2, s = 1: E(4) > E(2) fires at 4, not at the first strip end 2
    assert run(EarlyStopping("up", s=1, strip=2), [big, 1.0, big, 1.1]) == 4
    # s = 2: E(6) > E(4) > E(2)
    assert run(EarlyStopping("up", s=2, strip=2), [big, 1.0, big, 1.1, big, 1.2]) == 6
    # a plateau breaks the chain: E(4) = E(2), so only E(8) > E(6) > E(4) fires
    assert run(EarlyStopping("up", s=2, strip=2),
               [big, 1.0, big, 1.0, big, 1.1, big, 1.2]) == 8
    # a fall in between restarts it
    assert run(EarlyStopping("up", s=2, strip=1), [1.0, 1.1, 1.05, 1.2, 1.3]) == 5


def test_patience_with_min_delta():
    # improvements need E < best - 0.1: epochs 1 and 3 improve, then 4, 5, 6 wait
    stop = EarlyStopping("patience", patience=3, min_delta=0.1)
    assert run(stop, [1.0, 0.95, 0.85, 0.8, 0.79, 0.78, 0.7]) == 6
    assert stop.reason == "patience" and stop.best_epoch == 6 and stop.best_value == 0.78
    # a plateau counts as no improvement
    assert run(EarlyStopping("patience", patience=3), [1.0, 1.0, 1.0, 1.0]) == 4


def test_mode_max():
    stop = EarlyStopping("patience", patience=2, mode="max")
    assert run(stop, [0.5, 0.6, 0.6, 0.55]) == 4
    assert stop.best_epoch == 2 and stop.best_value == 0.6
    # "up" on negated accuracies: falls of accuracy are rises of the error
    assert run(EarlyStopping("up", s=2, strip=1, mode="max"), [0.9, 0.8, 0.7]) == 3


def test_any_and_all():
    # k = 2, s = 1: GL fires alone at epoch 3 (no strip end); GL and UP both hold at 4
    va = [1.0, 1.0, 1.1, 1.2]
    one = EarlyStopping(["gl", "up"], alpha=5.0, s=1, strip=2)
    assert run(one, va) == 3 and one.reason == "gl"
    both = EarlyStopping(["gl", "up"], alpha=5.0, s=1, strip=2, any=False)
    assert run(both, va) == 4 and both.reason == "gl+up"
    # any=True names every criterion that holds at the stop
    many = EarlyStopping(["gl", "up", "patience"], alpha=5.0, s=1, strip=2, patience=1)
    assert run(many, [1.0, 1.0]) == 2 and many.reason == "patience"
    many = EarlyStopping(["gl", "up", "patience"], alpha=5.0, s=1, strip=1, patience=1)
    assert run(many, [1.0, 1.2]) == 2 and many.reason == "gl+up+patience"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_stops_at_once(bad):
    stop = EarlyStopping("patience", patience=100)
    assert run(stop, [1.0, 0.9, bad, 0.5]) == 3
    assert stop.reason == "nonfinite" and stop.best_epoch == 2
    stop = EarlyStopping("pq", alpha=100.0)
    assert run(stop, [1.0, 0.9, 0.8], [1.0, bad, 1.0]) == 2 and stop.reason == "nonfinite"


def test_tensor_values():
    stop = EarlyStopping("gl", alpha=5.0)
    assert not stop.step(torch.tensor(1.0))
    assert stop.step(torch.tensor([1.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="val_loss"):
        EarlyStopping("gl", alpha=5.0).step(torch.ones(2))
    with pytest.raises(TypeError, match="val_loss"):
        EarlyStopping("gl", alpha=5.0).step("1.0")


# ------------------------------------------------------------ oracle on random sequences
def oracle(criteria, va, tr, alpha, s, k, patience, min_delta, any_):
    """The stop epoch from the definitions, recomputed from the whole history every epoch."""
    pbest, wait = math.inf, 0
    for t in range(1, len(va) + 1):
        e = va[t - 1]
        gl = 100 * (e / min(va[:t]) - 1)
        fired = set()
        if gl > alpha:
            fired.add("gl")
        if t % k == 0:
            strip = tr[t - k:t]
            p = 1000 * (sum(strip) / (k * min(strip)) - 1)
            if (gl > 0) if p == 0 else (gl / p > alpha):
                fired.add("pq")
            if t - s * k >= 1 and all(va[t - 1 - i * k] > va[t - 1 - (i + 1) * k] for i in range(s)):
                fired.add("up")
        if e < pbest - min_delta:
            pbest, wait = e, 0
        else:
            wait += 1
            if wait >= patience:
                fired.add("patience")
        fired &= set(criteria)
        if fired and (any_ or fired == set(criteria)):
            return t
    return None


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_definitions_on_random_sequences(seed):
    rng = random.Random(seed)
    for _ in range(150):
        n = rng.randint(1, 40)
        # few levels, so ties and plateaus are common
        va = [rng.choice([0.5, 0.6, 0.7, 0.75, 0.8, 1.0]) for _ in range(n)]
        tr = [rng.choice([0.25, 0.3, 0.5]) for _ in range(n)]
        crit = rng.sample(["gl", "pq", "up", "patience"], rng.randint(1, 3))
        kw = dict(alpha=rng.choice([0.5, 5.0, 20.0, 40.0]), s=rng.randint(1, 3), strip=rng.randint(1, 4),
                  patience=rng.randint(1, 5), min_delta=rng.choice([0.0, 0.05]), any=rng.random() < 0.6)
        want = oracle(crit, va, tr, kw["alpha"], kw["s"], kw["strip"], kw["patience"], kw["min_delta"],
                      kw["any"])
        stop = EarlyStopping(crit, **kw)
        assert run(stop, va, tr) == want, (crit, kw, va, tr)


# ------------------------------------------------------------ restore_best
class Counted(torch.nn.Linear):
    """Counts state_dict() calls: each is one copy of the weights."""

    copies = 0

    def state_dict(self, *a, **k):
        Counted.copies += 1
        return super().state_dict(*a, **k)


def _train_fake(stop, model, vals):
    """Epoch t sets every weight to t, then steps: the weights name their epoch."""
    for t, v in enumerate(vals, 1):
        with torch.no_grad():
            model.weight.fill_(t)
            model.bias.fill_(-t)
        if stop.step(v, model=model):
            return t
    return None


def test_restore_best_in_memory_copies_only_on_improvement():
    model = Counted(3, 2)
    Counted.copies = 0
    stop = EarlyStopping("gl", alpha=50.0, restore_best=True)
    vals = [3.0, 2.0, 2.0, 1.0, 1.0, 1.4, 0.999999, 1.7]  # improvements at 1, 2, 4, 7
    assert _train_fake(stop, model, vals) == 8
    assert Counted.copies == 4 and stop.checkpoints_saved == 4
    assert stop.best_epoch == 7
    assert torch.equal(model.weight, torch.full((2, 3), 7.0)) and torch.equal(model.bias, torch.full((2,), -7.0))
    # the copy is a copy: later changes to the model do not reach it
    with torch.no_grad():
        model.weight.fill_(100.0)
    stop.restore(model)
    assert torch.equal(model.weight, torch.full((2, 3), 7.0))


def test_restore_best_to_a_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (saves.append(f), real_save(obj, f, *a, **k)))
    model = torch.nn.Linear(3, 2)
    stop = EarlyStopping("patience", patience=2, restore_best=True, checkpoint_path=path)
    assert _train_fake(stop, model, [2.0, 1.0, 1.5, 1.5]) == 4
    assert saves == [str(path)] * 2 and stop._best_state is None
    assert torch.equal(model.weight, torch.full((2, 3), 2.0))
    with torch.no_grad():
        model.weight.zero_()
    stop.restore(model)
    assert torch.equal(model.weight, torch.full((2, 3), 2.0))


def test_restore_on_nonfinite_stop():
    model = torch.nn.Linear(3, 2)
    stop = EarlyStopping("gl", alpha=5.0, restore_best=True)
    assert _train_fake(stop, model, [1.0, 0.5, math.nan]) == 3
    assert stop.reason == "nonfinite" and torch.equal(model.bias, torch.full((2,), -2.0))


def test_restore_errors():
    with pytest.raises(RuntimeError, match="restore_best"):
        EarlyStopping("gl", alpha=1.0).restore(torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="no epoch"):
        EarlyStopping("gl", alpha=1.0, restore_best=True).restore(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="model"):
        EarlyStopping("gl", alpha=1.0, restore_best=True).step(1.0)


# ------------------------------------------------------------ resuming
@pytest.mark.parametrize("cut", [1, 3, 6, 7])
def test_state_dict_resumes_the_same_run(cut, tmp_path):
    kw = dict(alpha=30.0, s=2, strip=3, patience=8, restore_best=True)
    crit = ["pq", "up", "patience"]
    model = torch.nn.Linear(2, 2)
    for seed in range(100):  # the first sequence whose stop comes after the cut
        rng = random.Random(seed)
        va = [rng.choice([0.5, 0.6, 0.7, 0.8]) for _ in range(40)]
        tr = [rng.choice([0.2, 0.3]) for _ in range(40)]
        whole = EarlyStopping(crit, **kw)
        want = run(whole, va, tr, model)
        if want is not None and want > cut + 2:
            break
    assert want is not None and want > cut + 2
    first = EarlyStopping(crit, **kw)
    for t in range(cut):
        assert not first.step(va[t], train_loss=tr[t], model=model)
    torch.save(first.state_dict(), tmp_path / "s.pt")
    second = EarlyStopping(crit, **kw)
    second.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    got = None
    for t in range(cut, 40):
        if second.step(va[t], train_loss=tr[t], model=model):
            got = t + 1
            break
    assert got == want
    assert (second.reason, second.best_epoch, second.best_value) == (whole.reason, whole.best_epoch,
                                                                     whole.best_value)


def test_load_state_dict_refuses_another_configuration():
    a = EarlyStopping("gl", alpha=5.0)
    a.step(1.0)
    with pytest.raises(ValueError, match="alpha"):
        EarlyStopping("gl", alpha=3.0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        EarlyStopping("gl", alpha=5.0).load_state_dict({"epoch": 3})


# ------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(criteria="gll", alpha=1.0), ValueError, "unknown criterion 'gll'"),
    (dict(criteria=["gl", "nope"], alpha=1.0), ValueError, "unknown criterion 'nope'"),
    (dict(criteria=[]), ValueError, "criteria"),
    (dict(criteria=["gl", "gl"], alpha=1.0), ValueError, "twice"),
    (dict(criteria="gl"), ValueError, "need alpha"),
    (dict(criteria="pq"), ValueError, "need alpha"),
    (dict(criteria="gl", alpha=0.0), ValueError, "alpha"),
    (dict(criteria="pq", alpha=-1.0), ValueError, "alpha"),
    (dict(criteria="gl", alpha=math.nan), ValueError, "alpha"),
    (dict(criteria="gl", alpha="5"), TypeError, "alpha"),
    (dict(criteria="up"), ValueError, "needs s"),
    (dict(criteria="up", s=0), ValueError, "s must be >= 1"),
    (dict(criteria="up", s=1.5), TypeError, "s must be an int"),
    (dict(criteria="up", s=1, strip=0), ValueError, "strip"),
    (dict(criteria="gl", alpha=1.0, strip=-2), ValueError, "strip"),
    (dict(criteria="patience"), ValueError, "needs patience"),
    (dict(criteria="patience", patience=0), ValueError, "patience"),
    (dict(criteria="patience", patience=2, min_delta=-0.1), ValueError, "min_delta"),
    (dict(criteria="gl", alpha=1.0, mode="minimum"), ValueError, "mode"),
    (dict(criteria="gl", alpha=1.0, any="yes"), TypeError, "any"),
    (dict(criteria="gl", alpha=1.0, checkpoint_path="x.pt"), ValueError, "checkpoint_path"),
    (dict(criteria="gl", alpha=1.0, restore_best=1), TypeError, "restore_best"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        EarlyStopping(kwargs.pop("criteria"), **kwargs)


@pytest.mark.parametrize("crit", ["gl", "pq"])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_ratio_criteria_need_positive_errors(crit, bad):
    stop = EarlyStopping(crit, alpha=5.0)
    stop.step(1.0, train_loss=1.0)
    with pytest.raises(ValueError, match="val_loss > 0"):
        stop.step(bad, train_loss=1.0)
    assert stop.epoch == 1  # refused before any state changed
    # with mode="max" positive values become negative errors
    with pytest.raises(ValueError, match="mode='max'"):
        EarlyStopping(crit, alpha=5.0, mode="max").step(0.9, train_loss=1.0)


def test_pq_needs_train_loss():
    with pytest.raises(ValueError, match="'pq' needs train_loss"):
        EarlyStopping("pq", alpha=1.0).step(1.0)
    with pytest.raises(ValueError, match="train_loss > 0"):
        EarlyStopping("pq", alpha=1.0).step(1.0, train_loss=0.0)
    # other criteria do not need positive values
    assert EarlyStopping("up", s=1, strip=1).step(-1.0) is False
    assert EarlyStopping("patience", patience=1).step(0.0) is False


def test_exported():
    assert fastreg.EarlyStopping is EarlyStopping and "EarlyStopping" in fastreg.__all__
