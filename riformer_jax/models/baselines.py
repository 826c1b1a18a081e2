"""The "MetaFormer Baselines for Vision" family (Yu et al., TPAMI 2024): PoolFormerV2,
ConvFormer and CAFormer as timm ships them, and RandFormer, which only the original
repository (sail-sg/metaformer) has; used here as teachers. With the affine token
mixer it is also the paper's Table 9 student (RIFormer in the baselines' design,
registered as riformerv2_*), which has a deploy form like RIFormer's.

Flax Linen, NHWC, parameters named after timm's `metaformer.py` so that every key maps
mechanically (`riformer_jax.weights.torch_keys`, format "timm"):

    stem/conv/{kernel,bias}, stem/norm/scale    7x7/4 conv, then LayerNorm over C
    stages_{i}/downsample/{norm/scale,conv/*}   LayerNorm, then 3x3/2 conv (i > 0)
    stages_{i}/blocks_{j}/norm1/scale           GroupNorm(1) or LayerNorm, no bias
    stages_{i}/blocks_{j}/token_mixer/...       pooling, identity: none; sepconv:
                                                pwconv1, act1 (StarReLU), dwconv 7x7,
                                                pwconv2; attention: qkv, proj (no
                                                biases); random: random_matrix (N, N);
                                                affine: scale, bias (RIFormer's)
    stages_{i}/blocks_{j}/norm_reparam/{scale,bias}  deploy form: norm1 + affine fused
    stages_{i}/blocks_{j}/res_scale{1,2}        stages with a residual scale only
    stages_{i}/blocks_{j}/norm2/scale, mlp/{fc1,act,fc2}   StarReLU MLP, no biases
    head/norm/{scale,bias}                      pool, then LayerNorm over C
    head/fc/{kernel,bias}                       PoolFormerV2: a linear classifier
    head/fc/{fc1,norm,fc2}                      ConvFormer/CAFormer: the MLP head

All norms use eps 1e-6. A block is `res_scale1 * x + mixer(norm1(x))`, then
`res_scale2 * x + mlp(norm2(x))`: no layer scale, and a learnable per-channel scale on
the skip path in the last two stages. Blocks sow the same three taps as
`riformer_jax.models.metaformer` (`block_input`, `mixer_output`, `block_output`), so a
PoolFormerV2 teacher pairs block by block with a RIFormer student of the same size.

The deploy form (`deploy=True`, after `surgery.reparameterize`) of the affine student:
norm1 has no bias, but `s * norm1(x) + t - norm1(x)` is `gamma (s - 1) x_hat + t`, a
norm whose shift is the mixer's t; so `norm_reparam` is the same norm with a bias.
"""

import functools
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from riformer_jax.models.metaformer import (
  Affine,
  MetaFormerStage,
  Pooling,
  check_stages_and_rates,
  drop_path,
  stagewise_drop_path_rates,
  weight_init,
)

AFFINE_INITS = {"identity": nn.initializers.ones, "conv": weight_init}
TOKEN_MIXERS = ("pooling", "sepconv", "attention", "identity", "random", "affine")
NORMS = ("groupnorm", "layernorm")


def _norm(kind, dtype, name, use_bias=False):
  # Two-pass variance, as PyTorch computes it (see metaformer.GroupNorm1).
  if kind == "groupnorm":
    return nn.GroupNorm(num_groups=1, epsilon=1e-6, use_bias=use_bias,
                        use_fast_variance=False, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=1e-6, use_bias=use_bias, use_fast_variance=False,
                      dtype=dtype, name=name)


class StarReLU(nn.Module):
  """`scale * relu(x)**2 + bias` with learnable scalars."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (1,))
    bias = self.param("bias", nn.initializers.zeros, (1,))
    return (scale * jnp.square(nn.relu(x)) + bias).astype(x.dtype)


class SepConv(nn.Module):
  """MobileNetV2's inverted separable conv: 1x1 up (x2), StarReLU, 7x7 depthwise, 1x1."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    hidden = 2 * dim
    x = nn.Dense(hidden, use_bias=False, dtype=self.dtype, kernel_init=weight_init,
                 name="pwconv1")(x)
    x = StarReLU(name="act1")(x)
    x = nn.Conv(hidden, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=hidden,
                use_bias=False, dtype=self.dtype, kernel_init=weight_init,
                name="dwconv")(x)
    return nn.Dense(dim, use_bias=False, dtype=self.dtype, kernel_init=weight_init,
                    name="pwconv2")(x)


class Attention(nn.Module):
  """Multi-head self-attention over all H*W tokens, heads of width 32, no biases."""

  head_dim: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, height, width, dim = x.shape
    num_heads = max(dim // self.head_dim, 1)
    tokens = einops.rearrange(x, "n h w c -> n (h w) c")
    qkv = nn.Dense(3 * num_heads * self.head_dim, use_bias=False, dtype=self.dtype,
                   kernel_init=weight_init, name="qkv")(tokens)
    q, k, v = einops.rearrange(qkv, "n t (three heads d) -> three n t heads d",
                               three=3, heads=num_heads)
    out = jax.nn.dot_product_attention(q, k, v)
    out = einops.rearrange(out, "n t heads d -> n t (heads d)")
    out = nn.Dense(dim, use_bias=False, dtype=self.dtype, kernel_init=weight_init,
                   name="proj")(out)
    return einops.rearrange(out, "n (h w) c -> n h w c", h=height, w=width)


def _random_mixing_init(key, shape, dtype=jnp.float32):
  """The original's draw: uniform in [0, 1), then a softmax over each row."""
  return jax.nn.softmax(jax.random.uniform(key, shape, dtype), axis=-1)


class RandomMixing(nn.Module):
  """RandFormer's token mixer: token m becomes sum_n R[m, n] * token n, with R an
  (N, N) matrix over the N = H*W tokens, drawn once and frozen (no gradient reaches
  it; `train.optim.decay_mask` spares it). The matrix fixes the token count, so the
  model is built for one input size (`MetaFormerBaseline.img_size`): at 224 px, 196
  tokens in stage 3 and 49 in stage 4."""

  num_tokens: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, height, width, _ = x.shape
    if height * width != self.num_tokens:
      raise ValueError(
          f"RandFormer's random mixing in {'/'.join(self.path[:-1])} mixes "
          f"{self.num_tokens} tokens, but this input gives a {height}x{width} grid there "
          f"({height * width} tokens): feed the input size the model was built for "
          "(its img_size), or build one for this size (its own random matrices)")
    matrix = self.param("random_matrix", _random_mixing_init,
                        (self.num_tokens, self.num_tokens))
    mixed = jnp.einsum("mn,bnc->bmc", jax.lax.stop_gradient(matrix).astype(self.dtype),
                       einops.rearrange(x, "b h w c -> b (h w) c").astype(self.dtype))
    return einops.rearrange(mixed, "b (h w) c -> b h w c", h=height, w=width)


class StarMlp(nn.Module):
  """fc1 (x4), StarReLU, dropout, fc2, dropout; no biases."""

  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              kernel_init=weight_init)
    x = StarReLU(name="act")(dense(4 * dim, name="fc1")(x))
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    x = dense(dim, name="fc2")(x)
    return nn.Dropout(self.drop_rate, deterministic=not train)(x)


class BaselineBlock(nn.Module):
  """One MetaFormer-baselines block; see the module docstring. With `deploy=True`
  (affine mixer only) the mixer branch is `norm_reparam(x)`."""

  token_mixer: str
  norm: str
  res_scale: bool
  num_tokens: int = 0  # the random mixer's N
  affine_init: str = "identity"
  deploy: bool = False
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    drop = drop_path(self.drop_path_rate, train)

    def skip(name):
      if not self.res_scale:
        return x
      return self.param(name, nn.initializers.ones, (dim,)) * x

    self.sow("intermediates", "block_input", x)
    if self.deploy:
      mixed = _norm(self.norm, self.dtype, "norm_reparam", use_bias=True)(x)
    else:
      mixed = self._mixer(_norm(self.norm, self.dtype, "norm1")(x))
    self.sow("intermediates", "mixer_output", mixed)
    x = skip("res_scale1") + drop()(mixed.astype(jnp.float32))

    hidden = StarMlp(self.drop_rate, self.dtype, name="mlp")(
        _norm(self.norm, self.dtype, "norm2")(x), train)
    x = skip("res_scale2") + drop()(hidden.astype(jnp.float32))
    self.sow("intermediates", "block_output", x)
    return x

  def _mixer(self, normed):
    if self.token_mixer == "identity":
      return normed
    mixer = {"affine": functools.partial(Affine, AFFINE_INITS[self.affine_init]),
             "pooling": Pooling,
             "sepconv": functools.partial(SepConv, self.dtype),
             "random": functools.partial(RandomMixing, self.num_tokens, self.dtype),
             "attention": functools.partial(Attention, dtype=self.dtype)}[self.token_mixer]
    return mixer(name="token_mixer")(normed)


class MlpHead(nn.Module):
  """fc1 (x4), SquaredReLU, LayerNorm, dropout, fc2: ConvFormer's and CAFormer's head."""

  num_classes: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=weight_init)
    x = jnp.square(nn.relu(dense(4 * x.shape[-1], name="fc1")(x)))
    x = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     name="norm")(x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return dense(self.num_classes, name="fc2")(x)


class BaselineHead(nn.Module):
  """Global average pool, LayerNorm over C, then a linear or an MLP classifier."""

  num_classes: int
  mlp_head: bool
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     name="norm")(x)
    if self.num_classes == 0:
      return x.astype(jnp.float32)
    if self.mlp_head:
      x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
      x = MlpHead(self.num_classes, self.drop_rate, self.dtype, name="fc")(x, train)
    else:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=weight_init,
                   name="fc")(x)
    return x.astype(jnp.float32)


class MetaFormerBaseline(nn.Module):
  """PoolFormerV2 / ConvFormer / CAFormer / RandFormer classifier, and the Table 9
  student (affine mixers everywhere; `deploy=True` for its re-parameterised form).

  Attributes:
    depths: blocks per stage.
    dims: channels per stage.
    token_mixers: per stage, one of `TOKEN_MIXERS`.
    norm: "groupnorm" (GroupNorm(1): PoolFormerV2) or "layernorm" (over C).
    res_scale: per stage, whether the skip paths carry a learnable scale.
    mlp_head: the MLP head (ConvFormer, CAFormer) rather than a linear one.
    num_classes: classifier outputs; 0 returns the pooled, normalised features.
    drop_rate: dropout in the MLPs and the head.
    drop_path_rate: stochastic depth of the last block, ramped linearly from 0.
    img_size: the input size the random mixers' matrices are made for (RandFormer
      runs at this size only; the other mixers take any size).
    affine_init: the affine mixer's scale at initialisation, one of `AFFINE_INITS`.
      "identity" (scale 1) starts each block's mixer branch at 0, as v1's layer scale
      of 1e-5 does; "conv" is MMPreTrain's conv initialisation (scale near 0), which
      without a layer scale starts every block at `x - norm1(x)` and left the student
      at chance on the embedded set (docs/roadmap.md, Table 9).
    deploy: the affine student's inference form (`norm_reparam`, no mixer).
    remat: recompute each block in the backward pass instead of storing it.
    dtype: compute dtype; norm statistics and the residual stream stay float32.
  """

  depths: Sequence[int]
  dims: Sequence[int]
  token_mixers: Sequence[str] = ("pooling",) * 4
  norm: str = "groupnorm"
  res_scale: Sequence[bool] = (False, False, True, True)
  mlp_head: bool = False
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  img_size: int = 224
  affine_init: str = "identity"
  deploy: bool = False
  remat: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_stages_and_rates(self)
    stages = len(self.depths)
    for field in ("token_mixers", "res_scale"):
      if len(getattr(self, field)) != stages:
        raise ValueError(f"{field}={tuple(getattr(self, field))} needs one entry per "
                         f"stage ({stages})")
    bad = sorted(set(self.token_mixers) - set(TOKEN_MIXERS))
    if bad:
      raise ValueError(f"token_mixers: unknown {bad}; expected some of {TOKEN_MIXERS}")
    if self.affine_init not in AFFINE_INITS:
      raise ValueError(f"affine_init={self.affine_init!r}: expected one of "
                       f"{tuple(AFFINE_INITS)}")
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
    if self.deploy and set(self.token_mixers) != {"affine"}:
      raise ValueError(
          f"deploy=True folds the affine token mixer into norm1; token_mixers="
          f"{tuple(self.token_mixers)} have no deploy form")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    x = ConvNorm(self.dims[0], 7, 4, 2, norm_first=False, dtype=self.dtype,
                 name="stem")(images)
    for i, rates in enumerate(
        stagewise_drop_path_rates(self.depths, self.drop_path_rate)):
      block = functools.partial(
          nn.remat(BaselineBlock, static_argnums=(2,)) if self.remat else BaselineBlock,
          token_mixer=self.token_mixers[i], norm=self.norm,
          res_scale=self.res_scale[i], num_tokens=stage_grid(self.img_size, i) ** 2,
          affine_init=self.affine_init, deploy=self.deploy, drop_rate=self.drop_rate, dtype=self.dtype)
      downsample = functools.partial(
          ConvNorm, self.dims[i], 3, 2, 1, norm_first=True, dtype=self.dtype
      ) if i > 0 else None
      x = MetaFormerStage(rates, downsample, block, name=f"stages_{i}")(x, train)

    return BaselineHead(self.num_classes, self.mlp_head, self.drop_rate, self.dtype,
                        name="head")(x, train)


def stage_grid(size, stage):
  """The side of stage `stage`'s token grid for a `size` x `size` input: the 7x7/4 stem
  (padding 2), then a 3x3/2 convolution (padding 1) before each later stage."""
  side = (size + 2 * 2 - 7) // 4 + 1
  for _ in range(stage):
    side = (side + 2 * 1 - 3) // 2 + 1
  return side


class ConvNorm(nn.Module):
  """The stem (conv, then LayerNorm) and the downsampling layers (LayerNorm, then conv)."""

  dim: int
  kernel: int
  stride: int
  padding: int
  norm_first: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = (self.padding, self.padding)
    conv = nn.Conv(self.dim, (self.kernel, self.kernel), strides=self.stride,
                   padding=(pad, pad), dtype=self.dtype, kernel_init=weight_init,
                   name="conv")
    norm = _norm("layernorm", self.dtype, "norm")
    return conv(norm(x)) if self.norm_first else norm(conv(x))
