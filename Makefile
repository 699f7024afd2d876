PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MkDocs Material prints a banner about its successor on every build; the build is what matters.
export NO_MKDOCS_2_WARNING := 1

.PHONY: install install-docs test lint bench docs docs-serve package example clean

.PHONY: install test lint bench bench-peers bench-backlog bench-queues docs example clean chaos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

install-docs: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,docs]'

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check microagent_mq tests examples bench docs/_tools
	$(BIN)/mypy

# Messages through worker processes under faults, on servers of its own (docs/reliability.md).
# CHAOS_ARGS, e.g.: make chaos CHAOS_ARGS='--broker redis --messages 2000 --duration 30'
CHAOS_ARGS ?=
chaos: install
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

bench: install
	$(BIN)/python -m bench

# The same scenarios on faststream and microagent 1.x beside ours (pip install -e '.[bench]').
bench-peers: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench --peers

# A consumer's peak RSS while it drains 1,000,000 queued messages, Redis and RabbitMQ (~15 min).
bench-backlog: install
	$(BIN)/python -m bench.backlog

# Many queues, cheap idle (issue #18 item 5): Redis on a server of its own, and RabbitMQ.
bench-queues: install
	$(BIN)/python -m bench.many_queues

# The site, into site/; --strict: a broken link, anchor or reference fails the build.
docs: install-docs
	$(BIN)/mkdocs build --strict

docs-serve: install-docs
	$(BIN)/mkdocs serve

# Build the sdist and the wheel, install the wheel in a fresh venv, check what pip sees.
package: $(BIN)/python
	PYTHON=$(PYTHON) bash .ci/check_package

example: install
	$(BIN)/python examples/run_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist site
