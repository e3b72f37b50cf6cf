"""The API reference: every public name has a docstring, and docs/api.md is what
tools/gen_api.py writes from them."""

from __future__ import annotations

import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gen_api  # noqa: E402


def test_every_public_name_has_a_docstring():
    objs = gen_api.public_objects()
    names = {n for n, _ in objs}
    # the families' entry points are all there (a namespace that lost its exports shows here)
    for expected in ("fastreg.dropout", "fastreg.nn.Dropout", "fastreg.optim.ReversibleSGD",
                     "fastreg.penalty.accumulate_", "fastreg.adversarial.fgsm", "fastreg.rng.words",
                     "fastreg.EarlyStopping", "fastreg.nn.replace_dropout"):
        assert expected in names
    missing = [n for n, o in objs if gen_api.own_doc(o) is None]
    assert missing == [], f"public names without a docstring: {missing}"


def test_a_class_does_not_borrow_its_base_docstring():
    class Base:
        """Documented."""

    class Child(Base):
        pass

    def bare():
        pass

    assert gen_api.own_doc(Base) == "Documented."
    assert gen_api.own_doc(Child) is None and gen_api.own_doc(bare) is None


def test_namespace_without_all_lists_only_what_it_defines():
    from fastreg import rng

    names = gen_api.public_names(rng)
    assert "words" in names and "normals" in names
    assert "check_stream" not in names  # imported from fastreg._seed, not part of rng
    assert all(inspect.getmodule(getattr(rng, n)).__name__.startswith(rng.__name__) for n in names)


def test_api_md_is_up_to_date():
    with open(gen_api.OUT) as f:
        assert f.read() == gen_api.render(), "docs/api.md is stale: run `make docs`"
