"""One MetaFormer backbone for PoolFormer (v1), RIFormer and IdentityFormer.

Flax Linen, NHWC. Parameters are float32; `dtype` sets the compute dtype of the
convolutions, dense layers and norm outputs, while norm statistics and the residual
stream stay in float32 (the layer scales start at 1e-5/1e-6: in a bfloat16 residual
stream those first updates would round away, which is also why PyTorch AMP keeps it
in float32).

Parameter layout (the PyTorch equivalents are in `riformer_jax.weights.torch_keys`):

    stem/{kernel,bias}                          7x7/4 conv, padding 2
    stages_{i}/downsample/{kernel,bias}         3x3/2 conv, padding 1 (i > 0)
    stages_{i}/blocks_{j}/norm1/{scale,bias}    GroupNorm(1)
    stages_{i}/blocks_{j}/token_mixer/{scale,bias}   RIFormer's affine only
    stages_{i}/blocks_{j}/norm_reparam/{scale,bias}  deploy form: norm1 + affine fused
    stages_{i}/blocks_{j}/norm2/{scale,bias}
    stages_{i}/blocks_{j}/mlp/fc{1,2}/{kernel,bias}
    stages_{i}/blocks_{j}/layer_scale{1,2}
    head/norm/{scale,bias}, head/fc/{kernel,bias}

Every block sows three taps into the "intermediates" collection, under the same names
in every family so that a student and a teacher of the same shape pair up block by
block: `block_input`, `mixer_output` (the token-mixer branch before layer scale, i.e.
with its "minus the input") and `block_output`. Flax only records them when the caller
passes `mutable=["intermediates"]`; otherwise `sow` does nothing.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from riformer_jax.models import activations

TOKEN_MIXERS = ("pooling", "affine", "identity")
HEADS = ("original", "timm")

# The originals draw conv and linear weights from trunc_normal(std=.02) truncated at
# +-2 in absolute value, i.e. at +-100 standard deviations.
weight_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def group_norm1_coefficients(x, scale, bias, epsilon):
  """`(centred, k, c)` such that GroupNorm(1)'s output is `centred * k + c`: `centred`
  is `x - mean` over (H, W, C) per sample, in float32, `k = scale / std` and `c = bias`
  are (N, 1, 1, C). The variance is two-pass, as PyTorch computes it: the residual
  stream of deep MetaFormers carries large per-sample means, where E[x^2] - E[x]^2
  loses digits."""
  x = x.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  variance = jnp.mean(jnp.square(centred), axis=(1, 2, 3), keepdims=True)
  return centred, scale * jax.lax.rsqrt(variance + epsilon), bias


class GroupNorm1(nn.Module):
  """GroupNorm with one group on NHWC, under flax GroupNorm's parameter names.

  Written out rather than `nn.GroupNorm(num_groups=1)`: flax centres x twice (once in
  its grouped view for the variance, once for the output), and LiteRT's converter keeps
  both full-size subtractions; here x is centred once, the per-channel factor is
  formed on the (N, 1, 1, C) statistics, and the full tensor sees one subtraction, one
  square, one multiply and one add (`group_norm1_coefficients`).
  """

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (dim,))
    bias = self.param("bias", nn.initializers.zeros, (dim,))
    centred, k, c = group_norm1_coefficients(x, scale, bias, self.epsilon)
    return (centred * k + c).astype(self.dtype)


def check_stages_and_rates(model):
  """The checks every four-stage classifier here shares, with messages naming fields."""
  depths, dims = tuple(model.depths), tuple(model.dims)
  if len(depths) != len(dims) or not depths or min(depths) < 1:
    raise ValueError(f"depths={depths} and dims={dims} must have the same, non-zero "
                     "length and at least one block per stage")
  for field in ("drop_rate", "drop_path_rate"):
    if not 0.0 <= getattr(model, field) < 1.0:
      raise ValueError(f"{field}={getattr(model, field)} must lie in [0, 1)")


def drop_path(rate, train):
  """Stochastic depth on NHWC: a Dropout factory whose mask is shared by everything
  but the batch axis, off unless `train`."""
  return functools.partial(nn.Dropout, rate, broadcast_dims=(1, 2, 3),
                           deterministic=not train)


def stagewise_drop_path_rates(depths, rate):
  """Per-stage lists of drop-path rates: `rate * k / (num_blocks - 1)` for block k."""
  total = sum(depths)
  rates = [rate * k / max(total - 1, 1) for k in range(total)]
  bounds = [sum(depths[:i]) for i in range(len(depths) + 1)]
  return [rates[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


class Pooling(nn.Module):
  """PoolFormer's mixer: 3x3 average pool (padding excluded from the count) minus x."""

  @nn.compact
  def __call__(self, x):
    # Sum the window and take the difference of two close values in float32.
    x32 = x.astype(jnp.float32)
    pooled = nn.avg_pool(x32, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                         count_include_pad=False)
    return (pooled - x32).astype(x.dtype)


class Affine(nn.Module):
  """RIFormer's training-time mixer (paper Eq. 1): `scale * x + bias - x` per channel.

  Attributes:
    scale_init: MMPreTrain initialises this depthwise 1x1 conv like every other conv
      (`weight_init`, scale near 0, so the branch starts near `-x`); `ones` starts the
      branch at 0.
  """

  scale_init: Any = weight_init

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    scale = self.param("scale", self.scale_init, (dim,))
    bias = self.param("bias", nn.initializers.zeros, (dim,))
    # Float32 parameters promote the arithmetic: s close to 1 would cancel in bfloat16.
    return (x * scale + bias - x).astype(x.dtype)


class Mlp(nn.Module):
  """Channel MLP (the originals' pair of 1x1 convs) with exact GELU and dropout."""

  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=weight_init)
    x = dense(self.hidden_dim, name="fc1")(x)
    x = activations.gelu(x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    x = dense(dim, name="fc2")(x)
    return nn.Dropout(self.drop_rate, deterministic=not train)(x)


class MetaFormerBlock(nn.Module):
  """`x + ls1 * mixer(norm1(x))`, then `x + ls2 * mlp(norm2(x))`, with drop path.

  With `deploy=True` the first branch is `ls1 * norm_reparam(x)`: RIFormer after
  `reparameterize`, whose GroupNorm absorbed the affine mixer (paper Eq. 3-4).
  """

  token_mixer: str
  deploy: bool = False
  mlp_ratio: float = 4.0
  layer_scale_init_value: float = 1e-5
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    norm = functools.partial(GroupNorm1, dtype=self.dtype)
    drop = drop_path(self.drop_path_rate, train)
    layer_scale = nn.initializers.constant(self.layer_scale_init_value)

    self.sow("intermediates", "block_input", x)
    layer_scale1 = self.param("layer_scale1", layer_scale, (dim,))
    if self.deploy:
      # The layer scale goes into the norm's per-channel factors (exact up to
      # rounding), so the full tensor sees one multiply fewer; the exporters keep
      # this form, whereas they do not fold a multiply that follows a norm.
      scale, bias = _NormParams(name="norm_reparam")(dim)
      centred, k, c = group_norm1_coefficients(x, scale, bias, 1e-5)
      self.sow("intermediates", "mixer_output", (centred * k + c).astype(self.dtype))
      x = x + drop()(centred * (layer_scale1 * k) + layer_scale1 * c)
    else:
      normed = norm(name="norm1")(x)
      if self.token_mixer == "pooling":
        mixed = Pooling(name="token_mixer")(normed)
      elif self.token_mixer == "affine":
        mixed = Affine(name="token_mixer")(normed)
      else:  # identity
        mixed = normed
      self.sow("intermediates", "mixer_output", mixed)
      x = x + drop()(layer_scale1 * mixed)

    hidden = Mlp(int(dim * self.mlp_ratio), self.drop_rate, self.dtype,
                 name="mlp")(norm(name="norm2")(x), train)
    x = x + drop()(self.param("layer_scale2", layer_scale, (dim,)) * hidden)
    self.sow("intermediates", "block_output", x)
    return x


class _NormParams(nn.Module):
  """GroupNorm's parameters without its computation, under GroupNorm's names."""

  @nn.compact
  def __call__(self, dim):
    return (self.param("scale", nn.initializers.ones, (dim,)),
            self.param("bias", nn.initializers.zeros, (dim,)))


class FusedDeployBlock(nn.Module):
  """The deploy block with both norms folded into per-channel affine maps of x.

  With per-sample, per-channel spatial means m_c and variances v_c of the block input
  x (a GroupNorm(1) needs only these), `x1 = x + ls1 * norm_reparam(x)` is `a * x + b`
  and `norm2(x1)` is `A * x + B` for (N, C) coefficients a, b, A, B: the moments of x1
  follow from those of x (mean a m + b, variance a^2 v). The block then reads x once
  more to produce both x1 and fc1's input, instead of materialising x1 and reading it
  twice for norm2's statistics. Same parameters (and names) as the deploy block;
  inference only. Exact up to float rounding: the variances combine two-pass
  per-channel variances, never E[x^2] - E[x]^2.
  """

  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0  # accepted like MetaFormerBlock's; inference has none
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if train:
      raise ValueError("the fused deploy block is for inference (train=False)")
    dim, eps = x.shape[-1], 1e-5
    gamma1, beta1 = _NormParams(name="norm_reparam")(dim)
    ls1 = self.param("layer_scale1", nn.initializers.ones, (dim,))
    gamma2, beta2 = _NormParams(name="norm2")(dim)
    ls2 = self.param("layer_scale2", nn.initializers.ones, (dim,))

    x = x.astype(jnp.float32)
    means = jnp.mean(x, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
    variances = jnp.mean(jnp.square(x - means), axis=(1, 2), keepdims=True)

    def group_stats(m, v):  # GroupNorm(1) statistics from per-channel ones
      mu = jnp.mean(m, axis=-1, keepdims=True)
      var = jnp.mean(v + jnp.square(m - mu), axis=-1, keepdims=True)
      return mu, jax.lax.rsqrt(var + eps)

    mu1, inv1 = group_stats(means, variances)
    a = 1.0 + ls1 * gamma1 * inv1
    b = ls1 * (beta1 - gamma1 * mu1 * inv1)
    mu2, inv2 = group_stats(a * means + b, jnp.square(a) * variances)
    big_a = gamma2 * a * inv2
    big_b = gamma2 * (b - mu2) * inv2 + beta2

    self.sow("intermediates", "block_input", x)
    self.sow("intermediates", "mixer_output", gamma1 * (x - mu1) * inv1 + beta1)
    residual = a * x + b
    hidden = Mlp(int(dim * self.mlp_ratio), 0.0, self.dtype, name="mlp")(
        (big_a * x + big_b).astype(self.dtype), train)
    x = residual + ls2 * hidden
    self.sow("intermediates", "block_output", x)
    return x


class MetaFormerStage(nn.Module):
  """An optional downsampling layer followed by `len(drop_path_rates)` blocks."""

  drop_path_rates: Sequence[float]
  downsample: Optional[Callable[..., nn.Module]]  # a module factory taking `name`
  block: functools.partial  # a block class with everything but drop_path_rate set

  @nn.compact
  def __call__(self, x, train: bool):
    if self.downsample is not None:
      x = self.downsample(name="downsample")(x)
    x = x.astype(jnp.float32)  # the residual stream is float32 (module docstring)
    for j, rate in enumerate(self.drop_path_rates):
      x = self.block(drop_path_rate=rate, name=f"blocks_{j}")(x, train)
    return x


class MetaFormer(nn.Module):
  """MetaFormer classifier with a pluggable token mixer.

  Attributes:
    depths: blocks per stage.
    dims: channels per stage.
    token_mixer: "pooling" (PoolFormer), "affine" (RIFormer at training time) or
      "identity" (IdentityFormer: the deploy structure, trained directly).
    deploy: RIFormer's inference form (`norm_reparam`, no mixer); needs "affine".
    mlp_ratio: MLP hidden width over block width.
    layer_scale_init_value: initial value of both per-channel layer scales.
    num_classes: classifier outputs; 0 returns the pooled, normalised features.
    drop_rate: dropout inside the MLPs.
    drop_path_rate: stochastic depth of the last block, ramped linearly from 0.
    head: "original" (GroupNorm(1), pool, fc: sail-sg, MMPreTrain, RIFormer) or
      "timm" (pool, LayerNorm over C with eps 1e-6, fc: timm's PoolFormer port).
    dtype: compute dtype (e.g. jnp.bfloat16 on accelerators).
    remat: recompute each block in the backward pass instead of storing it.
    fused: with deploy=True, `FusedDeployBlock`s (same params; inference only).

  Call: `module.apply(variables, images_nhwc, train=False)` returns float32 logits;
  `train=True` enables dropout and drop path and needs `rngs={"dropout": key}`.
  """

  depths: Sequence[int]
  dims: Sequence[int]
  token_mixer: str = "pooling"
  deploy: bool = False
  mlp_ratio: float = 4.0
  layer_scale_init_value: float = 1e-5
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  head: str = "original"
  dtype: Any = jnp.float32
  remat: bool = False
  fused: bool = False

  def __post_init__(self):
    if self.token_mixer not in TOKEN_MIXERS:
      raise ValueError(f"token_mixer={self.token_mixer!r}: expected one of {TOKEN_MIXERS}")
    if self.head not in HEADS:
      raise ValueError(f"head={self.head!r}: expected one of {HEADS}")
    if self.fused and not self.deploy:
      raise ValueError("fused=True folds the deploy form's norms; it needs deploy=True")
    if self.deploy and self.token_mixer != "affine":
      raise ValueError(
          f"deploy=True fuses RIFormer's affine mixer into norm1; token_mixer="
          f"{self.token_mixer!r} has no deploy form (IdentityFormer already is one)")
    check_stages_and_rates(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    x = nn.Conv(self.dims[0], (7, 7), strides=(4, 4), padding=((2, 2), (2, 2)),
                dtype=self.dtype, kernel_init=weight_init, name="stem")(images)
    # Rematerialisation keeps only each block's input for the backward pass
    # (`train`, argument 2 counting self, is a Python bool).
    block_class = nn.remat(MetaFormerBlock, static_argnums=(2,)) if self.remat \
        else MetaFormerBlock
    block = functools.partial(
        block_class, token_mixer=self.token_mixer, deploy=self.deploy,
        mlp_ratio=self.mlp_ratio, layer_scale_init_value=self.layer_scale_init_value,
        drop_rate=self.drop_rate, dtype=self.dtype)
    if self.fused:
      block = functools.partial(FusedDeployBlock, mlp_ratio=self.mlp_ratio,
                                dtype=self.dtype)
    for i, (dim, rates) in enumerate(zip(
        self.dims, stagewise_drop_path_rates(self.depths, self.drop_path_rate))):
      downsample = functools.partial(
          nn.Conv, dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
          dtype=self.dtype, kernel_init=weight_init) if i > 0 else None
      x = MetaFormerStage(rates, downsample, block, name=f"stages_{i}")(x, train)
    return ClassifierHead(self.num_classes, self.head, self.dtype, name="head")(x)


class ClassifierHead(nn.Module):
  """Norm and global average pool (in the order `variant` says), then a linear layer."""

  num_classes: int
  variant: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.variant == "original":
      x = GroupNorm1(dtype=self.dtype, name="norm")(x)
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    else:
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      x = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                       name="norm")(x)
    if self.num_classes == 0:
      return x.astype(jnp.float32)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=weight_init,
                 name="fc")(x)
    return x.astype(jnp.float32)
