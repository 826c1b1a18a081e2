"""Where arrays live: the device mesh, the batch and state shardings, host -> global.

One 1-D mesh with a "data" axis over every device of every process. Batches are split
along it; the train state is replicated (data parallel) or, with `config.fsdp`, each
leaf is split along its largest evenly divisible axis.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

AXIS = "data"


def make_mesh(devices=None):
  """A 1-D mesh with a "data" axis over `devices` (default: all, every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(devices, (AXIS,))


def data_sharding(mesh):
  """Batch dimension split over the mesh's data axis, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def fsdp_shardings(tree, mesh):
  """Each leaf sharded over "data" along its largest axis that divides evenly, else
  replicated: FSDP-style storage of params and optimizer state."""
  size = mesh.shape[AXIS]

  def leaf_sharding(leaf):
    shape = getattr(leaf, "shape", ())
    candidates = [(dim, axis) for axis, dim in enumerate(shape) if dim % size == 0]
    if not candidates or size == 1:
      return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(leaf_sharding, tree)


def to_global(host_batch, mesh):
  """One host's numpy batch -> global `jax.Array`s sharded over the data axis.

  Every process passes its own rows (in process order); the result's leading
  dimension is the global batch.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def global_batches(host_batches, mesh):
  """Maps `to_global` over an iterator of host batches."""
  for batch in host_batches:
    yield to_global(batch, mesh)
