"""PyTorch state dicts <-> our params: reading checkpoint files, telling their
format, converting into a model directory and exporting back to MMPreTrain's layout.
The key layouts themselves are in `torch_keys`.
"""

import math
import os
import tempfile

import jax
import numpy as np
from flax import traverse_util

from riformer_jax.models import metaformer, registry, surgery
from riformer_jax.weights import hub, store, torch_keys

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
  """"mmpretrain", "sail", "timm", "metaformer" or "gfnet", from the key names."""
  keys = set(state_dict)
  if any(k.startswith("backbone.") for k in keys):
    return "mmpretrain"
  if "stem.conv.weight" in keys:
    return "timm"
  if "downsample_layers.0.conv.weight" in keys:
    return "metaformer"
  if "patch_embed.proj.weight" in keys and any(k.startswith("network.") for k in keys):
    return "sail"
  if "pos_embed" in keys and any(k.startswith("blocks.") for k in keys):
    return "gfnet"
  sample = sorted(keys)[:5]
  raise ValueError(f"cannot tell the checkpoint format from its keys (e.g. {sample}); "
                   f"pass --format, one of {torch_keys.FORMATS}")


def _family_kwargs(name, fmt, state_dict):
  """The create_model overrides a checkpoint of `fmt` implies for `name`, or an error
  if that format cannot hold that architecture."""
  module_class = registry.registry_class(name)
  family = name.rsplit("_", 1)[0]
  allowed = {
      "mmpretrain": ("riformer", "poolformer"),
      "sail": ("riformer", "poolformer"),
      "timm": ("poolformer", "poolformerv2", "convformer", "caformer"),
      "metaformer": ("poolformerv2", "randformer"),
      "gfnet": ("gfnet", "gfnet_h"),
  }[fmt]
  if family not in allowed:
    raise ValueError(f"--arch {name}: a {fmt} checkpoint holds {', '.join(allowed)} "
                     "models, not this one")
  kwargs = {}
  if fmt == "gfnet" and "pos_embed" in state_dict:
    # Fine-tuned GFNets (e.g. at 384) carry larger filters: build the model to fit.
    grid = math.isqrt(np.shape(state_dict["pos_embed"])[1])
    kwargs["img_size"] = grid * registry.create_model(name).patch_size
  last_matrix = torch_keys.torch_key("stages_3/blocks_0/token_mixer/random_matrix", fmt) \
      if family == "randformer" else None
  if last_matrix in state_dict:
    # The last stage's matrix tells the input size it was made for: a side-s grid there
    # comes from 32s px (7x7 tokens: 224).
    tokens = np.shape(state_dict[last_matrix])[0]
    side = math.isqrt(tokens)
    if side * side != tokens:
      raise ValueError(f"{last_matrix} {np.shape(state_dict[last_matrix])}: expected a "
                       "square token grid")
    kwargs["img_size"] = 32 * side
  if module_class is metaformer.MetaFormer:
    if fmt == "timm":
      kwargs["head"] = "timm"  # timm's PoolFormer head: pool, LayerNorm, fc
    if any(".norm_reparam." in k for k in state_dict):
      kwargs["deploy"] = True
  return kwargs


def _classifier_paths(name, kwargs):
  """Param paths whose shape depends on the number of classes."""
  def shapes(num_classes):
    _, abstract = store.build_model(name, kwargs, num_classes=num_classes)
    flat = traverse_util.flatten_dict(abstract, sep="/")
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
  if fmt not in torch_keys.FORMATS:
    raise ValueError(f"format {fmt!r}: expected 'auto' or one of {torch_keys.FORMATS}")
  kwargs = _family_kwargs(name, fmt, state_dict)
  classifier = _classifier_paths(name, kwargs)
  source_classes = None
  for path in classifier:
    key = torch_keys.torch_key(path, fmt)
    if key in state_dict and np.ndim(state_dict[key]) >= 1:
      source_classes = int(np.shape(state_dict[key])[0])  # (classes, ...) in PyTorch
      break
  if source_classes is None:
    wanted = [torch_keys.torch_key(path, fmt) for path in classifier]
    raise KeyError(f"checkpoint has no classifier: none of {wanted}")

  _, abstract = store.build_model(name, kwargs, num_classes=source_classes)
  params = torch_keys.params_from_state_dict(state_dict, abstract, fmt)
  if num_classes is not None and num_classes != source_classes:
    params = _reinitialise_classifier(name, kwargs, params, classifier, num_classes, seed)
    source_classes = num_classes
  return dict(kwargs, num_classes=source_classes), params


def _reinitialise_classifier(name, kwargs, params, classifier, num_classes, seed):
  model = registry.create_model(name, **kwargs, num_classes=num_classes)
  size = getattr(model, "img_size", 64)  # RandFormer and GFNet run at their own size
  fresh = jax.jit(model.init)(jax.random.key(seed), np.zeros((1, size, size, 3), np.float32))
  fresh = traverse_util.flatten_dict(jax.device_get(fresh["params"]), sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update({path: fresh[path] for path in classifier})
  return traverse_util.unflatten_dict(flat, sep="/")


def convert(src, fetched, dst, name, fmt="auto", num_classes=None, seed=0,
            overwrite=False):
  """The checkpoint `src` (a local file, or downloaded as `fetched`: a `hub.Fetched`)
  -> a converted-model directory `dst`; returns the manifest written."""
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
  store.save_pretrained(dst, name, kwargs, params, overwrite=overwrite, format=resolved,
                  sha256=digest, **metadata)
  return store.read_manifest(dst)


def export_torch_checkpoint(src, dst, deploy=False, overwrite=False):
  """Converted RIFormer/PoolFormer directory -> MMPreTrain `{"state_dict": ...}` .pth.

  `deploy=True` re-parameterises a training-time RIFormer first; a model that is
  already in deploy form is written as it is.
  """
  import torch  # noqa: PLC0415 (export needs PyTorch; import needs only numpy)
  manifest = store.read_manifest(src)
  model, variables = store.load_directory(src)
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
  exported = torch_keys.state_dict_from_params(jax.device_get(params), "mmpretrain")
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
