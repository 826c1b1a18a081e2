"""Models by name or path: `load_pretrained` and `convert_torch_checkpoint` accept a
directory, a file, an `hf-hub:OWNER/NAME[@revision]` name or an http(s) URL; remote
checkpoints are downloaded (`hub`) and converted once into the cache.
"""

import os

from riformer_jax.weights import hub, store, torch_io


def load_pretrained(directory, *, arch=None, sha256=None, **overrides):
  """Returns `(module, variables)` from a directory written by `convert.py`/train.py,
  or from an `hf-hub:` name or URL (converted once into a cache, see `hub`; `arch`
  names the model where the checkpoint does not, `sha256` checks a URL's download).

  `overrides` go to `create_model` on top of the manifest's kwargs; only those that
  do not change the parameters make sense (e.g. `dtype=jnp.bfloat16`,
  `drop_path_rate=0.1`). Ready for `module.apply(variables, images_nhwc, train=False)`.
  """
  return store.load_directory(resolve_directory(directory, arch, sha256), **overrides)


def convert_torch_checkpoint(src, dst, name=None, fmt="auto", num_classes=None, seed=0,
                             overwrite=False, sha256=None):
  """PyTorch checkpoint -> converted-model directory; returns the manifest written.

  `src` is a file, an `hf-hub:OWNER/NAME[@revision]` repository or an http(s) URL
  (riformer_jax.weights.hub; `sha256` checks a URL's download). `name` is the registry name;
  a timm hub repository says it itself.
  """
  fetched = hub.fetch(str(src), sha256) if hub.is_remote(src) else None
  return torch_io.convert(src, fetched, dst, name, fmt, num_classes, seed, overwrite)


def resolve_directory(source, arch=None, sha256=None):
  """The converted-model directory `source` names: a directory as it is; an hf-hub:
  name or URL converted on first use into RIFORMER_JAX_CACHE/converted and reused
  afterwards."""
  if not hub.is_remote(source):
    return source
  fetched = hub.fetch(str(source), sha256)
  name = arch or fetched.arch
  if name is None:
    raise ValueError(f"{source}: the checkpoint does not say which model it holds; "
                     "pass arch= (e.g. riformer_s12)")
  directory = os.path.join(hub.cache_dir(), "converted", f"{fetched.cache_key}--{name}")
  if not os.path.isfile(os.path.join(directory, store.MANIFEST)):
    torch_io.convert(source, fetched, directory, name, overwrite=True)
  return directory
