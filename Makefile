# `make run`: set up and run the daemon on its defaults (SQLite ./ocr-daemon.db, ./inbox).
# `make test`: set up and run the checks and the tests (PostgreSQL on 127.0.0.1:5432 for its tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint setup setup-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

run: setup
	mkdir -p inbox
	$(BIN)/ocr-daemon run

lint: setup-dev
	$(BIN)/ruff check daemon tests benchmarks migrations
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: setup-dev
	$(BIN)/python benchmarks/bench.py --render 20

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
