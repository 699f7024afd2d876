PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench docs example clean chaos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check microagent_mq tests examples bench
	$(BIN)/mypy

# Messages through worker processes under faults, on servers of its own (docs/reliability.md).
# CHAOS_ARGS, e.g.: make chaos CHAOS_ARGS='--broker redis --messages 2000 --duration 30'
CHAOS_ARGS ?=
chaos: install
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

bench: install
	$(BIN)/python -m bench

docs:
	@echo "The docs are Markdown: docs/index.md"

example: install
	$(BIN)/python examples/run_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
