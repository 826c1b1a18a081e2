"""Shared test set-up: 8 virtual CPU devices and parameter randomisation."""

import os

# Before jax is imported anywhere: 8 CPU devices for the sharding tests, and the CPU
# backend even on a GPU host, so float32 tolerances do not meet TF32 matmuls.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY = dict(depths=(1, 2, 2, 1), dims=(8, 16, 24, 32), num_classes=10)


def randomize(params, seed):
  """Every parameter redrawn far from its init: vectors (norm scales and biases, layer
  scales, affine s and t) uniform in [-0.25, 1.25], kernels N(0, 1/fan_in). Layer
  scales of 1e-5 would hide almost any error in the mixer branch."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for key, leaf in zip(keys, leaves):
    if leaf.ndim == 1:
      new.append(jax.random.uniform(key, leaf.shape, leaf.dtype, -0.25, 1.25))
    else:
      fan_in = np.prod(leaf.shape[:-1])
      new.append(jax.random.normal(key, leaf.shape, leaf.dtype) / np.sqrt(fan_in))
  return jax.tree.unflatten(treedef, new)


def random_params(model, images, seed):
  """`randomize`'s distributions for `model`'s params at `images`' shape, drawn by
  numpy on `jax.eval_shape(model.init)`: eager `init` and `jax.random` compile once
  per parameter shape (seconds per model on 2 cores), this compiles nothing."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return numpy_randomize(shapes, seed)


def numpy_randomize(tree, seed):
  """`randomize` (vectors uniform in [-0.25, 1.25], kernels N(0, 1/fan_in)) by numpy;
  `tree` may hold arrays or `jax.ShapeDtypeStruct`s."""
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
