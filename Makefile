# `make test` and `make summary` create .venv from the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test test-all summary clean

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

# The default suite: tiny models and small images, well under 20 minutes on 2 cores.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

# Adds the heavier checks (every size at 224, ...) for nightly runs and benchmarks.
test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# Parameters and MACs of every registered model at 224 (no downloads).
summary: $(BIN)/.installed
	$(BIN)/python -m riformer_jax.summary

clean:
	rm -rf $(VENV)
