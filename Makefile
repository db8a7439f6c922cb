# Every target bootstraps .venv itself from the Python that .python-version names.
PYVER   := $(shell cat .python-version)
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PACKAGES := tokenferry proxy addons gateway gateway_client

.PHONY: setup test lint demo bench clean postgres-server

setup: $(STAMP)

$(PY):
	@py=$$(command -v python$(PYVER) 2>/dev/null || ls -d $$HOME/.pyenv/versions/$(PYVER)*/bin/python 2>/dev/null | tail -n 1); \
	if [ -z "$$py" ]; then echo "error: Python $(PYVER) (from .python-version) not found; install it (e.g. pyenv install $(PYVER))" >&2; exit 1; fi; \
	echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(PACKAGES)
	$(VENV)/bin/hadolint --failure-threshold style Dockerfile

test: lint postgres-server
	$(VENV)/bin/pytest

# The gateway's PostgreSQL tests start a throwaway server from the distribution's
# binaries (tests/support/postgres.py); as root, install them when they are missing.
postgres-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	  || echo "note: PostgreSQL server binaries missing (apt-get install postgresql); the PostgreSQL tests will fail"

demo: $(STAMP)
	$(VENV)/bin/tokenferry demo

# hey (Debian package) drives the load; without it bench/run.py uses bench/pyload.py.
bench: $(STAMP)
	@command -v hey >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq hey >/dev/null; } \
	  || echo "note: hey not installed; using the Python load generator (see bench/README.md)"
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
