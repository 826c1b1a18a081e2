"""GFNet and GFNet-H (Rao et al., NeurIPS 2021): the paper's logit teachers, in Flax.

Two families, as in the original code (raoyongming/GFNet, `gfnet.py`):

- `GFNet` (GFNet-Ti/XS/S/B): a 16x16/16 patch embedding, a learned position embedding,
  `depth` blocks at one resolution, no layer scale.
- `GFNetPyramid` (GFNet-H-Ti/S/B): a 4x4/4 patch embedding plus position embedding, then
  four stages separated by 2x2/2 convolutions, blocks with a layer scale `gamma`.

Block (one residual): `x + drop_path(gamma * mlp(norm2(filter(norm1(x)))))`, LayerNorm
eps 1e-6, exact GELU. The global filter is `irfft2(rfft2(x) * W, s=(H, W))` over the
token grid with `norm="ortho"`, always in float32 (also with a bfloat16 `dtype`), W a
complex (h, w // 2 + 1, C) weight stored as real and imaginary parts (h, w // 2 + 1, C, 2)
like the original `complex_weight`. Head: LayerNorm, mean over tokens, Linear;
`num_classes=0` returns the pooled features (and has no `head` params; the original
GFNet-H keeps a (0, C) Linear there). Parameters are float32; `dtype` sets the
compute dtype of the convolutions, dense layers and norm outputs; norm statistics, the
FFT and the residual stream stay float32 (see `metaformer.py`).

Parameter layout (PyTorch key via `torch_key`):

    patch_embed/proj/{kernel,bias}            GFNet; GFNet-H: patch_embed_{i}/proj/...
    pos_embed                                 (1, h, w, C), torch (1, h * w, C)
    blocks_{j}/...                            GFNet; GFNet-H: blocks_{i}_{j}/...
        norm1/{scale,bias}, filter/complex_weight, norm2/{scale,bias},
        mlp/fc{1,2}/{kernel,bias}, gamma (GFNet-H only)
    norm/{scale,bias}, head/{kernel,bias}

Taps: every block sows into "intermediates", in NHWC like the MetaFormer taps,
`block_input`, `mixer_output` and `block_output`. A GFNet block has no residual
around its token mixer, so `mixer_output` holds `filter(norm1(x))`: the global filter's
output (float32), before norm2, the MLP, gamma and the block's single residual; there
is no "minus the input" to subtract, unlike the MetaFormer mixers.

Resolution. The filters and the position embedding have the size of the training
resolution (`img_size`, 224 for every released model: GFNet-H filters (56, 29),
(28, 15), (14, 8), (7, 4), pos_embed 56x56; GFNet filters (14, 8), pos_embed 14x14).
The original modules only run at the `img_size` they were built with (the patch
embedding asserts the input size, the filter product does not broadcast otherwise).
To fine-tune at 384, `main_gfnet.py --finetune` builds the model at 384 and resizes the
224 checkpoint while loading it:
  - `pos_embed` (1, N, C): as an s x s image with C channels, bicubic
    (`F.interpolate`, align_corners=False) to `input_size // patch_size` squared;
  - every `complex_weight` (h, w, C, 2): as an h x w image with 2C channels (real and
    imaginary parts resized independently), bicubic with align_corners=True, to
    (h * new // orig, that // 2 + 1), new and orig being the pos_embed grid sizes.
    It resamples the half spectrum like an image, which is not a frequency-correct
    resampling (rows hold frequencies 0..h/2 and then the negative ones), but it is
    what the released 384 models started from.
Both are torch's bicubic (Keys kernel, a = -0.75, clamped borders, no antialiasing),
reproduced here with separable interpolation matrices.

We do the same in two places:
  (a) at run time: when the token grid of a stage differs from its parameters, the
      module resizes the filter to (H, W // 2 + 1) and the position embedding to the
      grid (the loader's sizes for square inputs), on the fly, with exactly the
      loader's interpolation. So, with `model_384 = create_model(name, img_size=384)`,
      `model.apply(params_224, images_384)` equals
      `model_384.apply(resize_gfnet_params(params_224, 384), images_384)`: one function,
      whichever way the weights are adapted, and the starting point of the original's
      fine-tuning. (A frequency-correct alternative, zero-padding the circular spatial
      kernel, would match no released weights.) Non-square inputs work too;
  (b) once, on the params: `resize_gfnet_params(params, resolution)` returns the
      params of a model built with `img_size=resolution` (the original's loader);
      cheaper than (a) when a new resolution is used for many steps.
      `params_resolution(params)` gives back the `img_size` that params fit.

Registry: `SIZES[name]` are the constructor kwargs of the released models,
`CLASSES[name]` their class (`GFNet` or `GFNetPyramid`), `create_model(name)`
builds one, `PARAM_COUNTS[name]` is the original's count at 224 with 1000 classes.
The original checkpoints' key layout is `riformer_jax.weights.torch_keys`'s "gfnet"
format.
"""

import functools
import math
import re
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from riformer_jax.models.metaformer import (
  Mlp,
  drop_path,
  stagewise_drop_path_rates,
  weight_init,
)

# Constructor kwargs of the released models, as `main_gfnet.py` builds them (training
# drop-path rates included; GFNet-Ti/XS pass none, so 0). Exact parameter counts at 224
# with 1000 classes, from the original code; the paper and README round them to
# 7M / 16M / 25M / 43M / 15M / 32M / 54M.
SIZES = {
    "gfnet_ti": dict(dim=256, depth=12, mlp_ratio=4.0, drop_path_rate=0.0),
    "gfnet_xs": dict(dim=384, depth=12, mlp_ratio=4.0, drop_path_rate=0.0),
    "gfnet_s": dict(dim=384, depth=19, mlp_ratio=4.0, drop_path_rate=0.15),
    "gfnet_b": dict(dim=512, depth=19, mlp_ratio=4.0, drop_path_rate=0.25),
    "gfnet_h_ti": dict(dims=(64, 128, 256, 512), depths=(3, 3, 10, 3),
                       mlp_ratios=(4.0,) * 4, init_values=1e-3, drop_path_rate=0.1),
    "gfnet_h_s": dict(dims=(96, 192, 384, 768), depths=(3, 3, 10, 3),
                      mlp_ratios=(4.0,) * 4, init_values=1e-5, drop_path_rate=0.2),
    "gfnet_h_b": dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3),
                      mlp_ratios=(4.0,) * 4, init_values=1e-6, drop_path_rate=0.4),
}
PARAM_COUNTS = {
    "gfnet_ti": 7_511_784,
    "gfnet_xs": 15_985_768,
    "gfnet_s": 24_869_608,
    "gfnet_b": 43_120_616,
    "gfnet_h_ti": 15_085_096,
    "gfnet_h_s": 32_162_632,
    "gfnet_h_b": 53_744_200,
}

LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False)


def _pair(size):
  return (size, size) if isinstance(size, int) else tuple(size)


# --- torch-compatible bicubic resizing ------------------------------------------------

def _cubic(x, a=-0.75):
  """Keys' cubic convolution kernel with torch's a = -0.75 (jax.image uses -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interpolation_matrix(in_size, out_size, align_corners):
  """(out_size, in_size) matrix of torch's 1-D bicubic interpolation (no antialias).

  Sources outside the input take the border value, as `F.interpolate` does.
  """
  out = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = out * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
  else:
    src = (out + 0.5) * (in_size / out_size) - 0.5  # not clamped at 0 for cubic
  base = np.floor(src)
  matrix = np.zeros((out_size, in_size))
  for k in range(-1, 3):
    index = np.clip(base + k, 0, in_size - 1).astype(int)
    np.add.at(matrix, (np.arange(out_size), index), _cubic(src - (base + k)))
  return matrix


def bicubic_resize(x, size, align_corners):
  """Resize axes 0 and 1 of `x` to `size` like torch's bicubic `F.interpolate`."""
  (in_h, in_w), (out_h, out_w) = x.shape[:2], size
  if (in_h, in_w) == (out_h, out_w):
    return x
  rows = jnp.asarray(interpolation_matrix(in_h, out_h, align_corners), jnp.float32)
  cols = jnp.asarray(interpolation_matrix(in_w, out_w, align_corners), jnp.float32)
  return jnp.einsum("ah,bw,hw...->ab...", rows, cols, x.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def resize_filter(complex_weight, grid):
  """A (h, w, C, 2) filter for an H x W token grid: (H, W // 2 + 1), as the loader."""
  return bicubic_resize(complex_weight, (grid[0], grid[1] // 2 + 1), align_corners=True)


def resize_pos_embed(pos_embed, grid):
  """(1, h, w, C) -> (1, H, W, C), bicubic without aligned corners, as the loader."""
  return bicubic_resize(pos_embed[0], tuple(grid), align_corners=False)[None]


def stage_grids(resolution, patch_size, num_stages):
  """Token grid of every stage: patch embedding, then 2x2/2 convs (floor division)."""
  height, width = _pair(resolution)
  grid = (height // patch_size, width // patch_size)
  grids = []
  for _ in range(num_stages):
    grids.append(grid)
    grid = (grid[0] // 2, grid[1] // 2)
  return grids


# --- modules ---------------------------------------------------------------------------

def _torch_conv_init(fan_in):
  """PyTorch's default Conv2d init (kaiming_uniform(a=sqrt(5))): U(+-1/sqrt(fan_in)).

  GFNet's `_init_weights` only touches Linear and LayerNorm, so its convs keep it.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return uniform, uniform


class PatchEmbed(nn.Module):
  """Non-overlapping `patch x patch` conv, stride `patch` (stem and downsampling)."""

  dim: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel_init, bias_init = _torch_conv_init(self.patch * self.patch * x.shape[-1])
    return nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch),
                   padding="VALID", dtype=self.dtype, kernel_init=kernel_init,
                   bias_init=bias_init, name="proj")(x)


class GlobalFilter(nn.Module):
  """`irfft2(rfft2(x) * W)` over the (H, W) axes of NHWC `x`, in float32.

  `size` is the token grid the filter is learned for; other grids get the filter
  resized on the fly (module docstring).
  """

  size: Tuple[int, int]

  @nn.compact
  def __call__(self, x):
    height, width = self.size
    weight = self.param("complex_weight", nn.initializers.normal(0.02),
                        (height, width // 2 + 1, x.shape[-1], 2))
    grid = x.shape[1:3]
    if weight.shape[:2] != (grid[0], grid[1] // 2 + 1):
      weight = resize_filter(weight, grid)
    spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")
    spectrum = spectrum * jax.lax.complex(weight[..., 0], weight[..., 1])
    return jnp.fft.irfft2(spectrum, s=grid, axes=(1, 2), norm="ortho")


class GFNetBlock(nn.Module):
  """`x + drop_path(gamma * mlp(norm2(filter(norm1(x)))))`; without gamma if
  `init_values` is None."""

  filter_size: Tuple[int, int]
  mlp_ratio: float = 4.0
  init_values: Optional[float] = None
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    self.sow("intermediates", "block_input", x)
    mixed = GlobalFilter(self.filter_size, name="filter")(
        LayerNorm(dtype=self.dtype, name="norm1")(x))
    self.sow("intermediates", "mixer_output", mixed)
    y = Mlp(int(dim * self.mlp_ratio), self.drop_rate, self.dtype, name="mlp")(
        LayerNorm(dtype=self.dtype, name="norm2")(mixed), train)
    if self.init_values is not None:
      y = self.param("gamma", nn.initializers.constant(self.init_values), (dim,)) * y
    x = x + drop_path(self.drop_path_rate, train)()(y)
    self.sow("intermediates", "block_output", x)
    return x


def _check_rates(module):
  for field in ("drop_rate", "drop_path_rate", "head_drop_rate"):
    if not 0.0 <= getattr(module, field) < 1.0:
      raise ValueError(f"{field}={getattr(module, field)} must lie in [0, 1)")


def _head(module, x, train):
  """LayerNorm, mean over tokens, dropout (the original `dropcls`), Linear.

  Built inside `module`'s scope so that `norm` and `head` are top-level params.
  """
  x = LayerNorm(dtype=module.dtype, name="norm")(x)
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  x = nn.Dropout(module.head_drop_rate, deterministic=not train)(x)
  if module.num_classes == 0:
    return x
  x = nn.Dense(module.num_classes, dtype=module.dtype, kernel_init=weight_init,
               name="head")(x)
  return x.astype(jnp.float32)


def _position_embedding(module, x, grid):
  """The learned (1, h, w, C) embedding, resized on the fly to x's grid if needed."""
  pos_embed = module.param("pos_embed", weight_init, (1, *grid, x.shape[-1]))
  if pos_embed.shape[1:3] != x.shape[1:3]:
    pos_embed = resize_pos_embed(pos_embed, x.shape[1:3])
  return x + pos_embed


class GFNet(nn.Module):
  """Plain GFNet (GFNet-Ti/XS/S/B): one resolution, no layer scale.

  Attributes:
    img_size: training resolution (int or (H, W)); sets the filter and pos_embed sizes.
    patch_size: patch embedding kernel and stride.
    dim: channels.
    depth: number of blocks.
    mlp_ratio: MLP hidden width over `dim`.
    num_classes: classifier outputs; 0 returns the pooled, normalised features.
    drop_rate: dropout after the position embedding and inside the MLPs.
    drop_path_rate: stochastic depth of the last block, ramped linearly from 0.
    head_drop_rate: dropout before the classifier (the original `dropcls`).
    dtype: compute dtype (e.g. jnp.bfloat16 on accelerators).

  Call: `module.apply(variables, images_nhwc, train=False)` -> float32 logits, at any
  input resolution (module docstring); `train=True` needs `rngs={"dropout": key}`.
  """

  img_size: Union[int, Tuple[int, int]] = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_drop_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_rates(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    (grid,) = stage_grids(self.img_size, self.patch_size, 1)
    x = PatchEmbed(self.dim, self.patch_size, self.dtype, name="patch_embed")(images)
    x = _position_embedding(self, x.astype(jnp.float32), grid)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    for j, rate in enumerate(
        stagewise_drop_path_rates([self.depth], self.drop_path_rate)[0]):
      x = GFNetBlock(grid, self.mlp_ratio, None, self.drop_rate, rate, self.dtype,
                     name=f"blocks_{j}")(x, train)
    return _head(self, x, train)


class GFNetPyramid(nn.Module):
  """Hierarchical GFNet (GFNet-H-Ti/S/B): four stages, blocks with layer scale.

  Attributes:
    img_size: training resolution (int or (H, W)); sets the filter and pos_embed sizes.
    patch_size: stem kernel and stride (4 in every released model).
    dims: channels per stage.
    depths: blocks per stage.
    mlp_ratios: MLP hidden width over the stage width, per stage.
    init_values: initial layer scale `gamma`; None drops it (the original
      `no_layerscale=True`).
    num_classes: classifier outputs; 0 returns the pooled, normalised features.
    drop_rate: dropout inside the MLPs (the original defines `pos_drop` for this model
      but never applies it).
    drop_path_rate: stochastic depth of the last block, ramped linearly from 0.
    head_drop_rate: dropout before the classifier (the original `dropcls`).
    dtype: compute dtype.
  """

  img_size: Union[int, Tuple[int, int]] = 224
  patch_size: int = 4
  dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 10, 4)
  mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0, 4.0)
  init_values: Optional[float] = 1e-3
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_drop_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if not len(self.dims) == len(self.depths) == len(self.mlp_ratios) or not self.dims:
      raise ValueError(f"dims={tuple(self.dims)}, depths={tuple(self.depths)} and "
                       f"mlp_ratios={tuple(self.mlp_ratios)} must have the same length")
    _check_rates(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    grids = stage_grids(self.img_size, self.patch_size, len(self.dims))
    rates = iter(sum(stagewise_drop_path_rates(self.depths, self.drop_path_rate), []))
    x = images
    for i, (dim, depth, ratio) in enumerate(zip(self.dims, self.depths, self.mlp_ratios)):
      x = PatchEmbed(dim, self.patch_size if i == 0 else 2, self.dtype,
                     name=f"patch_embed_{i}")(x)
      x = x.astype(jnp.float32)  # the residual stream is float32
      if i == 0:
        x = _position_embedding(self, x, grids[0])
      for j in range(depth):
        x = GFNetBlock(grids[i], ratio, self.init_values, self.drop_rate, next(rates),
                       self.dtype, name=f"blocks_{i}_{j}")(x, train)
    return _head(self, x, train)


CLASSES = {name: GFNetPyramid if name.startswith("gfnet_h_") else GFNet for name in SIZES}




# --- params at a new resolution ---------------------------------------------------------

_FILTER_RE = re.compile(r"blocks_(\d+)(?:_(\d+))?/filter/complex_weight")


def resize_gfnet_params(params, resolution):
  """Params for a model built with `img_size=resolution`: the original's loader.

  The position embedding is resized bicubically (corners not aligned) to the new
  patch grid and each filter bicubically (corners aligned) to its stage's new
  (H, W // 2 + 1); everything else is kept. The patch size and the family are read
  off the params (the stem kernel, and whether blocks are numbered per stage).
  `resolution` is an int or (H, W). Returns a new pytree (float32 jax arrays for the
  resized leaves).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  stem = flat.get("patch_embed/proj/kernel", flat.get("patch_embed_0/proj/kernel"))
  if stem is None or "pos_embed" not in flat:
    raise KeyError("not GFNet params: no patch_embed kernel or pos_embed")
  num_stages = 1 + sum(bool(re.fullmatch(r"patch_embed_[1-9]\d*/proj/kernel", path))
                       for path in flat)
  grids = stage_grids(resolution, stem.shape[0], num_stages)
  out = {}
  for path, value in flat.items():
    if path == "pos_embed":
      value = resize_pos_embed(value, grids[0])
    elif match := _FILTER_RE.fullmatch(path):
      value = resize_filter(value, grids[int(match[1]) if match[2] else 0])
    out[path] = value
  return traverse_util.unflatten_dict(out, sep="/")


def params_resolution(params):
  """The `img_size` (H, W) whose model has these param shapes (e.g. 384 for params
  fine-tuned at 384): the position-embedding grid times the patch size."""
  stem = params.get("patch_embed", params.get("patch_embed_0"))
  patch = stem["proj"]["kernel"].shape[0]
  return tuple(int(n) * patch for n in params["pos_embed"].shape[1:3])
