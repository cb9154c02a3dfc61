# The project's commands. `make test` and `make run` are the README's promise: they
# work on a fresh machine with nothing but Python >= 3.11.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE ?= .hybridroute
STAMP := $(VENV)/.installed

.PHONY: help venv test run check protos lint typecheck protos-fresh bench clean

help:
	@echo "make run     start hybridroute on its embedded defaults (state in $(STATE)/)"
	@echo "make test    install everything into $(VENV) and run the whole suite"
	@echo "make check   lint, format, types and generated-stub freshness"
	@echo "make protos  regenerate protos/*_pb2*.py from protos/*.proto"
	@echo "make bench   run the benchmarks under bench/"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/hybridroute up --state-dir $(STATE)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of links
# laid out the way the package is installed.
typecheck: $(STAMP)
	rm -rf .typecheck && mkdir -p .typecheck/hybridroute
	for f in hybridroute/*; do ln -s "$(CURDIR)/$$f" .typecheck/hybridroute/; done
	for d in protos certs node router policies; do ln -s "$(CURDIR)/$$d" .typecheck/hybridroute/$$d; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p hybridroute

protos-fresh: protos
	git diff --exit-code -- protos/ || { echo "protos/ stubs are stale: run 'make protos' and commit"; exit 1; }

check: lint typecheck protos-fresh

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache build *.egg-info
