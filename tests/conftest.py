"""Shared test set-up: 8 virtual CPU devices and parameter randomisation."""

import atexit
import os
import shutil
import tempfile

# Before jax is imported anywhere: 8 CPU devices for the sharding tests, and the CPU
# backend even on a GPU host, so float32 tolerances do not meet TF32 matmuls.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared by the trainer runs in this
# process and in train.py processes (test_train passes it on): the tiny models' programs
# compile once instead of once a run. Every program, however quick to compile: a run
# compiles about 200 of them. A folder per pytest-xdist worker, since JAX writes its
# entries in place (no lock without a size limit): one worker could read another's
# half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="riformer_jax_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY = dict(depths=(1, 2, 2, 1), dims=(8, 16, 24, 32), num_classes=10)


def random_params(model, images, seed):
  """`numpy_randomize`'s draws for `model`'s params at `images`' shape, on
  `jax.eval_shape(model.init)`: eager `init` and `jax.random` compile once per
  parameter shape (seconds per model on 2 cores), this compiles nothing."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return numpy_randomize(shapes, seed)


def numpy_randomize(tree, seed):
  """Every parameter redrawn far from its init: vectors (norm scales and biases, layer
  scales, affine s and t) uniform in [-0.25, 1.25], kernels N(0, 1/fan_in). Layer
  scales of 1e-5 would hide almost any error in the mixer branch. `tree` may hold
  arrays or `jax.ShapeDtypeStruct`s."""
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 1:
      value = rng.uniform(-0.25, 1.25, leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)
  return jax.tree.map(draw, tree)


def relative_error(actual, expected):
  """max |actual - expected| / max |expected| (normwise, robust to entries near 0)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.fixture
def images():
  return jax.random.normal(jax.random.key(0), (2, 64, 64, 3), jnp.float32)


# The longest files first: `make test` hands whole files to its two workers in this
# order, so neither worker is left alone with a long file at the end.
LONGEST_FILES = ("test_train.py", "test_distill.py", "test_export.py", "test_mixup.py",
                 "test_bench.py", "test_convert.py", "test_models.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


def pytest_configure(config):
  # yapf (imported by MMPreTrain through mmengine) writes its grammar pickle to the user
  # cache on first import, without a lock: two pytest-xdist workers importing it at once
  # in a fresh environment read each other's half-written file (EOFError). The
  # controller writes it once, before the workers start.
  if hasattr(config, "workerinput"):
    return
  try:
    import yapf  # noqa: F401
  except ImportError:
    pass
