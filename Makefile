# Two entry points: `make run` (the service) and `make test` (every check). Both install
# from uv.lock into .venv, again whenever the lock changes; a fresh machine needs python3
# (3.11+; on Debian also python3-venv) and make. uv itself is pinned in requirements-uv.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
HOST ?= 127.0.0.1
PORT ?= 8000

# uv installs into $(VENV) with the Python it was made with, builds this project with the
# pinned setuptools, and never downloads a Python of its own.
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_BUILD_CONSTRAINT := $(abspath build-constraints.txt)
export UV_PYTHON_DOWNLOADS := never

# Floors check: the oldest allowed direct dependencies as the index stood on that day (so
# the check gives the same answer until the day is moved on with the lock).
LOWEST_VENV ?= .venv-lowest
LOWEST_AS_OF ?= 2026-12-02T00:00:00Z
LOWEST_TESTS ?= tests/domain/test_domain.py tests/store/test_store.py tests/api/test_api.py \
	tests/api/test_hot_path.py tests/store/test_coalesce.py tests/store/test_keyspace.py \
	tests/api/test_stream.py tests/e2e/test_packaging.py -m "not slow" -k "not cluster"

.PHONY: run test lint bench compare lock test-lowest clean

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv" >&2; \
	  exit 1; }

$(UV): requirements-uv.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements-uv.txt
	touch $@

# The service's dependencies only, never the test and lint tools. Both installs compile
# the packages to bytecode once, here, rather than in every process that imports them
# (the tests start dozens: workers, services, benchmarks).
$(VENV)/.run-stamp: uv.lock pyproject.toml build-constraints.txt $(UV)
	$(UV) sync --locked --no-dev --inexact --compile-bytecode
	touch $@

# Exactly the lock: the service, its tests and tools, the client package (editable).
$(VENV)/.test-stamp: uv.lock pyproject.toml clients/python/pyproject.toml \
		build-constraints.txt $(UV)
	$(UV) sync --locked --compile-bytecode
	touch $@

run: $(VENV)/.run-stamp
	$(BIN)/uvicorn app.main:app --host $(HOST) --port $(PORT)

lint: $(VENV)/.test-stamp
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest's exit 5 (nothing collected) is a failure with its own word, not a silent pass.
# Three processes (pytest-xdist) on two cores: many tests spend their time waiting on
# servers, subprocesses and injected faults, so one process more keeps both cores busy.
# Work is handed out test by test: the file-wise modes key tests by node id and would
# run only one of the schema fuzzer's per-operation tests, which share one.
# Bytecode caches are written even where the environment turns them off: each process
# would otherwise compile this project, and pytest rewrite its plugins, anew.
TEST_PROCESSES ?= 3
test: $(VENV)/.test-stamp lint
	scripts/ensure-redis
	scripts/ensure-chromium
	@PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -n $(TEST_PROCESSES) --dist worksteal; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: pytest ran no test" >&2; fi; \
	  exit $$status

# After changing dependencies in pyproject.toml (uv lock --upgrade moves every pin).
lock: $(UV)
	$(UV) lock

# The floors in pyproject.toml, proven: the oldest allowed direct dependencies (wheels
# only) in their own venv, running the fast tests. Needs the package index.
test-lowest: $(UV)
	scripts/ensure-redis
	$(UV) venv -q --allow-existing --python $(BIN)/python $(LOWEST_VENV)
	rm -f $(LOWEST_VENV)/requirements.txt
	$(UV) pip compile -q pyproject.toml --group dev --resolution lowest-direct \
	  --only-binary :all: --exclude-newer $(LOWEST_AS_OF) \
	  --python $(LOWEST_VENV)/bin/python -o $(LOWEST_VENV)/requirements.txt
	$(UV) pip sync -q --python $(LOWEST_VENV)/bin/python $(LOWEST_VENV)/requirements.txt
	$(UV) pip install -q --python $(LOWEST_VENV)/bin/python --no-deps -e .
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal $(LOWEST_TESTS)

# Every benchmark in one run (a few minutes; QUICK=1 for a tiny load). Installs wrk and
# redis-tools from Debian when they are missing; results land in bench/results/.
bench: $(VENV)/.test-stamp
	scripts/ensure-redis
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)

# This checkout's service against another's (AGAINST=path, installed with its .venv):
# interleaved rounds of HTTP reserve, commit and batches, the median ratio of each.
compare: $(VENV)/.test-stamp
	scripts/ensure-redis
	$(BIN)/python -m bench.compare $(AGAINST)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis \
	  build dist *.egg-info
