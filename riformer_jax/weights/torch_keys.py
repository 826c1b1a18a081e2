"""PyTorch state dicts <-> our params: every family's key layout, in one place.

- "mmpretrain": MMPreTrain's RIFormer and PoolFormer (`backbone.network.{0,2,4,6}.{j}.*`,
  `backbone.norm6`, `head.fc`), training-time or deploy (`norm_reparam`) blocks;
- "sail": sail-sg/poolformer, the original PoolFormer (`network.*`, `norm`, `head`);
- "timm": timm's `metaformer.py` (`stem.conv`, `stages.{i}.blocks.{j}`, `head.norm`),
  for PoolFormer v1 and for the baselines (PoolFormerV2, ConvFormer, CAFormer, whose
  param paths mirror timm's names). timm's PoolFormer v1 head is pool -> LayerNorm ->
  fc: build that model with `head="timm"`. The params do not record which head they
  belong to (the shapes are the same), so the caller pairs the format with the head.
- "metaformer": sail-sg/metaformer's `metaformer_baselines.py`, the original of the
  baselines and the only home of RandFormer (`downsample_layers.{i}`, `stages.{i}.{j}`,
  `norm`, `head`); its MLPs are linear layers on NHWC tensors. Checked against a
  reference of that code for RandFormer and PoolFormerV2 (convert.py takes those two).
- "gfnet": raoyongming/GFNet checkpoints (`ckpt["model"]`: `patch_embed(.i)`,
  `blocks.i(.j)`, `pos_embed`, `norm`, `head`), at the end of this file.

Tensors are numpy arrays; nothing here imports torch. Layouts: a conv kernel is OIHW
in PyTorch and HWIO here; 1x1 convs (O, I, 1, 1) and linear layers (O, I) are Dense
kernels (I, O) here; the affine mixer's depthwise weight (C, 1, 1, 1) is a vector (C,)
here; RandFormer's (N, N) token-mixing matrix has the same layout in both.
"""

import math
import re

import numpy as np
from flax import traverse_util

FORMATS = ("mmpretrain", "sail", "timm", "metaformer", "gfnet")

_BLOCK_RE = re.compile(r"stages_(\d+)/blocks_(\d+)/(.+)")
_DOWNSAMPLE_RE = re.compile(r"stages_(\d+)/downsample/(kernel|bias)")

# Inside a block: our sub-path -> the mmpretrain/sail name.
_BLOCK_KEYS = {
    "norm1": "norm1",
    "norm2": "norm2",
    "norm_reparam": "norm_reparam",
    "token_mixer": "token_mixer.affine",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
    "layer_scale1": "layer_scale_1",
    "layer_scale2": "layer_scale_2",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path, fmt):
  """The PyTorch state-dict key of our parameter `path` ("a/b/c") in format `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if fmt == "timm":
    return _timm_key(path)
  if fmt == "metaformer":
    return _metaformer_key(path)
  if fmt == "gfnet":
    return gfnet_torch_key(path)
  prefix = "backbone." if fmt == "mmpretrain" else ""
  if path in ("stem/kernel", "stem/bias"):
    return f"{prefix}patch_embed.proj.{_LEAF[path.split('/')[1]]}"
  if match := _DOWNSAMPLE_RE.fullmatch(path):
    stage, leaf = int(match[1]), _LEAF[match[2]]
    return f"{prefix}network.{2 * stage - 1}.proj.{leaf}"
  if match := _BLOCK_RE.fullmatch(path):
    stage, block, rest = int(match[1]), int(match[2]), match[3]
    module, _, leaf = rest.rpartition("/")
    if not module:  # a parameter owned by the block itself: the layer scales
      module, leaf = rest, ""
    name = _BLOCK_KEYS.get(module)
    if name is None:
      raise KeyError(f"{path}: no {fmt} equivalent")
    name = f"{name}.{_LEAF[leaf]}" if leaf else name
    return f"{prefix}network.{2 * stage}.{block}.{name}"
  if path.startswith("head/"):
    module, leaf = path.split("/")[1:]
    if fmt == "mmpretrain":
      module = {"norm": "backbone.norm6", "fc": "head.fc"}[module]
    else:
      module = {"norm": "norm", "fc": "head"}[module]
    return f"{module}.{_LEAF[leaf]}"
  raise KeyError(f"{path}: not a MetaFormer parameter")


def _timm_key(path):
  """timm's names are ours with dots, except that PoolFormer v1's bare stem and
  downsampling convs are `*.conv` there and block-owned vectors (layer and residual
  scales) are the `scale` of a module."""
  parts = path.split("/")
  if "norm_reparam" in parts or parts[-2] == "token_mixer":
    raise KeyError(f"{path}: no timm equivalent (RIFormer's affine mixer)")
  if parts[:-1] == ["stem"] or parts[1:-1] == ["downsample"]:
    parts.insert(-1, "conv")
  return _dotted(parts)


def _dotted(parts):
  """PyTorch's name for our path `parts` in timm's convention, which the original
  baselines share: block-owned vectors (layer and residual scales) are the `scale` of
  a module, kernels and norm scales are `weight`, indices are dotted."""
  if re.fullmatch(r"(layer|res)_scale\d", parts[-1]):
    parts = [*parts, "scale"]
  elif parts[-1] == "kernel" or parts[-1] == "scale" and "norm" in parts[-2]:
    parts = [*parts[:-1], "weight"]
  return re.sub(r"_(\d+)", r".\1", ".".join(parts))


def _metaformer_key(path):
  """The original baselines' names: timm's with `downsample_layers.{i}` for the stem
  (conv, `post_norm`) and the downsampling (`pre_norm`, conv), blocks straight under
  `stages.{i}`, and the head's LayerNorm as the model's own `norm`."""
  parts = path.split("/")
  if "norm_reparam" in parts or parts[-2:] in (["token_mixer", "scale"],
                                               ["token_mixer", "bias"]):
    raise KeyError(f"{path}: no metaformer equivalent (RIFormer's affine mixer)")
  if parts[0] == "stem":
    parts[0:2] = ["downsample_layers_0", {"conv": "conv", "norm": "post_norm"}[parts[1]]]
  elif len(parts) > 1 and parts[1] == "downsample":
    stage = parts[0].split("_")[1]
    parts[0:3] = [f"downsample_layers_{stage}",
                  {"conv": "conv", "norm": "pre_norm"}[parts[2]]]
  elif parts[0] == "head":
    parts = ["norm", parts[-1]] if parts[1] == "norm" else ["head", *parts[2:]]
  elif len(parts) > 1 and parts[1].startswith("blocks_"):
    parts[1] = parts[1][len("blocks_"):]  # stages.{i}.{j}
  return _dotted(parts)


def _block_of(path):
  return "/".join(path.split("/")[:2])


def _to_torch(path, value, fmt, attention_blocks):
  if fmt == "gfnet":
    return gfnet_to_torch(path, value)
  if value.ndim == 4:  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if path.endswith("/random_matrix"):
    return value
  if value.ndim == 2:
    # Channel MLPs and SepConv's pointwise layers are 1x1 convs in timm, except in its
    # attention stages, which run on tokens; heads are linear layers. The original
    # baselines use linear layers throughout.
    conv1x1 = (fmt != "metaformer" and ("/mlp/" in path or "/pwconv" in path)
               and _block_of(path) not in attention_blocks)
    return value.T[:, :, None, None] if conv1x1 else value.T
  if path.endswith("token_mixer/scale"):  # the affine mixer's depthwise 1x1 conv
    return value[:, None, None, None]
  return value


def _from_torch(path, value, fmt, shape):
  """The inverse of `_to_torch`, guided by the shape we expect."""
  if fmt == "gfnet":
    return gfnet_from_torch(path, value)
  if path.endswith("/random_matrix"):
    return value
  if len(shape) == 4 and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if len(shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
    return value.reshape(value.shape[:2]).T
  if len(shape) == 2 and value.ndim == 2:
    return value.T
  if len(shape) == 1 and value.ndim == 4 and value.shape[1:] == (1, 1, 1):
    return value.reshape(value.shape[0])
  return value


def state_dict_from_params(params, fmt):
  """Our params -> a `{torch_key: numpy array}` dict in PyTorch layout."""
  flat = traverse_util.flatten_dict(params, sep="/")
  attention_blocks = {_block_of(path) for path in flat if "/token_mixer/qkv/" in path}
  return {torch_key(path, fmt): _to_torch(path, np.asarray(value), fmt, attention_blocks)
          for path, value in flat.items()}


def _first(keys, shown=8):
  """`keys` for an error message: all of a few, or a count and the first ones."""
  if len(keys) <= shown:
    return str(keys)
  return f"{len(keys)} keys {keys[:shown]}..."


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
    raise KeyError(f"{fmt} state dict does not match the model: missing "
                   f"{_first(missing)}, unexpected {_first(unexpected)}")
  params, bad = {}, []
  for path, spec in expected.items():
    value = _from_torch(path, np.asarray(state_dict[keys[path]]), fmt, spec.shape)
    if value.shape != tuple(spec.shape):
      bad.append(f"{keys[path]}: {np.shape(state_dict[keys[path]])} does not fit "
                 f"{path} {tuple(spec.shape)}")
    params[path] = value.astype(spec.dtype)
  if bad:
    raise ValueError(f"shape mismatch in {len(bad)} tensors: " + "; ".join(bad[:10]))
  return traverse_util.unflatten_dict(params, sep="/")


# --- GFNet: the original repository's layout (ckpt["model"]) ---------------------------

_GFNET_TOP_LEVEL = re.compile(r"patch_embed(_\d+)?|pos_embed|blocks(_\d+){1,2}|norm|head")
_GFNET_LEAF = {"kernel": "weight", "scale": "weight"}


def gfnet_torch_key(path):
  """Our param path ("a/b/c") -> its key in an original checkpoint (`ckpt["model"]`).

  E.g. `blocks_2_5/filter/complex_weight` -> `blocks.2.5.filter.complex_weight`,
  `patch_embed_0/proj/kernel` -> `patch_embed.0.proj.weight`,
  `patch_embed/proj/kernel` -> `patch_embed.proj.weight`, `head/kernel` -> `head.weight`.
  """
  parts = path.split("/")
  if not _GFNET_TOP_LEVEL.fullmatch(parts[0]):
    raise KeyError(f"{path}: not a GFNet parameter")
  # Module indices: "blocks_2_5" -> "blocks.2.5"; "pos_embed" has no numeric suffix.
  parts = [re.sub(r"_(\d+)", r".\1", part) if re.search(r"(_\d+)+$", part) else part
           for part in parts]
  parts[-1] = _GFNET_LEAF.get(parts[-1], parts[-1])
  return ".".join(parts)


def _gfnet_kind(path):
  if path.endswith("/proj/kernel"):
    return "conv"
  if path.endswith("kernel"):
    return "linear"
  return "pos_embed" if path == "pos_embed" else "same"


def gfnet_to_torch(path, value):
  """Our array at `path` -> the original's layout (numpy)."""
  value = np.asarray(value)
  kind = _gfnet_kind(path)
  if kind == "conv":  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if kind == "linear":  # (I, O) -> (O, I)
    return value.T
  if kind == "pos_embed":  # (1, h, w, C) -> (1, h * w, C)
    return value.reshape(value.shape[0], -1, value.shape[-1])
  return value  # vectors; complex_weight has the same (h, w, C, 2) layout


def gfnet_from_torch(path, value):
  """The original's array for `path` -> our layout (numpy).

  The originals' position embeddings are square grids: (1, N, C) -> (1, s, s, C).
  """
  value = np.asarray(value)
  kind = _gfnet_kind(path)
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "linear":
    return value.T
  if kind == "pos_embed":
    side = math.isqrt(value.shape[1])
    if value.ndim != 3 or side * side != value.shape[1]:
      raise ValueError(f"pos_embed {value.shape}: expected (1, N, C) with N a square")
    return value.reshape(value.shape[0], side, side, value.shape[-1])
  return value
