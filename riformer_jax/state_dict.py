"""PyTorch state dicts <-> MetaFormer params, for the three key layouts in use.

- "mmpretrain": MMPreTrain's RIFormer and PoolFormer (`backbone.network.{0,2,4,6}.{j}.*`,
  `backbone.norm6`, `head.fc`), training-time or deploy (`norm_reparam`) blocks;
- "sail": sail-sg/poolformer, the original PoolFormer (`network.*`, `norm`, `head`);
- "timm": timm's `metaformer.py` (`stem.conv`, `stages.{i}.blocks.{j}`, `head.norm`).
  Its PoolFormer head is pool -> LayerNorm -> fc: build the model with `head="timm"`.
  The params do not record which head they belong to (the shapes are the same), so the
  caller pairs the format with the head variant.

Tensors are numpy arrays; nothing here imports torch. Layouts: a conv kernel is OIHW
in PyTorch and HWIO here; the MLP's 1x1 convs (O, I, 1, 1) and the classifier (O, I)
are Dense kernels (I, O) here; the affine mixer's depthwise weight (C, 1, 1, 1) is a
vector (C,) here.
"""

import re

import numpy as np
from flax import traverse_util

FORMATS = ("mmpretrain", "sail", "timm")

_BLOCK_RE = re.compile(r"stages_(\d+)/blocks_(\d+)/(.+)")
_DOWNSAMPLE_RE = re.compile(r"stages_(\d+)/downsample/(kernel|bias)")

# Inside a block: our sub-path -> (mmpretrain/sail name, timm name).
_BLOCK_KEYS = {
    "norm1": ("norm1", "norm1"),
    "norm2": ("norm2", "norm2"),
    "norm_reparam": ("norm_reparam", None),
    "token_mixer": ("token_mixer.affine", None),
    "mlp/fc1": ("mlp.fc1", "mlp.fc1"),
    "mlp/fc2": ("mlp.fc2", "mlp.fc2"),
    "layer_scale1": ("layer_scale_1", "layer_scale1.scale"),
    "layer_scale2": ("layer_scale_2", "layer_scale2.scale"),
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path, fmt):
  """The PyTorch state-dict key of our parameter `path` ("a/b/c") in format `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  timm = fmt == "timm"
  prefix = "backbone." if fmt == "mmpretrain" else ""
  if path in ("stem/kernel", "stem/bias"):
    name = "stem.conv" if timm else prefix + "patch_embed.proj"
    return f"{name}.{_LEAF[path.split('/')[1]]}"
  if match := _DOWNSAMPLE_RE.fullmatch(path):
    stage, leaf = int(match[1]), _LEAF[match[2]]
    return (f"stages.{stage}.downsample.conv.{leaf}" if timm
            else f"{prefix}network.{2 * stage - 1}.proj.{leaf}")
  if match := _BLOCK_RE.fullmatch(path):
    stage, block, rest = int(match[1]), int(match[2]), match[3]
    module, _, leaf = rest.rpartition("/")
    if not module:  # a parameter owned by the block itself: the layer scales
      module, leaf = rest, ""
    names = _BLOCK_KEYS.get(module)
    name = names and names[timm]
    if name is None:
      raise KeyError(f"{path}: no {fmt} equivalent")
    name = f"{name}.{_LEAF[leaf]}" if leaf else name
    return (f"stages.{stage}.blocks.{block}.{name}" if timm
            else f"{prefix}network.{2 * stage}.{block}.{name}")
  if path.startswith("head/"):
    module, leaf = path.split("/")[1:]
    if fmt == "mmpretrain":
      module = {"norm": "backbone.norm6", "fc": "head.fc"}[module]
    elif fmt == "sail":
      module = {"norm": "norm", "fc": "head"}[module]
    else:
      module = f"head.{module}"
    return f"{module}.{_LEAF[leaf]}"
  raise KeyError(f"{path}: not a MetaFormer parameter")


def _kind(path):
  if path.endswith("kernel"):
    if path.startswith("stem/") or "/downsample/" in path:
      return "conv"
    return "conv1x1" if "/mlp/" in path else "linear"
  return "depthwise" if path.endswith("token_mixer/scale") else "vector"


_TO_TORCH = {
    "conv": lambda v: v.transpose(3, 2, 0, 1),
    "conv1x1": lambda v: v.T[:, :, None, None],
    "linear": lambda v: v.T,
    "depthwise": lambda v: v[:, None, None, None],
    "vector": lambda v: v,
}
_FROM_TORCH = {
    "conv": lambda v: v.transpose(2, 3, 1, 0) if v.ndim == 4 else v,
    # 1x1 convs in the originals; Linear (O, I) in timm's attention stages.
    "conv1x1": lambda v: v.reshape(v.shape[:2]).T if v.ndim == 4 and v.shape[2:] == (1, 1) else v.T,
    "linear": lambda v: v.T,
    "depthwise": lambda v: v.reshape(v.shape[0]) if v.ndim == 4 and v.shape[1:] == (1, 1, 1) else v,
    "vector": lambda v: v,
}


def state_dict_from_params(params, fmt):
  """Our params -> a `{torch_key: numpy array}` dict in PyTorch layout."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {torch_key(path, fmt): _TO_TORCH[_kind(path)](np.asarray(value))
          for path, value in flat.items()}


def params_from_state_dict(state_dict, abstract_params, fmt):
  """A `{torch_key: array}` dict -> params shaped like `abstract_params`.

  `abstract_params` gives the expected tree (e.g. `jax.eval_shape(model.init, ...)
  ["params"]`). Matching is strict: missing keys, unexpected keys and shape
  mismatches raise one `KeyError`/`ValueError` listing all of them.
  """
  expected = traverse_util.flatten_dict(abstract_params, sep="/")
  keys = {path: torch_key(path, fmt) for path in expected}
  missing = sorted(k for k in keys.values() if k not in state_dict)
  unexpected = sorted(set(state_dict) - set(keys.values()))
  if missing or unexpected:
    raise KeyError(f"{fmt} state dict does not match the model: missing {missing}, "
                   f"unexpected {unexpected}")
  params, bad = {}, []
  for path, spec in expected.items():
    value = _FROM_TORCH[_kind(path)](np.asarray(state_dict[keys[path]]))
    if value.shape != tuple(spec.shape):
      bad.append(f"{keys[path]}: {np.shape(state_dict[keys[path]])} does not fit "
                 f"{path} {tuple(spec.shape)}")
    params[path] = value.astype(spec.dtype)
  if bad:
    raise ValueError("shape mismatch: " + "; ".join(bad))
  return traverse_util.unflatten_dict(params, sep="/")
