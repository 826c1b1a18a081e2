# `make test` and `make summary` create .venv from the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo edge roadmap check test test-all summary clean

# The package itself goes in editable on top of the lock, for its commands
# (riformer-predict, riformer-convert ...; pyproject.toml).
$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-edge.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The paper's idea end to end on the embedded data set: teacher, CE student, distilled
# student, deploy form, one table and runs/demo/curves.png.
demo: $(BIN)/.installed
	$(BIN)/python demo.py --workdir=runs/demo

# The demo's distilled student and its PoolFormer teacher for the edge runtimes (ONNX,
# OpenVINO, LiteRT, with int8), then int8 against float32 on the test split.
edge: demo
	$(BIN)/python -m riformer_jax.deploy.export --src runs/demo/distilled/student --dst runs/edge/student --int8
	$(BIN)/python -m riformer_jax.deploy.export --src runs/demo/teacher/student --dst runs/edge/poolformer --int8
	$(BIN)/python -m riformer_jax.deploy.runtimes --artifacts runs/edge/student
	$(BIN)/python -m riformer_jax.deploy.runtimes --artifacts runs/edge/poolformer

# The roadmap (Tables 1-4, Guideline 5) at small scale, three seeds per row: 14 rows,
# about 70 minutes on 2 cores (finished runs are reused).
roadmap: $(BIN)/.installed
	$(BIN)/python roadmap.py --workdir=runs/roadmap --seeds=0,1,2

# The suites run in WORKERS processes (pytest-xdist), a test file per process at a time:
# a file's module fixtures (one training run, one benchmark run) are made once.
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q tests -n $(WORKERS) --dist loadfile

# The tier for iterating: the default suite less the tests marked `heavy` (training
# processes, edge runtimes, benchmark runs, the costliest step compilations).
check: $(BIN)/.installed
	$(PYTEST) -m "not slow and not heavy" $(PYTEST_ARGS)

# The default suite (what CI runs, with --durations=25); BENCHMARKS.md, "Wall times",
# has its time. A new .venv adds 2-4 min.
test: $(BIN)/.installed
	$(PYTEST) $(PYTEST_ARGS)

# Also the slow tests: two training processes over loopback, SIGTERM resume, FSDP resume,
# S12 and PoolFormer-S12 in every edge runtime, a small bench_edge run, the bfloat16 and
# per-layer benchmark runs, roadmap.py on an image folder, the package in a fresh venv.
test-all: $(BIN)/.installed
	$(PYTEST) -m "slow or not slow" $(PYTEST_ARGS)

# Parameters and MACs of every registered model at 224 (no downloads).
summary: $(BIN)/.installed
	$(BIN)/python -m riformer_jax.models.summary

clean:
	rm -rf $(VENV)
