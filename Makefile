# Two commands for a fresh machine: `make run` and `make test`. Everything else is a helper of those.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The lock: exact versions and hashes of every runtime, backend and dev dependency (LOCK) and of the Label
# Studio venv of the end-to-end tests (LS_LOCK), made by `make lock` from pyproject.toml's ranges.
# uv makes them (4 s; pip-compile hashes every platform's files by downloading them: over 5 min here).
LOCK := requirements.txt
LS_LOCK := requirements/label-studio.txt
# The Docker image installs DEPLOY_LOCK: runtime and backend only, at LOCK's pins.
DEPLOY_LOCK := requirements/deploy.txt
# The compose stack's rq-dashboard image installs DASHBOARD_LOCK (its rq and redis at LOCK's pins).
DASHBOARD_LOCK := requirements/rq-dashboard.txt
LOCK_FLAGS := --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command 'make lock'

# The embedded defaults of `make run` (override on the command line: make run PORT=9091).
PORT ?= 9090
HOST ?= 127.0.0.1
WORKERS ?= 1
THREADS ?= 4
COSOD_BACKBONE ?= vit_small_patch8_224.dino
export COSOD_BACKBONE

# Label Studio for the end-to-end tests lives in its own venv: it pins its own SDK and Django.
LS_VENV ?= .venv-ls
export LS_BIN ?= $(abspath $(LS_VENV))/bin/label-studio

.PHONY: install run worker test test-latest test-compose lock lint typecheck bench clean ls-venv browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every install is from the lock: exact versions, checked against their hashes, nothing resolved on the day.
$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

install: $(STAMP)

$(LS_VENV)/.installed: $(LS_LOCK)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r $(LS_LOCK)
	$(LS_VENV)/bin/python -m pip check
	touch $@

ls-venv: $(LS_VENV)/.installed

# Start the backend on the embedded defaults. The default backbone's weights are fetched when missing and
# reachable; offline the fetch prints one notice and exits 0, the server starts, /health names the file to
# put in weights/ and loads it once it is there, without a restart. Another fetch failure (a download with
# the wrong sha256) stops here. backend/api/gunicorn_conf.py makes /metrics sum all WORKERS (Prometheus
# multiprocess mode). Backbone features are cached on disk (COSOD_CACHE_DIR, default $MODEL_DIR/features):
# grouping by similarity and the predictions then share one backbone pass per image.
run: install
	$(BIN)/cosod weights fetch $(COSOD_BACKBONE) --if-missing --offline-ok
	COSOD_CACHE_DIR="$${COSOD_CACHE_DIR:-$${MODEL_DIR:-$(CURDIR)/model_dir}/features}" \
	$(BIN)/gunicorn -c python:backend.api.gunicorn_conf --bind $(HOST):$(PORT) --workers $(WORKERS) \
		--threads $(THREADS) --timeout 0 'backend.api.app:create_app()'

# An RQ worker for batch jobs and fine-tunes (needs REDIS_URL, e.g. redis://127.0.0.1:6379/0).
worker: install
	$(BIN)/cosod-worker

test: install ls-venv browser
	$(BIN)/python -m pytest -q

# The real-browser test (tests/e2e/test_browser.py) drives Debian's chromium through its chromedriver, never a
# browser that a tool downloads. As root they are installed with apt when missing; otherwise this says what to
# install and the test skips (CI sets COSOD_TEST_BROWSER=required, which makes a missing browser fail it).
BROWSER_PKGS := chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make browser: installing $(BROWSER_PKGS) with apt"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q $(BROWSER_PKGS) >/dev/null || { apt-get update -q >/dev/null && \
			apt-get install -y -q $(BROWSER_PKGS) >/dev/null; } || \
			echo "make browser: apt could not install $(BROWSER_PKGS) (the browser test skips without them)"; \
	else echo "make browser: /usr/bin/chromium or /usr/bin/chromedriver is missing: as root, apt-get install -y" \
		"$(BROWSER_PKGS) (the browser test skips without them)"; fi

# Regenerate the lock from pyproject.toml's ranges (and requirements/caps.txt, this machine's torch cap). Pins that
# still satisfy the ranges are kept; `make lock UPGRADE=1` moves every package to its newest allowed release.
lock: | $(BIN)/python
	v=$$(sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK) 2>/dev/null); $(BIN)/python -m pip install --quiet "uv$${v:+==$$v}"
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra backend --extra dev -c requirements/caps.txt \
		$(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra backend -c $(LOCK) $(LOCK_FLAGS) -o $(DEPLOY_LOCK)
	$(BIN)/uv pip compile requirements/label-studio.in $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) -o $(LS_LOCK)
	$(BIN)/uv pip compile requirements/rq-dashboard.in -c $(LOCK) $(LOCK_FLAGS) -o $(DASHBOARD_LOCK)

# The whole suite on the newest releases that pyproject.toml's ranges allow (no lock), in a throw-away venv.
# What it resolved is in $(LATEST_VENV)/resolved.txt; the lines that differ from the lock are printed first.
LATEST_VENV ?= .venv-latest
test-latest: ls-venv
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[backend,dev]'
	$(LATEST_VENV)/bin/python -m pip check
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/resolved.txt
	$(LATEST_VENV)/bin/python requirements/newer.py $(LOCK) $(LATEST_VENV)/resolved.txt
	COSOD_TEST_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q

# The production path for real (tests/compose/smoke.py): builds the images, starts docker-compose.yml's CPU
# stack (stand-ins for the images no registry here serves), pre-annotates a project through the worker
# container, checks that down/up keeps MODEL_DIR, and removes everything it started. Needs docker.io,
# docker-compose and debootstrap (apt) and root to start a dockerd when none runs.
test-compose: install
	$(BIN)/python tests/compose/smoke.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/predict.py

clean:
	rm -rf $(VENV) $(LS_VENV) $(LATEST_VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
