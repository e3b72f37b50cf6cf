# The README's two commands, `make test` and `make bench`, do all set-up on a
# fresh machine: venv, dependencies, native build, then tests or benchmarks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EDITABLE := $(VENV)/.fastreg-editable
export FASTREG_RESULTS_DIR ?= bench/results

.PHONY: venv build tritons test test-fast bench gpu-check clean

# Supported stacks (pyproject.toml): torch 2.11 / Triton 3.6 through torch 2.15 / Triton 3.9.
# The venv gets torch 2.14.1 (with its Triton 3.8.0): the newest this machine's pip allows.
TORCH_SPEC    := torch>=2.11,<=2.14.1
# `make test` also runs the Triton kernels under the interpreter with the oldest and the newest
# supported Triton, and compiles them ahead of time with both (tests/test_zz_triton_compile.py):
# each is a `pip install --target` folder, put first on PYTHONPATH in front of the venv's.
TRITON_OLDEST := 3.6.0
TRITON_NEWEST := 3.9.0
TRITON_STAMPS := $(VENV)/triton-$(TRITON_OLDEST)/.installed $(VENV)/triton-$(TRITON_NEWEST)/.installed

$(DEPS): Makefile pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)' numba numpy pybind11 ninja setuptools wheel \
		pytest pytest-benchmark scikit-learn matplotlib
	touch $@

venv: $(DEPS)

# The editable install only registers the package (its C++-only build is quick and is
# replaced at once); `build` then compiles everything, incrementally, with ninja.
$(EDITABLE): $(DEPS) setup.py pyproject.toml
	FASTREG_CUDA=0 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Editable install once, then incremental native rebuilds (ninja, in build/).
build: $(EDITABLE)
	$(BIN)/python setup.py -q build_ext --inplace

# One Triton per folder, installed once (the stamp); order-only on the venv so that an edit
# of the Makefile does not reinstall them.
$(VENV)/triton-%/.installed: | $(DEPS)
	rm -rf $(VENV)/triton-$*
	$(BIN)/python -m pip install -q --target $(VENV)/triton-$* --no-deps triton==$*
	touch $@

tritons: $(TRITON_STAMPS)

# The Triton-backend tests (marker triton_backend), interpreted, with the Triton installed in
# $(VENV)/triton-$(1) first on the path; tests/test_triton_stack.py asserts that the Triton
# imported is FASTREG_EXPECT_TRITON.
triton_subset = PYTHONPATH=$(CURDIR)/$(VENV)/triton-$(1)$${PYTHONPATH:+:$$PYTHONPATH} \
	TRITON_INTERPRET=1 FASTREG_EXPECT_TRITON=$(1) sh -c '$(BIN)/python -c "import triton; \
	print(\"Triton-backend tests, interpreted, with triton\", triton.__version__, \
	\"from\", triton.__file__)" && $(BIN)/python -m pytest -q -m triton_backend tests'

# The whole suite with the venv's Triton, then the Triton-backend tests with the oldest and
# the newest supported Triton. All three run even when one fails (CI shows every failure);
# make fails if any did.
test: build tritons
	@status=0; rm -f build/triton-static-summary.txt; \
	$(BIN)/python -m pytest -q tests || status=1; \
	cat build/triton-static-summary.txt 2>/dev/null; \
	for v in $(TRITON_OLDEST) $(TRITON_NEWEST); do $(call triton_subset,$$v) || status=1; done; \
	exit $$status

# One of them alone, e.g. `make test-triton-3.6.0`.
test-triton-%: $(VENV)/triton-%/.installed build
	$(call triton_subset,$*)

# optuna: the Bayesian-optimisation peer of bench/experiments/hypergradient_vs_bo.py, an
# optional dependency of the experiments (pyproject: experiments), installed once (the stamp)
BENCH_EXTRAS := $(VENV)/.bench-extras-installed
$(BENCH_EXTRAS): | $(DEPS)
	$(BIN)/python -m pip install -q optuna
	touch $@

bench: build $(BENCH_EXTRAS)
	$(BIN)/python -m pytest -q bench -o python_files="bench_*.py" --benchmark-only \
		--benchmark-columns=median,iqr,rounds \
		--benchmark-json=$(FASTREG_RESULTS_DIR)/last-run.json
	$(BIN)/python bench/summary.py $(FASTREG_RESULTS_DIR)/last-run.json
	$(BIN)/python bench/chart.py $(FASTREG_RESULTS_DIR)/last-run.json
	$(MAKE) --no-print-directory docs

# Generated pages: docs/benchmarks.md and README.md's benchmark table from the results JSON
# (bench/history.py), docs/api.md from the docstrings (tools/gen_api.py).
.PHONY: docs
docs: build
	$(BIN)/python bench/history.py $(FASTREG_RESULTS_DIR)
	$(BIN)/python tools/gen_api.py

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build fastreg/_C*.so $(EDITABLE)

# Mutation testing (mutmut 3), not part of `make test`: the Python files of one family (or the
# files a change touched) against the tests that cover them, on a scratch copy in build/mutate/.
#   make mutate FILES=fastreg/penalty.py TESTS="tests/test_penalty.py tests/test_penalty_gaps.py"
#   make mutate FILES=fastreg/ops/dropout.py TESTS=tests/test_dropout.py PYTEST_ARGS='-k "not triton"'
# Survivors and why they are harmless: docs/testing.md.
MUTMUT := $(VENV)/.mutmut-installed
FILES ?= fastreg/penalty.py
TESTS ?= tests/test_penalty.py tests/test_penalty_gaps.py tests/test_penalty_activity.py
PYTEST_ARGS ?=

$(MUTMUT): $(DEPS)
	$(BIN)/python -m pip install -q 'mutmut>=3.8,<4'
	touch $@

.PHONY: mutate
mutate: build $(MUTMUT)
	PYTHON=$(CURDIR)/$(BIN)/python bash tests/mutate.sh "$(FILES)" "$(TESTS)" $(PYTEST_ARGS)
