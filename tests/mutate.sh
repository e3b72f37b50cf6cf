#!/usr/bin/env bash
# Mutation testing (mutmut 3) of some of fastreg's Python files against the tests that cover them.
#
#   tests/mutate.sh "fastreg/penalty.py" "tests/test_penalty.py tests/test_penalty_gaps.py" [-k expr]
#   MUTANTS='fastreg.penalty.x_accumulate_* fastreg.penalty.x__onepass*' tests/mutate.sh ...
#     (only the mutants whose names match these globs: mutmut's names, `mutmut results`;
#     named mutants are run again even when they have a result, so this also re-checks survivors)
#
# mutmut rewrites the files it mutates, so it runs on a scratch copy of the tree
# (build/mutate/<name>/, kept between runs: mutmut resumes where it stopped), never on the
# working tree. The copy holds fastreg/ with kernels/ inside it (the editable install maps
# fastreg.kernels to the working tree's kernels/; in the copy it is found next to the mutants)
# and the native extension already built. Results: `mutmut results` / `mutmut show NAME` in
# that folder; survivors are listed at the end. Low priority (nice): the machine is shared.
set -euo pipefail
FILES=${1:?files to mutate, e.g. fastreg/penalty.py}
TESTS=${2:?tests to run, e.g. tests/test_penalty.py}
shift 2
EXTRA=("$@")  # further pytest arguments (a -k selection of the fast tests)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
NAME=$(echo "$FILES" | tr ' /' '__' | sed 's/\.py//g')
WORK=${MUTATE_DIR:-$ROOT/build/mutate}/$NAME
mkdir -p "$WORK"
cd "$WORK"
# the tree as it is now (mutants/ is rebuilt from it when a source file changed)
rm -rf fastreg tests bench
cp -r "$ROOT/fastreg" fastreg
rm -rf fastreg/kernels && cp -r "$ROOT/kernels" fastreg/kernels
cp -r "$ROOT/tests" tests
mkdir bench && cp "$ROOT"/bench/*.py bench/  # some tests use bench/_util.py
cp "$ROOT/pyproject.toml" .
find fastreg tests -name __pycache__ -prune -exec rm -rf {} +
# mutmut skips decorated functions (ReversibleSGD.step, the custom ops, lru_cache helpers):
# in the copy they become `f = decorator(f)` after the function, which mutmut does mutate
"$PY" "$ROOT/tests/mutate_undecorate.py" $FILES
{
  echo "[mutmut]"
  echo "source_paths = fastreg"
  printf 'only_mutate =\n'; for f in $FILES; do echo "    $f"; done
  printf 'also_copy =\n    tests\n    bench\n    pyproject.toml\n'
  printf 'pytest_add_cli_args_test_selection =\n'; for t in $TESTS; do echo "    $t"; done
  # forkserver: each mutant's process is forked from one that has imported the tests but run
  # none of them. Forked from the process that ran the suite (mutmut's default), a mutant
  # inherits torch's and Numba's GNU OpenMP thread pools, which do not survive a fork: its first
  # parallel region hangs (the mutant reads as a timeout) or Numba terminates it.
  echo "process_isolation = forkserver"
  printf 'pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n'
  for a in "${EXTRA[@]}"; do echo "    $a"; done
} > setup.cfg
# mutmut keeps its map of which tests reach which function between runs and only adds the tests
# that are new: a function that is new to the map (first undecorated, or newly called by another)
# would be run against those alone, and its survivors would be false. Any change to the copied
# tree or the settings since the last run makes it map every test again.
TREE_HASH=$(find fastreg tests bench setup.cfg pyproject.toml -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -d' ' -f1)
if [ "$(cat .tree-hash 2>/dev/null)" != "$TREE_HASH" ]; then
  rm -f mutants/mutmut-stats.json
  echo "$TREE_HASH" > .tree-hash
fi
# mutants/ must exist before Python starts: a PYTHONPATH entry missing at start-up is cached as
# absent, and the tests would then import the working tree's fastreg (no mutant ever hit)
mkdir -p mutants
export PYTHONPATH="$WORK/mutants" FASTREG_TEST_SEED=${FASTREG_TEST_SEED:-id}
# MUTANTS unquoted on purpose: a space-separated list of name globs, expanded by mutmut not the shell
set -f
nice -n 10 "$PY" -m mutmut run --max-children "${MUTATE_JOBS:-1}" ${MUTANTS:-} || true
set +f
"$PY" -m mutmut results
