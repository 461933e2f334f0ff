# Two commands for a fresh machine: `make run` and `make test`. Everything else is a helper of those.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The embedded defaults of `make run` (override on the command line: make run PORT=9091).
PORT ?= 9090
HOST ?= 127.0.0.1
WORKERS ?= 1
THREADS ?= 4
COSOD_BACKBONE ?= vit_small_patch8_224.dino
export COSOD_BACKBONE

# Label Studio for the end-to-end tests lives in its own venv: it pins its own SDK and Django.
LS_VENV ?= .venv-ls
LS_VERSION ?= 1.23.2
export LS_BIN ?= $(abspath $(LS_VENV))/bin/label-studio

.PHONY: install run worker test lint typecheck bench clean ls-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[backend,dev]'
	touch $@

install: $(STAMP)

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LS_VERSION)
	touch $@

ls-venv: $(LS_VENV)/.installed

# Start the backend on the embedded defaults. The default backbone's weights are fetched when missing and
# reachable; offline the server still starts and /health plus the log name the file to put in weights/.
run: install
	-$(BIN)/cosod weights fetch $(COSOD_BACKBONE) --if-missing
	$(BIN)/gunicorn --bind $(HOST):$(PORT) --workers $(WORKERS) --threads $(THREADS) --timeout 0 \
		'backend.app:create_app()'

# An RQ worker for batch jobs and fine-tunes (needs REDIS_URL, e.g. redis://127.0.0.1:6379/0).
worker: install
	$(BIN)/cosod-worker

test: install ls-venv
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/predict.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
