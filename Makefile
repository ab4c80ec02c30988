# sparsefact -- every target sets itself up: it creates .venv with `python3 -m venv`
# if it is missing and installs the package with plain pip (`pip install -e ".[dev]"`).
# The install is redone only when pyproject.toml changes (stamp file named after its hash).
#
#   make demo     factorise a built-in synthetic layer, compare with magnitude pruning
#   make test     run the test suite (pytest)
#   make lint     ruff check
#   make bench    CPU speed benchmark (minutes; writes benchmarks/results/bench_dsf.json)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

DEMO_ARGS   ?= --json sparsefact-demo-out/demo.json
PYTEST_ARGS ?=
BENCH_ARGS  ?=

PYPROJECT_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest()[:16])")
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)

.DEFAULT_GOAL := help
.PHONY: help install demo test lint bench clean distclean

help:
	@echo "make demo   - set up .venv if needed, then run 'sparsefact demo' (DSF vs magnitude pruning)"
	@echo "make test   - set up .venv if needed, then run the tests (pytest)"
	@echo "make lint   - ruff check sparsefact tests"
	@echo "make bench  - CPU benchmark (benchmarks/bench_dsf.py, takes minutes)"
	@echo "make clean  - remove caches and demo output; 'make distclean' also removes .venv"

$(PY):
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { \
	  echo "sparsefact needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." >&2; \
	  echo "Use another interpreter, e.g.: make PYTHON=python3.12 demo" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { \
	  echo "'$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsefact demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sparsefact tests

bench: $(STAMP)
	$(PY) benchmarks/bench_dsf.py $(BENCH_ARGS)

clean:
	rm -rf sparsefact-demo-out .pytest_cache .ruff_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) *.egg-info
