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

# The default suite (what CI runs), about 11 minutes on 2 cores.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# Also the slow tests: two training processes over loopback, SIGTERM resume, export.
test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests -m "slow or not slow"

# Parameters and MACs of every registered model at 224 (no downloads).
summary: $(BIN)/.installed
	$(BIN)/python -m riformer_jax.summary

clean:
	rm -rf $(VENV)
