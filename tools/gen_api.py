"""Generates docs/api.md, the API reference, from the docstrings of fastreg's public names.

Usage: python tools/gen_api.py [--check]
--check exits 1 (and writes nothing) when docs/api.md differs from what it would write.

The public API is what NAMESPACES lists: each namespace's `__all__` where it has one, else
its functions and classes without a leading underscore that it (or a submodule)
defines. Classes get their constructor's signature and the public methods they define.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "api.md")

# (namespace, what lives there); the order of the reference
NAMESPACES = [
    ("fastreg", "Tensor ops, one call each, and training utilities"),
    ("fastreg.nn", "Modules (drop-in `torch.nn` layers) and model helpers"),
    ("fastreg.optim", "Optimizers"),
    ("fastreg.penalty", "Penalties over a whole parameter list"),
    ("fastreg.adversarial", "Adversarial perturbation steps"),
    ("fastreg.rng", "The counter-based random numbers every op draws from"),
]

PATTERN = """\
## Where each family's public functions live

One pattern: a call on a tensor is `fastreg.<op>`; a `torch.nn` module is
`fastreg.nn.<Name>`; an optimizer is `fastreg.optim.<Name>`; a family whose calls work on a
whole parameter list, or that needs several related calls, has its own namespace
`fastreg.<family>.<name>` (penalty, adversarial, rng). The implementation of an op lives in
`fastreg/ops/<family>.py` (with `kernels/numba/<family>.py` and `kernels/triton/<family>.py`);
its module in `fastreg/nn/<family>.py`.

| family | functions | modules | implementation |
| --- | --- | --- | --- |
| dropout | `fastreg.dropout`, `fastreg.dropout_add` | `fastreg.nn.Dropout`, `fastreg.nn.replace_dropout` | fastreg/ops/dropout.py |
| noise | `fastreg.gaussian_dropout`, `fastreg.multiplicative_noise`, `fastreg.input_noise` | `fastreg.nn.GaussianDropout`, `fastreg.nn.MultiplicativeNoise` | fastreg/ops/noise.py |
| locked / DropConnect | `fastreg.locked_dropout`, `fastreg.dropconnect_linear` | `fastreg.nn.LockedDropout`, `fastreg.nn.DropConnectLinear` | fastreg/ops/locked.py |
| bias-act | `fastreg.bias_act_dropout` | — | fastreg/ops/bias_act.py |
| variational | — | `fastreg.nn.VariationalDropoutLinear` | fastreg/ops/variational.py, fastreg/nn/variational.py |
| penalty | `fastreg.penalty.*`, `fastreg.activity_penalty` | `fastreg.nn.ActivityPenalty` | fastreg/penalty.py, fastreg/ops/penalty.py |
| adversarial | `fastreg.adversarial.fgsm`, `fastreg.adversarial.pgd_step` | — | fastreg/ops/adversarial.py |
| reversible | — | `fastreg.optim.ReversibleSGD` | fastreg/optim/reversible.py, fastreg/ops/reversible.py |
| early stopping | `fastreg.EarlyStopping` | — | fastreg/early_stopping.py |
| random numbers | `fastreg.rng.*` | — | fastreg/ops/rng.py |
"""

_ADDR = re.compile(r" at 0x[0-9a-f]+")


def _import_fastreg():
    sys.path.insert(0, ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing native part warns; the API is the same
        return importlib.import_module("fastreg")


def _resolve(path: str):
    mod = _import_fastreg()
    for part in path.split(".")[1:]:
        mod = getattr(mod, part)
    return mod


def public_names(ns) -> list[str]:
    names = getattr(ns, "__all__", None)
    if names is None:
        names = [n for n, v in vars(ns).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v))
                 and (getattr(v, "__module__", "") or "").startswith(ns.__name__)]
    return [n for n in names if not inspect.ismodule(getattr(ns, n)) and not n.startswith("__")
            and (inspect.isfunction(getattr(ns, n)) or inspect.isclass(getattr(ns, n))
                 or callable(getattr(ns, n)))]


def public_objects() -> list[tuple[str, object]]:
    """(qualified name, object) of every public function and class, in reference order."""
    out = []
    for path, _ in NAMESPACES:
        ns = _resolve(path)
        for n in public_names(ns):
            out.append((f"{path}.{n}", getattr(ns, n)))
    return out


def own_doc(obj) -> str | None:
    """The object's own docstring (a class's, not one it inherits)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if doc and doc.strip() else None


class _Ann:
    """A string annotation (postponed evaluation) that prints without quotes."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _unquote(sig: inspect.Signature) -> inspect.Signature:
    def fix(a):
        return _Ann(a) if isinstance(a, str) else a

    params = [p.replace(annotation=fix(p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=fix(sig.return_annotation))


def signature(obj) -> str:
    try:
        target = obj.__init__ if inspect.isclass(obj) else obj
        sig = inspect.signature(target)
        if inspect.isclass(obj):
            params = list(sig.parameters.values())[1:]  # drop self
            sig = sig.replace(parameters=params)
        return _ADDR.sub("", str(_unquote(sig)))
    except (TypeError, ValueError):
        return "(...)"


def _methods(cls) -> list[tuple[str, object]]:
    out = []
    for n, v in cls.__dict__.items():
        if n.startswith("_") or n in ("forward", "extra_repr"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if inspect.isfunction(v):
            out.append((n, v))
        elif isinstance(v, property):
            out.append((n, v))
    return out


def render() -> str:
    fr = _import_fastreg()
    parts = ["# API reference\n",
             "Generated by `tools/gen_api.py` from the docstrings (`make docs`); edit the "
             "docstrings, not this file. fastreg " + fr.__version__ + ".\n", PATTERN]
    for path, title in NAMESPACES:
        ns = _resolve(path)
        parts.append(f"## `{path}`: {title}\n")
        for n in public_names(ns):
            obj = getattr(ns, n)
            kind = "class" if inspect.isclass(obj) else "function"
            parts.append(f"### `{path}.{n}{signature(obj)}`\n")
            parts.append(f"*{kind}*" + (f", defined in `{obj.__module__}`"
                                       if getattr(obj, "__module__", None) else "") + "\n")
            parts.append((own_doc(obj) or "(no docstring)") + "\n")
            if inspect.isclass(obj):
                for mn, m in _methods(obj):
                    if isinstance(m, property):
                        d = own_doc(m.fget) if m.fget else None
                        first = f": {d.splitlines()[0]}" if d else ""
                        parts.append(f"- `{mn}` (property){first}")
                    else:
                        d = own_doc(m)
                        sig = signature(m)
                        sig = re.sub(r"^\(self(, )?", "(", sig)
                        parts.append(f"- `{mn}{sig}`" + (f": {d.splitlines()[0]}" if d else ""))
                if _methods(obj):
                    parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        with open(OUT) as f:
            same = f.read() == text
        if not same:
            print("docs/api.md is out of date: run `make docs` (python tools/gen_api.py)")
        return 0 if same else 1
    with open(OUT, "w") as f:
        f.write(text)
    print("docs/api.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
