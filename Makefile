# Two commands on a fresh machine: `make run` (set up, serve the default model) and `make test`.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: setup run test lint bench clean test-container

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: it is the CPU build on this kind of machine; pyproject keeps torch>=2.6 open.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Fetches and converts the embedded default model on first use, then serves it with the dashboard at /.
# Ctrl-C drains the server, which exits with 130; bash (not sh) then ends quietly, and so does make.
run: SHELL := /bin/bash
run: setup
	$(BIN)/python -m engine.loader && $(BIN)/python -m server --host $(HOST) --port $(PORT) || [ $$? = 130 ]

test: setup
	$(BIN)/python -m engine.loader
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine server clients tests bench

# Builds the CPU image with podman and checks /health and one job over HTTP (docker/test-container.sh).
test-container:
	docker/test-container.sh

bench: setup
	$(BIN)/python -m bench engine

clean:
	rm -rf $(VENV) build *.egg-info
