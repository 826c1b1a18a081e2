"""PyTorch checkpoints in, orbax checkpoints with a JSON manifest out, and back.

A converted model is a directory:

    DIR/manifest.json   {"model": registry name, "kwargs": create_model overrides,
                         "format", "source", "sha256", "saved_at", and where known
                         "preprocessing" (timm's pretrained_cfg terms), "class_names"}
    DIR/variables/      orbax checkpoint of {"params": ...}

`load_pretrained(DIR)` rebuilds the module from the manifest and restores the
variables, checking every shape against the module. `convert_torch_checkpoint` and
`export_torch_checkpoint` are what `convert.py` runs. Directories and files are written
under a temporary name next to the destination and renamed into place, so a failure
leaves nothing at the destination.
"""

import contextlib
import datetime
import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from riformer_jax import counting, hub, metaformer, models
from riformer_jax import state_dict as state_dict_lib
from riformer_jax import surgery

MANIFEST = "manifest.json"
VARIABLES = "variables"
_STATE_DICT_KEYS = ("state_dict", "model")  # MMPreTrain / GFNet, then the top level


def read_torch_state_dict(path):
  """`{key: float32/int numpy array}` from a `.pth`, `.pth.tar`, `.bin` or `.safetensors`
  file; the state dict may sit under "state_dict", "model" or at the top level."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # noqa: PLC0415 (optional format)
    try:
      return dict(load_file(path))
    except Exception as e:
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  if not path.endswith((".pth", ".pth.tar", ".pt", ".bin")):
    raise ValueError(f"{path}: unknown checkpoint type; expected .pth, .pth.tar, .pt, "
                     ".bin or .safetensors")
  try:
    import torch  # noqa: PLC0415 (only needed for pickled checkpoints)
  except ImportError as e:
    raise ImportError(f"{path}: reading PyTorch pickles needs torch (pip install "
                      "torch==2.13.0 on the same command line as anything else); "
                      ".safetensors files do not") from e
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
  for key in _STATE_DICT_KEYS:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
      checkpoint = checkpoint[key]
      break
  if not isinstance(checkpoint, dict) or not checkpoint:
    raise ValueError(f"{path}: found no state dict (looked under {_STATE_DICT_KEYS} and "
                     "at the top level)")
  arrays = {}
  for key, value in checkpoint.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    if value.is_floating_point():
      value = value.float()  # bfloat16/float16 checkpoints: numpy has no bfloat16
    arrays[key] = value.numpy()
  return arrays


def detect_format(state_dict):
  """"mmpretrain", "sail", "timm" or "gfnet", from the key names."""
  keys = set(state_dict)
  if any(k.startswith("backbone.") for k in keys):
    return "mmpretrain"
  if "stem.conv.weight" in keys:
    return "timm"
  if "patch_embed.proj.weight" in keys and any(k.startswith("network.") for k in keys):
    return "sail"
  if "pos_embed" in keys and any(k.startswith("blocks.") for k in keys):
    return "gfnet"
  sample = sorted(keys)[:5]
  raise ValueError(f"cannot tell the checkpoint format from its keys (e.g. {sample}); "
                   f"pass --format, one of {state_dict_lib.FORMATS}")


def _family_kwargs(name, fmt, state_dict):
  """The create_model overrides a checkpoint of `fmt` implies for `name`, or an error
  if that format cannot hold that architecture."""
  module_class = models.registry_class(name)
  family = name.rsplit("_", 1)[0]
  allowed = {
      "mmpretrain": ("riformer", "poolformer"),
      "sail": ("riformer", "poolformer"),
      "timm": ("poolformer", "poolformerv2", "convformer", "caformer"),
      "gfnet": ("gfnet", "gfnet_h"),
  }[fmt]
  if family not in allowed:
    raise ValueError(f"--arch {name}: a {fmt} checkpoint holds {', '.join(allowed)} "
                     "models, not this one")
  kwargs = {}
  if fmt == "gfnet" and "pos_embed" in state_dict:
    # Fine-tuned GFNets (e.g. at 384) carry larger filters: build the model to fit.
    grid = math.isqrt(np.shape(state_dict["pos_embed"])[1])
    kwargs["img_size"] = grid * models.create_model(name).patch_size
  if module_class is metaformer.MetaFormer:
    if fmt == "timm":
      kwargs["head"] = "timm"  # timm's PoolFormer head: pool, LayerNorm, fc
    if any(".norm_reparam." in k for k in state_dict):
      kwargs["deploy"] = True
  return kwargs


def _classifier_paths(name, kwargs):
  """Param paths whose shape depends on the number of classes."""
  def shapes(num_classes):
    model = models.create_model(name, **kwargs, num_classes=num_classes)
    flat = traverse_util.flatten_dict(counting.abstract_variables(model, 64)["params"],
                                      sep="/")
    return {path: spec.shape for path, spec in flat.items()}
  one, two = shapes(1), shapes(2)
  return sorted(path for path in two if one.get(path) != two[path])


def params_from_torch(state_dict, name, fmt="auto", num_classes=None, seed=0):
  """A PyTorch state dict -> (create_model kwargs, params) for registry model `name`.

  The number of classes is read off the checkpoint's classifier. With `num_classes`
  set to another value, the classifier layer (the params whose shape depends on it)
  is dropped and freshly initialised from `seed`, for fine-tuning on a new label set;
  everything else, the head's norm and hidden layers included, is kept.
  """
  if fmt == "auto":
    fmt = detect_format(state_dict)
  if fmt not in state_dict_lib.FORMATS:
    raise ValueError(f"format {fmt!r}: expected 'auto' or one of {state_dict_lib.FORMATS}")
  kwargs = _family_kwargs(name, fmt, state_dict)
  classifier = _classifier_paths(name, kwargs)
  source_classes = None
  for path in classifier:
    key = state_dict_lib.torch_key(path, fmt)
    if key in state_dict and np.ndim(state_dict[key]) >= 1:
      source_classes = int(np.shape(state_dict[key])[0])  # (classes, ...) in PyTorch
      break
  if source_classes is None:
    wanted = [state_dict_lib.torch_key(path, fmt) for path in classifier]
    raise KeyError(f"checkpoint has no classifier: none of {wanted}")

  model = models.create_model(name, **kwargs, num_classes=source_classes)
  abstract = counting.abstract_variables(model, 64)["params"]
  params = state_dict_lib.params_from_state_dict(state_dict, abstract, fmt)
  if num_classes is not None and num_classes != source_classes:
    params = _reinitialise_classifier(name, kwargs, params, classifier, num_classes, seed)
    source_classes = num_classes
  return dict(kwargs, num_classes=source_classes), params


def _reinitialise_classifier(name, kwargs, params, classifier, num_classes, seed):
  model = models.create_model(name, **kwargs, num_classes=num_classes)
  fresh = jax.jit(model.init)(jax.random.key(seed), np.zeros((1, 64, 64, 3), np.float32))
  fresh = traverse_util.flatten_dict(jax.device_get(fresh["params"]), sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update({path: fresh[path] for path in classifier})
  return traverse_util.unflatten_dict(flat, sep="/")


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
  try:
    yield staging
    if os.path.exists(destination):
      shutil.rmtree(destination)
    os.rename(staging, destination)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)


def _local_checkpointer():
  """An orbax checkpointer that this process uses alone: converted models are small,
  host-side numpy trees, written and read by one process of a multi-host run."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


# ImageNet's channel statistics, as augment.IMAGENET_MEAN/STD (not imported from there:
# reading a model needs no TensorFlow).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocessing_record(resolution=224, crop_pct=0.9, interpolation="bicubic",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """The evaluation preprocessing a model expects, in timm's `pretrained_cfg` terms
  (`crop_pct` None: images are used at their size, only center-cropped)."""
  return {"input_size": [3, resolution, resolution], "crop_pct": crop_pct,
          "interpolation": interpolation, "mean": list(mean), "std": list(std)}


def save_pretrained(directory, name, kwargs, params, overwrite=False, **metadata):
  """Writes `params` of `create_model(name, **kwargs)` as DIR/variables + manifest."""
  model = models.create_model(name, **kwargs)  # validates name and kwargs
  _check_shapes(params, counting.abstract_variables(model, 64)["params"], directory)
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


def load_pretrained(directory, *, arch=None, sha256=None, **overrides):
  """Returns `(module, variables)` from a directory written by `convert.py`/train.py,
  or from an `hf-hub:` name or URL (converted once into a cache, see `hub`; `arch`
  names the model where the checkpoint does not, `sha256` checks a URL's download).

  `overrides` go to `create_model` on top of the manifest's kwargs; only those that
  do not change the parameters make sense (e.g. `dtype=jnp.bfloat16`,
  `drop_path_rate=0.1`). Ready for `module.apply(variables, images_nhwc, train=False)`.
  """
  directory = resolve_directory(directory, arch, sha256)
  manifest = read_manifest(directory)
  # JSON turns tuples (depths, dims) into lists; tuples keep the module hashable, so
  # it can be a static argument of jax.jit.
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in manifest["kwargs"].items()}
  model = models.create_model(manifest["model"], **{**kwargs, **overrides})
  abstract = counting.abstract_variables(model, 64)["params"]
  checkpointer = _local_checkpointer()
  target = {"params": abstract}
  path = os.path.abspath(os.path.join(directory, VARIABLES))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory}: no {VARIABLES}/ checkpoint next to the manifest")
  # orbax restores into the target's structure without comparing shapes: compare the
  # saved ones first, for an error that names the parameters.
  metadata = checkpointer.metadata(path).item_metadata
  if metadata is None:
    raise ValueError(f"{path}: the array metadata is missing or unreadable (a corrupt "
                     "or partial copy of the directory)")
  saved = metadata.tree
  _check_shapes(saved.get("params", {}), abstract, path)
  restored = checkpointer.restore(path, target)
  return model, jax.tree.map(jax.numpy.asarray, restored)


def convert_torch_checkpoint(src, dst, name=None, fmt="auto", num_classes=None, seed=0,
                             overwrite=False, sha256=None):
  """PyTorch checkpoint -> converted-model directory; returns the manifest written.

  `src` is a file, an `hf-hub:OWNER/NAME[@revision]` repository or an http(s) URL
  (riformer_jax.hub; `sha256` checks a URL's download). `name` is the registry name;
  a timm hub repository says it itself.
  """
  fetched = hub.fetch(str(src), sha256) if hub.is_remote(src) else None
  return _convert(src, fetched, dst, name, fmt, num_classes, seed, overwrite)


def _convert(src, fetched, dst, name, fmt="auto", num_classes=None, seed=0,
             overwrite=False):
  if fetched is None:
    path = os.path.abspath(src)
    metadata = {"source": path}
  else:
    if fetched.arch is not None:
      if name is not None and name != fetched.arch:
        raise ValueError(f"{src} holds a {fetched.arch}, not a {name} (--arch)")
      name = fetched.arch
    path = fetched.path
    metadata = {"source": fetched.source, "revision": fetched.revision,
                "preprocessing": fetched.preprocessing, "class_names": fetched.class_names}
    metadata = {k: v for k, v in metadata.items() if v is not None}
  if name is None:
    raise ValueError(f"{src}: the checkpoint does not say which model it holds; pass "
                     "--arch (e.g. riformer_s12)")
  state_dict = read_torch_state_dict(path)
  resolved = detect_format(state_dict) if fmt == "auto" else fmt
  kwargs, params = params_from_torch(state_dict, name, resolved, num_classes, seed)
  if len(metadata.get("class_names", ())) != kwargs["num_classes"]:
    metadata.pop("class_names", None)  # e.g. a new classifier (--num-classes)
  digest = (fetched and fetched.sha256) or hub.sha256_of(path)
  save_pretrained(dst, name, kwargs, params, overwrite=overwrite, format=resolved,
                  sha256=digest, **metadata)
  return read_manifest(dst)


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
  if not os.path.isfile(os.path.join(directory, MANIFEST)):
    _convert(source, fetched, directory, name, overwrite=True)
  return directory


def export_torch_checkpoint(src, dst, deploy=False, overwrite=False):
  """Converted RIFormer/PoolFormer directory -> MMPreTrain `{"state_dict": ...}` .pth.

  `deploy=True` re-parameterises a training-time RIFormer first; a model that is
  already in deploy form is written as it is.
  """
  import torch  # noqa: PLC0415 (export needs PyTorch; import needs only numpy)
  manifest = read_manifest(src)
  model, variables = load_pretrained(src)
  if not isinstance(model, metaformer.MetaFormer) or model.token_mixer == "identity":
    raise ValueError(f"{src}: {manifest['model']} has no MMPreTrain equivalent; "
                     "export a riformer_* or poolformer_* model")
  if model.head != "original":
    raise ValueError(f"{src}: {manifest['model']} has timm's head; MMPreTrain's "
                     "classifier expects the original one")
  params = variables["params"]
  if deploy and not model.deploy:
    if model.token_mixer != "affine":
      raise ValueError(f"{src}: --deploy needs a RIFormer (affine) model, not "
                       f"{manifest['model']}")
    params = surgery.reparameterize(params)
  exported = state_dict_lib.state_dict_from_params(jax.device_get(params), "mmpretrain")
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists; choose another --dst or pass --overwrite")
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.",
                                     dir=os.path.dirname(dst))
  os.close(handle)
  try:
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v))
                               for k, v in exported.items()},
                "meta": {"riformer_jax_manifest": manifest}}, staging)
    os.replace(staging, dst)
  finally:
    if os.path.exists(staging):
      os.remove(staging)
  return sorted(exported)
