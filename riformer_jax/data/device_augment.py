"""RandAugment and AutoAugment in the jitted train step: batched JAX on uint8 images.

On the host (`augment.auto_augment`, TensorFlow inside tf.data) these operations cost
3-4 ms of CPU per image, as much as decoding and cropping together (docs/data.md);
on an accelerator they are a few elementwise passes, one per-image reduction and one
gather per layer. This module runs timm's operations on a uint8 batch [B, H, W, 3]
after the host's crop, resize and flip, before `mixup.finish_batch` normalises and
erases: the order of timm's recipe.

Semantics are the host path's (`augment`: each operation follows the PIL function timm calls, with
the same magnitude-to-argument functions, noise, clipping, probability and fill;
tests/test_augment.py compares each with PIL and the sampling with timm's),
so the two paths differ only in their random draws. Draws are per image, from a key
that the train step derives from (seed, step): a resumed run redraws exactly.

Under `vmap` a `lax.switch` on a per-image index computes every branch and selects;
a layer therefore costs the sum of its candidate operations (docs/data.md measures
it against the step). Out-of-image pixels of geometric operations take the fill
colour; interpolation is bilinear, as on the host path.
"""

import math
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from riformer_jax.data import policies

# numpy, not jax, constants: importing must not start a backend (multi-host set-up).
_CHANNEL_OFFSETS = np.array([0, 256, 512], np.int32)


# ---------------------------------------------------------------- operations
# Each takes one uint8 HWC image and its argument (a traced scalar), returns uint8.


def _to_uint8_floor(x):
  """PIL's float-to-uint8 in blends and filters: truncate, then clip."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


def _grayscale(x):
  """PIL's RGB -> L (ITU-R 601-2 in 16-bit fixed point); int32 HW."""
  x = x.astype(jnp.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _product(factor, n):
  """`factor * n` rounded to float32, as PIL and TensorFlow's kernels round it, for
  integer-valued `n` below 4096 in magnitude. XLA contracts a product and a following
  add into one fused multiply-add (one rounding), which moves a sum that lands on an
  integer (a blend's level, a pixel's edge) across it. So the product is formed from
  two exact ones: `factor` split into 12-bit halves, each times a 12-bit `n` is
  exact, and their sum is the product rounded once, fused or not."""
  factor = jnp.asarray(factor, jnp.float32)
  high = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(factor, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
  return high * n + (factor - high) * n


def _blend(degenerate, image, factor):
  """PIL's `blend` of two uint8 images: `floor(d + f * (x - d))` in float32."""
  degenerate = jnp.asarray(degenerate).astype(jnp.int32)
  difference = (image.astype(jnp.int32) - degenerate).astype(jnp.float32)
  return _to_uint8_floor(degenerate.astype(jnp.float32) + _product(factor, difference))


def _apply_tables(image, tables):
  """One 256-level table per channel ([3, 256] int32), as PIL's `Image.point`."""
  flat = jnp.clip(tables, 0, 255).astype(jnp.uint8).reshape(-1)
  return flat[image.astype(jnp.int32) + _CHANNEL_OFFSETS]


_LEVELS = np.arange(256, dtype=np.int32)


def auto_contrast(image, _=None):
  x = image.astype(jnp.float32)
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  stretch = hi > lo
  scale = jnp.where(stretch, 255.0 / jnp.maximum(hi - lo, 1.0), 1.0)
  offset = jnp.where(stretch, lo * scale, 0.0)
  table = jnp.floor(_LEVELS[None, :].astype(jnp.float32) * scale[:, None] - offset[:, None])
  return _apply_tables(image, table.astype(jnp.int32))


def equalize(image, _=None):
  """ImageOps.equalize per channel, in PIL's integer arithmetic."""
  index = (image.astype(jnp.int32) + _CHANNEL_OFFSETS).reshape(-1)
  hist = jnp.zeros(768, jnp.int32).at[index].add(1).reshape(3, 256)
  nonzero = hist > 0
  last = 255 - jnp.argmax(nonzero[:, ::-1], axis=1)
  last_count = jnp.take_along_axis(hist, last[:, None], axis=1)[:, 0]
  step = (hist.sum(axis=1) - last_count) // 255
  cumulative = jnp.cumsum(hist, axis=1) - hist
  safe_step = jnp.maximum(step, 1)[:, None]
  table = (safe_step // 2 + cumulative) // safe_step
  keep = (nonzero.sum(axis=1) <= 1) | (step == 0)
  return _apply_tables(image, jnp.where(keep[:, None], _LEVELS[None, :], table))


def invert(image, _=None):
  return 255 - image


def posterize(image, bits):
  bits = jnp.asarray(bits, jnp.int32)
  mask = (~((1 << (8 - jnp.minimum(bits, 8))) - 1)) & 255
  return image & mask.astype(jnp.uint8)


def solarize(image, threshold):
  return jnp.where(image.astype(jnp.int32) >= threshold, 255 - image, image)


def solarize_add(image, add, threshold=128):
  x = image.astype(jnp.int32)
  return jnp.where(x < threshold, x + jnp.minimum(add, 255 - x), x).astype(jnp.uint8)


def color(image, factor):
  return _blend(_grayscale(image)[..., None], image, factor)


def contrast(image, factor):
  mean = jnp.floor(_grayscale(image).astype(jnp.float32).mean() + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(0.0, image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, /13), its one-pixel frame kept."""
  x = image.astype(jnp.float32)
  height, width = image.shape[:2]
  total = sum(x[i:height - 2 + i, j:width - 2 + j] for i in range(3) for j in range(3))
  smooth = jnp.clip(jnp.round((total + 4.0 * x[1:-1, 1:-1]) / 13.0), 0.0, 255.0)
  degenerate = x.at[1:-1, 1:-1].set(smooth)
  return _blend(degenerate, image, factor)


def _affine(image, coefficients, fill):
  """PIL's `transform(AFFINE, (a, b, c, d, e, f))`, bilinear: output point (x, y) samples
  the input at (a x + b y + c, d x + e y + f) in PIL's continuous coordinates (pixel
  i covers [i, i + 1)); neighbours clamp at the border, points outside [0, w) x [0, h)
  take `fill`."""
  a, b, c, d, e, f = coefficients
  height, width = image.shape[:2]
  if max(height, width) > 2047:  # `_product`'s range for the doubled coordinates
    raise ValueError(f"device augmentation takes images up to 2047 px, not {image.shape}")
  # Pixel centres x + 1/2 as 2x + 1 (integers) times half the coefficient: exact.
  rows = 2 * jnp.arange(height, dtype=jnp.float32)[:, None] + 1
  cols = 2 * jnp.arange(width, dtype=jnp.float32)[None, :] + 1
  x_in = _product(a * 0.5, cols) + _product(b * 0.5, rows) + c
  y_in = _product(d * 0.5, cols) + _product(e * 0.5, rows) + f
  u, v = x_in - 0.5, y_in - 0.5  # index coordinates: pixel centres at integers
  x0, y0 = jnp.floor(u), jnp.floor(v)
  wx, wy = (u - x0)[..., None], (v - y0)[..., None]
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  pixels = image.astype(jnp.float32)

  def at(y, x):
    return pixels[jnp.clip(y, 0, height - 1), jnp.clip(x, 0, width - 1)]

  top = at(y0, x0) * (1.0 - wx) + at(y0, x0 + 1) * wx
  bottom = at(y0 + 1, x0) * (1.0 - wx) + at(y0 + 1, x0 + 1) * wx
  warped = top * (1.0 - wy) + bottom * wy
  inside = ((x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height))[..., None]
  return _to_uint8_floor(jnp.where(inside, warped, jnp.asarray(fill, jnp.float32)))


def rotate(image, degrees, fill=policies.FILL):
  """Image.rotate(degrees): counter-clockwise about the centre, same size."""
  height, width = image.shape[:2]
  cx, cy = width / 2.0, height / 2.0
  angle = -jnp.asarray(degrees, jnp.float32) * (math.pi / 180.0)
  a, b, d, e = jnp.cos(angle), jnp.sin(angle), -jnp.sin(angle), jnp.cos(angle)
  return _affine(image, (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy), fill)


def shear_x(image, factor, fill=policies.FILL):
  return _affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill=policies.FILL):
  return _affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x_rel(image, fraction, fill=policies.FILL):
  return _affine(image, (1.0, 0.0, fraction * image.shape[1], 0.0, 1.0, 0.0), fill)


def translate_y_rel(image, fraction, fill=policies.FILL):
  return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, fraction * image.shape[0]), fill)


# ---------------------------------------------------------------- magnitudes


def _int(x):
  """Python's int() on a non-negative float."""
  return jnp.floor(x).astype(jnp.int32)


_OPERATIONS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Rotate": rotate, "Posterize": posterize, "PosterizeIncreasing": posterize,
    "PosterizeOriginal": posterize, "Solarize": solarize, "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add, "Color": color, "ColorIncreasing": color,
    "Contrast": contrast, "ContrastIncreasing": contrast, "Brightness": brightness,
    "BrightnessIncreasing": brightness, "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel,
}
_LEVEL_FUNCTIONS = policies.level_functions(jnp.minimum, jnp.maximum, _int)
# name: (operation, (magnitude, sign) -> argument), as `augment.OPS` on the host.
OPS = {name: (op, _LEVEL_FUNCTIONS[name]) for name, op in _OPERATIONS.items()}
_GEOMETRIC = (rotate, shear_x, shear_y, translate_x_rel, translate_y_rel)


# ---------------------------------------------------------------- sampling


class Plan(NamedTuple):
  """A parsed spec as arrays: layer l of an image runs `names[op]` with probability
  `prob` at magnitude `magnitude` (before noise). RandAugment draws `op` uniformly
  per layer; AutoAugment draws one of `policy_ops`' rows per image."""

  names: Tuple[str, ...]
  num_layers: int
  # AutoAugment's sub-policies as [P][L] tuples (hashable: a Plan is a static argument)
  policy_ops: Tuple = ()
  policy_probs: Tuple = ()
  policy_magnitudes: Tuple = ()
  config: policies.AugmentConfig = policies.AugmentConfig("rand")


def plan(spec) -> Plan:
  """`spec` (a timm string or `policies.AugmentConfig`) as a `Plan`."""
  config = policies.parse_auto_augment(spec) if isinstance(spec, str) else spec
  if config.kind == "rand":
    return Plan(tuple(config.ops), config.num_layers, config=config)
  names = tuple(sorted({name for sub in config.policy for name, _, _ in sub}))
  layers = max(len(sub) for sub in config.policy)
  if any(len(sub) != layers for sub in config.policy):
    raise ValueError("AutoAugment sub-policies of different lengths are not supported")
  return Plan(names, layers,
              tuple(tuple(names.index(n) for n, _, _ in sub) for sub in config.policy),
              tuple(tuple(float(p) for _, p, _ in sub) for sub in config.policy),
              tuple(tuple(float(m) for _, _, m in sub) for sub in config.policy), config)


class Draws(NamedTuple):
  """Per image and layer ([B, L]): which operation, whether it runs, its magnitude
  after noise and clipping, and the sign of signed arguments (timm's random negation)."""

  op: jax.Array
  apply: jax.Array
  magnitude: jax.Array
  sign: jax.Array


def sample(key, batch_size: int, the_plan: Plan) -> Draws:
  """timm's draws for `batch_size` images (RandAugment's `np.random.choice` with
  replacement, AugmentOp's `random() > prob` skip, Gaussian magnitude noise clipped
  to [0, magnitude_max], or uniform in [0, m] for an infinite std, and
  `random() > 0.5` negation)."""
  config = the_plan.config
  shape = (batch_size, the_plan.num_layers)
  op_key, apply_key, noise_key, sign_key = jax.random.split(key, 4)
  if config.kind == "rand":
    op = jax.random.randint(op_key, shape, 0, len(the_plan.names))
    prob = jnp.full(shape, config.prob, jnp.float32)
    magnitude = jnp.full(shape, config.magnitude, jnp.float32)
  else:
    row = jax.random.randint(op_key, (batch_size,), 0, len(the_plan.policy_ops))
    op = jnp.asarray(the_plan.policy_ops, jnp.int32)[row]
    prob = jnp.asarray(the_plan.policy_probs, jnp.float32)[row]
    magnitude = jnp.asarray(the_plan.policy_magnitudes, jnp.float32)[row]
  apply = jax.random.uniform(apply_key, shape) <= prob
  if config.magnitude_std == math.inf:
    magnitude = jax.random.uniform(noise_key, shape) * magnitude
  elif config.magnitude_std > 0:
    magnitude = magnitude + config.magnitude_std * jax.random.normal(noise_key, shape)
  magnitude = jnp.clip(magnitude, 0.0, config.magnitude_max)
  sign = jnp.where(jax.random.uniform(sign_key, shape) > 0.5, -1.0, 1.0)
  return Draws(op.astype(jnp.int32), apply, magnitude, sign)


def _branch(name, fill):
  op, level = OPS[name]
  extra = {"fill": fill} if op in _GEOMETRIC else {}
  return lambda image, m, sign: op(image, level(m, sign), **extra)


def apply(images, draws: Draws, the_plan: Plan, fill: Sequence[int] = policies.FILL):
  """The drawn operations on uint8 [B, H, W, 3] images, layer after layer."""
  branches = [_branch(name, tuple(fill)) for name in the_plan.names]

  def one_image(image, op, run, magnitude, sign):
    for layer in range(the_plan.num_layers):
      out = jax.lax.switch(op[layer], branches, image, magnitude[layer], sign[layer])
      image = jnp.where(run[layer], out, image)
    return image
  return jax.vmap(one_image)(images, *draws)


def auto_augment(key, images, spec, fill: Sequence[int] = policies.FILL):
  """RandAugment or AutoAugment (`spec`: timm's string, e.g. "rand-m9-mstd0.5-inc1",
  or a `Plan`) on a uint8 batch, every image with its own draws from `key`."""
  the_plan = spec if isinstance(spec, Plan) else plan(spec)
  return apply(images, sample(key, images.shape[0], the_plan), the_plan, fill)


# ---------------------------------------------------------------- the crop's resize


def _bicubic(x):
  """PIL's bicubic filter (Keys, a = -0.5)."""
  x = jnp.abs(x)
  a = -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _resize_weights(in_size, out_total, out_count, canvas, first_output=0,
                    window_start=0):
  """PIL's resampling coefficients, as a dense [out_count, canvas] matrix, for output
  samples [first_output, first_output + out_count) of resizing `in_size` input
  samples to `out_total` (all traced int32), the input being the canvas's window that
  starts at input sample `window_start`: the kernel widened by the scale when
  shrinking (antialiasing), cut to the taps PIL uses inside [0, in_size) and
  normalised; taps outside the window (the canvas's padding) get weight 0."""
  in_f = in_size.astype(jnp.float32)
  scale = in_f / jnp.asarray(out_total, jnp.float32)
  filter_scale = jnp.maximum(scale, 1.0)
  support = 2.0 * filter_scale
  centre = (jnp.arange(out_count, dtype=jnp.float32) + first_output + 0.5) * scale
  first = jnp.maximum(jnp.floor(centre - support + 0.5), 0.0)
  stop = jnp.minimum(jnp.floor(centre + support + 0.5), in_f)
  taps = jnp.arange(canvas, dtype=jnp.float32)[None, :] + window_start
  weights = _bicubic((taps - centre[:, None] + 0.5) / filter_scale)
  weights = jnp.where((taps >= first[:, None]) & (taps < stop[:, None]), weights, 0.0)
  return weights / weights.sum(axis=1, keepdims=True)


def _pass(weights, x, axis):
  spec = "oh,hwc->owc" if axis == 0 else "ow,hwc->hoc"
  return jnp.einsum(spec, weights, x, precision=jax.lax.Precision.HIGHEST)


def resize_windows(canvases, sizes, out_size: int):
  """Each image's window [0:h, 0:w] of its uint8 canvas [B, C, C, 3] (`sizes` int32
  [B, 2] = (h, w)) resized to `out_size` square with PIL's bicubic kernel and
  antialiasing, as the host path's one float pass (`augment.resize(exact=False)`);
  uint8 out. Two matrix products per image with exact float32 (`HIGHEST`: no
  TF32/bfloat16 passes on GPU/TPU)."""
  canvas = canvases.shape[1]

  def one(image, size):
    rows = _resize_weights(size[0], out_size, out_size, canvas)
    cols = _resize_weights(size[1], out_size, out_size, canvas)
    x = _pass(cols, _pass(rows, image.astype(jnp.float32), 0), 1)
    return jnp.clip(jnp.round(x), 0.0, 255.0).astype(jnp.uint8)
  return jax.vmap(one)(canvases, sizes)


def resize_eval_windows(canvases, geometry, size: int):
  """The evaluation's centre crops from their JPEG windows (`pipeline.eval_batches`
  with a canvas): each image resized to (new_h, new_w) and cropped at (top, left) as
  `pipeline.eval_preprocess` does, computing only the crop's `size` x `size` pixels,
  in PIL's two passes (width first, rounded to uint8 between: timm's evaluation
  parity). `geometry` int32 [B, 8]: (height, width, new_h, new_w, top, left, y0, x0),
  the window starting at input pixel (y0, x0). uint8 out."""
  canvas = canvases.shape[1]

  def one(image, g):
    height, width, new_h, new_w, top, left, y0, x0 = (g[i] for i in range(8))
    cols = _resize_weights(width, new_w, size, canvas, left, x0)
    rows = _resize_weights(height, new_h, size, canvas, top, y0)
    x = jnp.clip(jnp.round(_pass(cols, image.astype(jnp.float32), 1)), 0.0, 255.0)
    return jnp.clip(jnp.round(_pass(rows, x, 0)), 0.0, 255.0).astype(jnp.uint8)
  return jax.vmap(one)(canvases, geometry)
