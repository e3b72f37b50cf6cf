"""Rewrite decorated functions of the files `make mutate` mutates so that mutmut mutates them.

mutmut 3 skips every function with a decorator other than a lone @staticmethod/@classmethod:
ReversibleSGD.step (@torch.no_grad()), the custom ops' bodies (@torch.library.custom_op,
@triton_op), @functools.lru_cache helpers, properties and a backward under
@once_differentiable were never mutated, and nothing said so. In the scratch copy only
(tests/mutate.sh runs this there, never on the working tree)

    @a(...)
    @b
    def f(...): ...

becomes

    def f(...): ...
    f = a(...)(b(f))

which is what the decorator syntax means: the same object is bound to the same name, made at
the same point of the module or class body. A fake kernel, `@op.register_fake def _(...)` (one
name for several functions, which mutmut would confuse), is renamed `_fake_op` first and bound to
`_` as before. Left as they are: lone @staticmethod/@classmethod (mutmut handles them) and
functions nested in other functions (mutated, or not, with the function that holds them).

    python tests/mutate_undecorate.py fastreg/optim/reversible.py fastreg/ops/noise.py
prints each rewritten function; --check only lists them.
"""
from __future__ import annotations

import argparse
import ast
import sys

_MUTMUT_KEEPS = {"staticmethod", "classmethod"}
_SCHEMA = ("custom_op", "triton_op")  # decorators that infer a schema from the annotations


def _decorated(tree: ast.Module):
    """Module- and class-level functions mutmut would skip for their decorators."""
    bodies = [tree.body] + [n.body for n in tree.body if isinstance(n, ast.ClassDef)]
    for body in bodies:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
                continue
            decs = node.decorator_list
            if len(decs) == 1 and isinstance(decs[0], ast.Name) and decs[0].id in _MUTMUT_KEEPS:
                continue
            if node.name == "_" and _fake_of(node) is None:
                continue
            yield node


def _fake_of(node) -> str | None:
    """`op` for a lone `@op.register_fake` decorator, else None."""
    decs = node.decorator_list
    if (len(decs) == 1 and isinstance(decs[0], ast.Attribute) and decs[0].attr == "register_fake"
            and isinstance(decs[0].value, ast.Name)):
        return decs[0].value.id
    return None


def rewrite(src: str) -> tuple[str, list[str]]:
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    done = []
    # bottom to top, so that the line numbers of the functions above stay right
    for node in sorted(_decorated(tree), key=lambda n: n.lineno, reverse=True):
        indent = lines[node.lineno - 1][: node.col_offset]
        decs = [ast.get_source_segment(src, d) for d in node.decorator_list]
        name = node.name
        if name == "_":  # a fake kernel: a name of its own, `_` bound as before
            name = f"_fake{_fake_of(node)}"
            line = lines[node.lineno - 1]
            lines[node.lineno - 1] = line.replace("def _(", f"def {name}(", 1)
        wrapped = name
        for dec in reversed(decs):
            wrapped = f"{dec}({wrapped})"
        add = [f"{indent}{node.name} = {wrapped}\n"]
        if any(op in dec for dec in decs for op in _SCHEMA):
            # torch.library reads the op's schema from the annotations, strings under `from
            # __future__ import annotations`, evaluated in the globals of what it is given:
            # mutmut's wrapper, from another module. Evaluated here, in this module.
            add.insert(0, f"{indent}{node.name}.__annotations__.update("
                          f"__import__('typing').get_type_hints({node.name}))\n")
        lines[node.end_lineno:node.end_lineno] = add
        first = node.decorator_list[0].lineno
        del lines[first - 1: node.lineno - 1]
        done.append(f"{node.name} = {wrapped}")
    out = "".join(lines)
    ast.parse(out)  # the rewrite must still be Python
    return out, done[::-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--check", action="store_true", help="list the functions; change nothing")
    args = ap.parse_args(argv)
    for path in args.files:
        with open(path) as f:
            src = f.read()
        out, done = rewrite(src)
        for d in done:
            print(f"{path}: {d}")
        if not args.check and done:
            with open(path, "w") as f:
                f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
