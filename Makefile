# `make run`: set up and run the daemon on its defaults (SQLite ./ocr-daemon.db, ./inbox).
# `make test`: set up and run the checks and the tests (PostgreSQL on 127.0.0.1:5432 for its tests).
# On a host with an NVIDIA driver both install the GPU build of onnxruntime with the CUDA and
# cuDNN libraries from pip; elsewhere the CPU build; never both (daemon/hardware/builds.py).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The onnxruntime build this host wants, e.g. onnxruntime-gpu[cuda,cudnn]==1.31.1
ORT := $(shell PYTHONPATH=. $(PYTHON) -m daemon.hardware.builds --requirement)
ORT_EXTRA := $(if $(findstring onnxruntime-gpu,$(ORT)),nvidia,cpu)
# every distribution that provides the `onnxruntime` module
ORT_ALL := onnxruntime onnxruntime-gpu

.PHONY: run test lint setup setup-dev bench clean FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall the build only when the choice changes (a driver installed or updated).
$(VENV)/.ort: FORCE | $(BIN)/python
	@echo '$(ORT)' | cmp -s - $@ || { \
	  echo "onnxruntime for this host: $(ORT)"; \
	  $(BIN)/python -m pip uninstall -q -y $(ORT_ALL) 2>/dev/null; \
	  $(BIN)/python -m pip install -q '$(ORT)' && echo '$(ORT)' > $@; }

$(VENV)/.installed: pyproject.toml $(VENV)/.ort | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$(ORT_EXTRA)]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.ort | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,$(ORT_EXTRA)]'
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
	$(BIN)/python -m benchmarks bench --render 20

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info

FORCE:
