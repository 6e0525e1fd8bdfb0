# Two commands do all the set-up from a fresh clone:
#   make demo    install into .venv (once) and run the demo on bundled real data
#   make test    install into .venv (once) and run the test suite
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TEST_ARGS ?= -n 2 -m "not slow"

.PHONY: demo test test-all bench lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[tests]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flowjax demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS) $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(ARGS)

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff pyright
	$(BIN)/ruff format --check . && $(BIN)/ruff check . && $(BIN)/pyright

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m experiments.benchmarks $(ARGS)
