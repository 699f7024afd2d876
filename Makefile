PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench docs example clean

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

bench: install
	$(BIN)/python -m bench

docs:
	@echo "The docs are Markdown: docs/index.md"

example: install
	$(BIN)/python examples/run_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
