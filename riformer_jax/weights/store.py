"""The converted-model directory: what `save_pretrained` writes and `load_directory`
reads back.

    DIR/manifest.json   {"model": registry name, "kwargs": create_model overrides,
                         "format", "source", "sha256", "saved_at", and where known
                         "preprocessing" (timm's pretrained_cfg terms), "class_names"}
    DIR/variables/      orbax checkpoint of {"params": ...}

Loading rebuilds the module from the manifest (`build_model`, the one place that does)
and checks every shape against it. Directories are written under a temporary name next
to the destination and renamed into place, so a failure leaves nothing there.
"""

import contextlib
import datetime
import json
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from riformer_jax.data import imagenet
from riformer_jax.models import counting, registry

MANIFEST = "manifest.json"
VARIABLES = "variables"


@contextlib.contextmanager
def _atomic_directory(destination, overwrite=False):
  """Yields a fresh temporary directory that replaces `destination` on success."""
  destination = os.path.abspath(destination)
  if os.path.exists(destination) and not overwrite:
    raise FileExistsError(f"{destination} exists; choose another --dst or pass "
                          "--overwrite")
  parent = os.path.dirname(destination)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.", dir=parent)
  replaced = staging + ".replaced"
  try:
    yield staging
    # The old copy moves aside and goes only once the new one is in place: a failed
    # rename puts it back, so DIR always holds a whole model.
    if os.path.exists(destination):
      os.rename(destination, replaced)
    try:
      os.rename(staging, destination)
    except OSError:
      if os.path.exists(replaced):
        os.rename(replaced, destination)
      raise
  finally:
    for leftover in (staging, replaced):
      if os.path.exists(leftover):
        shutil.rmtree(leftover)


def _local_checkpointer():
  """An orbax checkpointer that this process uses alone: converted models are small,
  host-side numpy trees, written and read by one process of a multi-host run."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def preprocessing_record(resolution=224, crop_pct=0.9, interpolation="bicubic",
                         mean=imagenet.MEAN, std=imagenet.STD):
  """The evaluation preprocessing a model expects, in timm's `pretrained_cfg` terms
  (`crop_pct` None: images are used at their size, only center-cropped)."""
  return {"input_size": [3, resolution, resolution], "crop_pct": crop_pct,
          "interpolation": interpolation, "mean": list(mean), "std": list(std)}


def save_pretrained(directory, name, kwargs, params, overwrite=False, **metadata):
  """Writes `params` of `create_model(name, **kwargs)` as DIR/variables + manifest."""
  _, abstract = build_model(name, kwargs)  # validates name and kwargs
  _check_shapes(params, abstract, directory)
  manifest = {"model": name, "kwargs": kwargs, **metadata,
              "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  with _atomic_directory(directory, overwrite) as staging:
    checkpointer = _local_checkpointer()
    checkpointer.save(os.path.join(staging, VARIABLES),
                      {"params": jax.device_get(params)})
    checkpointer.wait_until_finished()
    with open(os.path.join(staging, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
      f.write("\n")
  return os.path.abspath(directory)


def _check_shapes(params, abstract, where):
  got = {path: tuple(leaf.shape) for path, leaf in
         traverse_util.flatten_dict(params, sep="/").items()}
  want = {path: tuple(leaf.shape) for path, leaf in
          traverse_util.flatten_dict(abstract, sep="/").items()}
  problems = [f"missing {p}" for p in sorted(set(want) - set(got))]
  problems += [f"unexpected {p}" for p in sorted(set(got) - set(want))]
  problems += [f"{p}: {got[p]} instead of {want[p]}"
               for p in sorted(set(got) & set(want)) if got[p] != want[p]]
  if problems:
    shown = "; ".join(problems[:10])
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    raise ValueError(f"{where}: params do not fit the model: {shown}{more}")


def read_manifest(directory):
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not a converted model (no {MANIFEST}); "
                            "write one with `python convert.py` or train.py")
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  for field in ("model", "kwargs"):
    if field not in manifest:
      raise ValueError(f"{path}: no {field!r} field")
  return manifest


def build_model(name, kwargs, **overrides):
  """`(module, abstract params)` of registry model `name` with the manifest's `kwargs`
  and `overrides` on top: the one place a saved model is rebuilt from its name."""
  # JSON turns tuples (depths, dims) into lists; tuples keep the module hashable, so
  # it can be a static argument of jax.jit.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  model = registry.create_model(name, **{**kwargs, **overrides})
  # At the size a model is built for where it has one (RandFormer's matrices, GFNet's
  # filters); shapes only, so any size costs the same.
  return model, counting.abstract_variables(model, getattr(model, "img_size", 64))["params"]


def load_directory(directory, **overrides):
  """`(module, variables)` of a converted-model directory (see the module docstring)."""
  manifest = read_manifest(directory)
  model, abstract = build_model(manifest["model"], manifest["kwargs"], **overrides)
  path = os.path.abspath(os.path.join(directory, VARIABLES))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory}: no {VARIABLES}/ checkpoint next to the manifest")
  checkpointer = _local_checkpointer()
  # orbax restores into the target's structure without comparing shapes: compare the
  # saved ones first, for an error that names the parameters.
  metadata = checkpointer.metadata(path).item_metadata
  if metadata is None:
    raise ValueError(f"{path}: the array metadata is missing or unreadable (a corrupt "
                     "or partial copy of the directory)")
  _check_shapes(metadata.tree.get("params", {}), abstract, path)
  try:
    restored = checkpointer.restore(path, {"params": abstract})
  except ValueError as e:  # tensorstore's OUT_OF_RANGE, DATA_LOSS ... on a damaged file
    raise ValueError(f"{path}: a weight file is damaged ({str(e).splitlines()[0]}); "
                     "convert or export the model again") from e
  return model, jax.tree.map(jax.numpy.asarray, restored)
