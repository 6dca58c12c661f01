# Two entry points: `make run` (the service) and `make test` (every check).
# Both build .venv from pyproject.toml on first use, so a fresh machine needs only
# python3 (3.11+) and make.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' -e clients/python
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/uvicorn app.main:app --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) lint
	scripts/ensure-redis
	scripts/ensure-chromium
	$(BIN)/pytest

# Every benchmark in one run (a few minutes; QUICK=1 for a tiny load). Installs wrk and
# redis-tools from Debian when they are missing; results land in bench/results/.
bench: $(STAMP)
	scripts/ensure-redis
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
