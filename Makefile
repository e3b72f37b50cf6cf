# The README's two commands, `make test` and `make bench`, do all set-up on a
# fresh machine: venv, dependencies, native build, then tests or benchmarks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EDITABLE := $(VENV)/.fastreg-editable
export FASTREG_RESULTS_DIR ?= bench/results

.PHONY: venv build test test-fast bench gpu-check clean

$(DEPS): Makefile pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q 'torch>=2.6,<=2.14.1' numba numpy pybind11 ninja setuptools wheel \
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

test: build
	$(BIN)/python -m pytest -q tests

# optuna: the Bayesian-optimisation peer of bench/experiments/hypergradient_vs_bo.py, an
# optional dependency of the experiments (pyproject: experiments), installed once (the stamp)
BENCH_EXTRAS := $(VENV)/.bench-extras-installed
$(BENCH_EXTRAS): | $(DEPS)
	$(BIN)/python -m pip install -q optuna
	touch $@

bench: $(BENCH_EXTRAS)
bench: build
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
