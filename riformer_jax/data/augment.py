"""Per-image training augmentation in TensorFlow, with timm's semantics.

The paper trains with DeiT's recipe as timm implements it (docs/reference.md section 3):
random-resized crop (bicubic), horizontal flip, RandAugment `rand-m9-mstd0.5-inc1` or
an AutoAugment policy, normalisation, then random erasing with per-pixel normal
values. timm runs these on PIL images in PyTorch workers; here they are TensorFlow
ops so that they run inside `tf.data` on every host without Python in the loop.
No maintained TensorFlow library implements timm's variants (its "increasing"
operations, magnitude noise, fill colour and PIL rounding; the TF Model Garden's
RandAugment is a different algorithm), so the operations are written here, each
following the PIL function timm calls. tests/test_augment.py compares them with timm.

Every random choice is a stateless op keyed by an explicit `seed` (a shape-[2] int
tensor), so an image's augmentation is a function of (run seed, epoch, example) and
a resumed run redraws exactly what an uninterrupted one would have drawn.

Images are HWC. The photometric and geometric operations take and return uint8,
like PIL; `normalize` returns float32 and `random_erasing` works on its output.

Known differences from timm (documented in docs/data.md):
- RandAugment/AutoAugment rotate, shear and translate interpolate bilinearly
  (TensorFlow's projective transform has no bicubic mode); timm's recipe uses
  bicubic (or a random choice of bilinear/bicubic). Out-of-image pixels take the
  fill colour exactly as in PIL.
- Resizing is TensorFlow's antialiased Keys bicubic in float, in PIL's two passes
  with PIL's intermediate rounding; PIL's fixed-point weights still move a few
  pixels by one or two levels (tests/test_input_pipeline.py measures it).
- Posterize to 0 bits (PosterizeIncreasing at magnitude 10) gives a black image, as
  the Pillow of timm's time did; current Pillow raises instead.
- RandAugment's weighted op choice (`-t...` sections) is not implemented.
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from riformer_jax.data import imagenet, policies
from riformer_jax.data.policies import (  # noqa: F401  (this module's names too)
    AUTO_AUGMENT_POLICIES, FILL, RAND_INCREASING_OPS, RAND_OPS, AugmentConfig,
    parse_auto_augment)

# ---------------------------------------------------------------- randomness


def split_seed(seed, num):
  """`num` independent seeds from one (a [num, 2] tensor)."""
  return tf.random.experimental.stateless_split(seed, num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=tf.float32)


def _randint(seed, low, high):
  """Python's `random.randint(low, high)`: both ends included."""
  return tf.random.stateless_uniform(
      (), seed, minval=low, maxval=high + 1, dtype=tf.int32)


# ---------------------------------------------------------------- crop, flip, resize


def random_resized_crop_window(seed, height, width, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3), attempts=10):
  """torchvision's RandomResizedCrop.get_params: (top, left, crop_h, crop_w).

  Ten tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`;
  the first crop that fits wins, with a uniformly random position. If none fits, the
  largest centred crop whose aspect ratio is within `ratio`. All tries are drawn at
  once (vectorised); which one is used is the same rule as the loop.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(split_seed(seed, 4))
  area = h_f * w_f * _uniform(area_seed, (attempts,), scale[0], scale[1])
  log_ratio = _uniform(ratio_seed, (attempts,), math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  # Python's round() rounds half to even, like tf.round.
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w <= width) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  def sampled():
    ch, cw = crop_h[first], crop_w[first]
    return _randint(top_seed, 0, height - ch), _randint(left_seed, 0, width - cw), ch, cw

  def fallback():
    in_ratio = w_f / h_f
    lo, hi = min(ratio), max(ratio)
    cw = tf.where(in_ratio < lo, width,
                  tf.where(in_ratio > hi, tf.cast(tf.round(h_f * hi), tf.int32), width))
    ch = tf.where(in_ratio < lo, tf.cast(tf.round(w_f / lo), tf.int32), height)
    return (height - ch) // 2, (width - cw) // 2, ch, cw

  return tf.cond(tf.reduce_any(fits), sampled, fallback)


def resize(image, size, method="bicubic", exact=True):
  """Resize to `size` (h, w) as PIL does: Keys cubic (a=-0.5) widened when shrinking.

  `antialias=True` is what selects that kernel in TensorFlow for bicubic (without it
  `tf.image.resize` uses a=-0.75 and never widens it). With `exact`, like PIL, the
  width is resized first and the result rounded to uint8 before the height is
  resized: matching that intermediate rounding brings the output to within a level
  of PIL's on photos. Without it, one float pass: half the time (TensorFlow's kernel
  runs both axes in every call), a mean 0.15 level (at most 3) from PIL. Returns uint8.
  """
  size = tf.convert_to_tensor(size, tf.int32)
  x = tf.cast(image, tf.float32)
  shape = tf.shape(x)
  if not exact:
    same = (shape[0] == size[0]) & (shape[1] == size[1])
    return to_uint8(tf.cond(same, lambda: x, lambda: tf.image.resize(
        x, size, method=method, antialias=True)))

  def horizontal():
    out = tf.image.resize(x, tf.stack([shape[0], size[1]]), method=method, antialias=True)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)

  x = tf.cond(shape[1] == size[1], lambda: x, horizontal)
  x = tf.cond(shape[0] == size[0], lambda: x,
              lambda: tf.image.resize(x, size, method=method, antialias=True))
  return to_uint8(x)


def to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def random_flip(seed, image, prob=0.5):
  """Horizontal flip with probability `prob`."""
  return tf.cond(_uniform(seed) < prob, lambda: tf.reverse(image, axis=[1]),
                 lambda: image)


def normalize(image, mean=imagenet.MEAN, std=imagenet.STD):
  """uint8 HWC -> float32 `(x / 255 - mean) / std`, as ToTensor + Normalize."""
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# ---------------------------------------------------------------- random erasing


def random_erasing_box(seed, height, width, probability=0.25, min_area=0.02,
                       max_area=1 / 3, min_aspect=0.3, max_aspect=None, attempts=10):
  """timm's RandomErasing (count 1) box: int32 [top, left, height, width].

  With probability `probability`, ten tries of a box of area fraction in
  [min_area, max_area] and log-uniform aspect ratio; the first that fits strictly
  inside the image wins. A box of height 0 means nothing is erased.
  """
  max_aspect = max_aspect or 1 / min_aspect
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  apply_seed, area_seed, aspect_seed, top_seed, left_seed = tf.unstack(split_seed(seed, 5))
  area = h_f * w_f * _uniform(area_seed, (attempts,), min_area, max_area)
  aspect = tf.exp(_uniform(aspect_seed, (attempts,), math.log(min_aspect),
                           math.log(max_aspect)))
  box_h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (box_w < width) & (box_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  apply = (_uniform(apply_seed) < probability) & tf.reduce_any(fits)

  def box():
    bh, bw = box_h[first], box_w[first]
    return tf.stack([_randint(top_seed, 0, height - bh), _randint(left_seed, 0, width - bw),
                     bh, bw])

  return tf.cond(apply, box, lambda: tf.zeros([4], tf.int32))


ERASE_MODES = ("pixel", "rand", "const")


def _erasing_seeds(seed):
  """(box seed, value seed): the uint8 path draws the box the float path fills."""
  return tf.unstack(split_seed(seed, 2))


def random_erasing(seed, image, probability=0.25, min_area=0.02, max_area=1 / 3,
                   min_aspect=0.3, max_aspect=None, mode="pixel", attempts=10):
  """timm's RandomErasing (count 1) on one normalised float HWC image.

  The box is `random_erasing_box`'s; it is filled with N(0, 1) noise per pixel and
  channel (`"pixel"`), one normal colour (`"rand"`) or zeros (`"const"`). The values
  are in normalised units, which is why this runs after `normalize`
  (`mixup.finish_batch` does the same on the device, for uint8 batches).
  """
  if mode not in ERASE_MODES:
    raise ValueError(f"random erasing mode={mode!r}: expected pixel, rand or const")
  box_seed, value_seed = _erasing_seeds(seed)
  shape = tf.shape(image)
  top, left, box_h, box_w = tf.unstack(random_erasing_box(
      box_seed, shape[0], shape[1], probability, min_area, max_area, min_aspect,
      max_aspect, attempts))

  def erase():
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    if mode == "pixel":
      values = tf.random.stateless_normal(shape, value_seed, dtype=image.dtype)
    elif mode == "rand":
      values = tf.random.stateless_normal([1, 1, shape[2]], value_seed, dtype=image.dtype)
    else:
      values = tf.zeros([1, 1, shape[2]], image.dtype)
    return tf.where(inside, values, image)

  return tf.cond(box_h > 0, erase, lambda: image)


# ---------------------------------------------------------------- PIL-equivalent ops


def _grayscale(image):
  """PIL's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point, rounded."""
  x = tf.cast(image, tf.int32)
  return tf.bitwise.right_shift(
      x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000, 16)


def _blend(degenerate, image, factor):
  """PIL's Image.blend as ImageEnhance uses it: truncates toward zero, clips."""
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _lut(image, table):
  """Apply one 256-entry table per channel ([3, 256] int), as PIL's `Image.point`."""
  flat = tf.reshape(tf.cast(tf.clip_by_value(table, 0, 255), tf.uint8), [-1])
  # Index channel c's table at c * 256 + value: one gather for all three channels.
  offsets = tf.constant([0, 256, 512], tf.int32)
  return tf.gather(flat, tf.cast(image, tf.int32) + offsets)


def _histograms(image):
  """Per-channel 256-bin histograms, [3, 256], with one bincount."""
  index = tf.reshape(tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32), [-1])
  return tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])


def auto_contrast(image, _=None):
  """ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255].

  PIL builds a table of `int(level * scale - lo * scale)`; the same expression on
  the pixels gives the same values without a gather (TensorFlow's gather and
  select are several times slower than arithmetic on an image).
  """
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  stretch = hi > lo  # a flat channel is left as it is
  scale = tf.where(stretch, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(stretch, lo * scale, 0.0)
  # int() in PIL truncates toward zero; negative values then clip to 0.
  return tf.cast(tf.clip_by_value(tf.floor(x * scale - offset), 0.0, 255.0), tf.uint8)


def equalize(image, _=None):
  """ImageOps.equalize, per channel, with PIL's integer arithmetic."""
  hist = _histograms(image)
  levels = tf.range(256)[None, :]
  nonzero = hist > 0
  last = 255 - tf.argmax(tf.reverse(tf.cast(nonzero, tf.int32), [1]), axis=1,
                         output_type=tf.int32)
  last_count = tf.gather(hist, last, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
  cumulative = tf.cumsum(hist, axis=1, exclusive=True)
  safe_step = tf.maximum(step, 1)[:, None]
  table = (safe_step // 2 + cumulative) // safe_step
  keep = (tf.reduce_sum(tf.cast(nonzero, tf.int32), axis=1) <= 1) | (step == 0)
  return _lut(image, tf.where(keep[:, None], levels, table))


def invert(image, _=None):
  return 255 - image


def posterize(image, bits):
  """Keep the `bits` most significant bits (8 or more: unchanged)."""
  bits = tf.cast(bits, tf.int32)
  mask = tf.cast(tf.bitwise.bitwise_and(
      tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - tf.minimum(bits, 8)) - 1), 255), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
  """Invert the values at or above `threshold` (255 - x is x XOR 255 in uint8)."""
  at_or_above = tf.cast(image, tf.int32) >= tf.cast(threshold, tf.int32)
  return tf.bitwise.bitwise_xor(image, tf.cast(at_or_above, tf.uint8) * 255)


def solarize_add(image, add, threshold=128):
  """Add `add` to the values below `threshold`, saturating at 255."""
  x = tf.cast(image, tf.int32)
  below = tf.cast(x < threshold, tf.int32)
  return tf.cast(x + below * tf.minimum(tf.cast(add, tf.int32), 255 - x), tf.uint8)


def color(image, factor):
  """ImageEnhance.Color: blend with the grayscale image."""
  return _blend(_grayscale(image)[..., None], image, factor)


def contrast(image, factor):
  """ImageEnhance.Contrast: blend with the mean gray level (rounded)."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float32)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  """ImageEnhance.Brightness: blend with black."""
  return _blend(0.0, image, factor)


def sharpness(image, factor):
  """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (border pixels kept)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  x = tf.cast(image, tf.float32)[None]
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = to_uint8(smooth)
  # The image's own one-pixel frame around the smoothed interior.
  middle = tf.concat([image[1:-1, :1], smooth, image[1:-1, -1:]], axis=1)
  degenerate = tf.concat([image[:1], middle, image[-1:]], axis=0)
  return _blend(degenerate, image, factor)


def _affine(image, coefficients, fill=FILL):
  """PIL's `Image.transform(size, AFFINE, coefficients)`, bilinear, constant fill.

  `coefficients` (a, b, c, d, e, f) map an output point to the input point
  (a x + b y + c, d x + e y + f) in PIL's continuous coordinates, where pixel i covers
  [i, i + 1). PIL samples only at points inside [0, w) x [0, h), clamping the
  interpolation neighbours at the border, and writes the fill colour elsewhere; the
  same rule is reproduced with TensorFlow's transform in NEAREST (clamping) mode and
  an explicit inside mask.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in coefficients]
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  # Index coordinates (pixel centres at integers): shift by half a pixel both ways.
  transform = tf.stack([a, b, c + 0.5 * a + 0.5 * b - 0.5,
                        d, e, f + 0.5 * d + 0.5 * e - 0.5, 0.0, 0.0])[None]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform,
      output_shape=shape[:2], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="NEAREST")[0]
  ys = (tf.range(h_f) + 0.5)[:, None]
  xs = (tf.range(w_f) + 0.5)[None, :]
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < w_f) & (y_in >= 0) & (y_in < h_f)
  # A blend with the 0/1 mask rather than tf.where: select is slow in TensorFlow.
  inside = tf.cast(inside, tf.float32)[..., None]
  out = warped * inside + tf.constant(fill, tf.float32) * (1.0 - inside)
  # PIL's bilinear filter truncates its result.
  return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def rotate(image, degrees, fill=FILL):
  """Image.rotate(degrees): counter-clockwise about the image centre, same size."""
  shape = tf.shape(image)
  cx = tf.cast(shape[1], tf.float32) / 2.0
  cy = tf.cast(shape[0], tf.float32) / 2.0
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b = tf.cos(angle), tf.sin(angle)
  d, e = -tf.sin(angle), tf.cos(angle)
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return _affine(image, (a, b, c, d, e, f), fill)


def _shift_rows(image, pixels, fill):
  """`_affine` for a move of row y by `pixels[y]` along x (a scalar: all rows alike).

  Translations and shears sample every row at one fractional offset, so the bilinear
  sample is a blend of two shifted copies of the row (neighbours clamped at the
  border like PIL's) and the in-image test is a band per row: a third to a half of
  the time of the general warp, which computes each output pixel's position.
  """
  width = tf.shape(image)[1]
  pixels = tf.reshape(pixels, [-1, 1])  # [rows or 1, 1]
  whole = tf.floor(pixels)
  fraction = (pixels - whole)[..., None]
  source = tf.range(width)[None, :] + tf.cast(whole, tf.int32)
  x = tf.cast(image, tf.float32)
  if pixels.shape[0] == 1:  # one offset: a gather of columns
    source = source[0]
    lower = tf.gather(x, tf.clip_by_value(source, 0, width - 1), axis=1)
    upper = tf.gather(x, tf.clip_by_value(source + 1, 0, width - 1), axis=1)
  else:
    lower = tf.gather(x, tf.clip_by_value(source, 0, width - 1), axis=1, batch_dims=1)
    upper = tf.gather(x, tf.clip_by_value(source + 1, 0, width - 1), axis=1, batch_dims=1)
  out = lower * (1.0 - fraction) + upper * fraction
  centre = tf.cast(tf.range(width), tf.float32)[None, :] + 0.5 + pixels
  inside = tf.cast((centre >= 0) & (centre < tf.cast(width, tf.float32)), tf.float32)
  inside = inside[..., None]
  out = out * inside + tf.constant(fill, tf.float32) * (1.0 - inside)
  return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _transposed(op, image, *args):
  """`op` along the other axis: y becomes x and back."""
  return tf.transpose(op(tf.transpose(image, [1, 0, 2]), *args), [1, 0, 2])


def shear_x(image, factor, fill=FILL):
  """`_affine` with (1, factor, 0, 0, 1, 0): row y moves by factor x (y + 1/2)."""
  rows = tf.cast(tf.range(tf.shape(image)[0]), tf.float32) + 0.5
  return _shift_rows(image, tf.cast(factor, tf.float32) * rows, fill)


def shear_y(image, factor, fill=FILL):
  """`_affine` with (1, 0, 0, factor, 1, 0)."""
  return _transposed(shear_x, image, factor, fill)


def translate_x_rel(image, fraction, fill=FILL):
  """`_affine` with (1, 0, pixels, 0, 1, 0), pixels = fraction x width."""
  return _shift_rows(image, fraction * tf.cast(tf.shape(image)[1], tf.float32), fill)


def translate_y_rel(image, fraction, fill=FILL):
  """`_affine` with (1, 0, 0, 0, 1, pixels), pixels = fraction x height."""
  return _transposed(translate_x_rel, image, fraction, fill)


# ---------------------------------------------------------------- magnitudes


def _int(x):
  """Python's int() on a non-negative float."""
  return tf.cast(tf.floor(x), tf.int32)


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
_LEVEL_FUNCTIONS = policies.level_functions(tf.minimum, tf.maximum, _int)
# name: (operation, (magnitude, sign) -> argument), timm's ops and level functions.
OPS = {name: (op, _LEVEL_FUNCTIONS[name]) for name, op in _OPERATIONS.items()}


# ---------------------------------------------------------------- policies


def _apply_op(seed, image, name, magnitude, prob, config: AugmentConfig, fill):
  """timm's AugmentOp: with probability `prob`, the operation at a noisy magnitude."""
  apply_seed, noise_seed, sign_seed = tf.unstack(split_seed(seed, 3))
  magnitude = tf.constant(float(magnitude), tf.float32)
  if config.magnitude_std == math.inf:
    magnitude = _uniform(noise_seed, (), 0.0, magnitude)
  elif config.magnitude_std > 0:
    magnitude += config.magnitude_std * tf.random.stateless_normal((), noise_seed)
  magnitude = tf.clip_by_value(magnitude, 0.0, config.magnitude_max)
  # timm negates when random.random() > 0.5.
  sign = tf.where(_uniform(sign_seed) > 0.5, -1.0, 1.0)
  op, level_to_arg = OPS[name]
  extra = {"fill": fill} if op in (rotate, shear_x, shear_y, translate_x_rel,
                                   translate_y_rel) else {}

  def run():
    return op(image, level_to_arg(magnitude, sign), **extra)

  if prob >= 1.0:
    return run()
  # timm skips when random.random() > prob.
  return tf.cond(_uniform(apply_seed) <= prob, run, lambda: image)


def auto_augment(seed, image, config, fill=FILL):
  """RandAugment or AutoAugment (a parsed or string timm spec) on one uint8 image."""
  if isinstance(config, str):
    config = parse_auto_augment(config)
  image = tf.ensure_shape(image, [None, None, 3])
  if config.kind == "rand":
    seeds = split_seed(seed, 2 * config.num_layers)
    # Unrolled layers (each traces the 15 branches) run faster than a tf.while_loop.
    for i in range(config.num_layers):
      # Chosen uniformly with replacement (timm's np.random.choice, no weights).
      index = tf.random.stateless_uniform((), seeds[2 * i], 0, len(config.ops),
                                          dtype=tf.int32)
      branches = [
          (lambda name=name, x=image, i=i: _apply_op(
              seeds[2 * i + 1], x, name, config.magnitude, config.prob, config, fill))
          for name in config.ops]
      image = tf.ensure_shape(tf.switch_case(index, branches), [None, None, 3])
    return image
  choose_seed, op_seed = tf.unstack(split_seed(seed, 2))
  index = tf.random.stateless_uniform((), choose_seed, 0, len(config.policy), dtype=tf.int32)

  def sub_policy(steps, x=image):
    for step_seed, (name, prob, magnitude) in zip(
        tf.unstack(split_seed(op_seed, len(steps))), steps):
      x = _apply_op(step_seed, x, name, magnitude, prob, config, fill)
    return x

  branches = [lambda steps=steps: sub_policy(steps) for steps in config.policy]
  return tf.ensure_shape(tf.switch_case(index, branches), [None, None, 3])


class TrainAugment(NamedTuple):
  """The training recipe after decoding; defaults are the paper's (Table 10)."""

  size: int = 224
  scale: Tuple[float, float] = (0.08, 1.0)
  ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
  re_prob: float = 0.25
  re_mode: str = "pixel"
  mean: Sequence[float] = imagenet.MEAN
  std: Sequence[float] = imagenet.STD
  interpolation: str = "bicubic"
  # PIL's two resize passes with uint8 rounding between (`resize(exact=True)`):
  # within a level of timm's crop but twice the cost of one float pass (docs/data.md).
  exact_resize: bool = False
  # Decode JPEG crops of at least twice `size` at 1/2, 1/4 or 1/8 scale (libjpeg's
  # DCT scaling; decode.decode_image). Off by default: pixels differ a little
  # from timm's full decode, and ImageNet's ~400x350 images rarely give such crops.
  reduced_dct: bool = False
  # > 0: the host stops after the crop and flip and sends the decoded window in a
  # `canvas` x `canvas` uint8 frame with its size, for the jitted step to resize
  # (`device_augment.resize_windows`) and augment; windows larger than the frame are
  # resized here. Needs uint8 batches and no RandAugment/AutoAugment on the host.
  canvas: int = 0

  def fill(self):
    return tuple(min(255, round(255 * m)) for m in self.mean)


def no_augment(size: int) -> TrainAugment:
  """A recipe that only normalises a square image of side `size` (crop = the image).

  E.g. plain cross-entropy training on the synthetic set, whose labels flips and crops
  would corrupt; non-square images get their largest centred square, resized.
  """
  return TrainAugment(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                      auto_augment=None, re_prob=0.0)


def augment_cropped(seed, crop, recipe: TrainAugment, uint8=False):
  """Everything after the crop window: resize, flip, RA/AA, normalise, erase.

  `crop` is the uint8 HWC region chosen by `random_resized_crop_window` (decoded
  with `tf.image.decode_and_crop_jpeg` for JPEGs, so the rest is never decoded).
  Returns a float32 [size, size, 3] normalised image; with `uint8`, the uint8 image
  before normalisation and its random-erasing box instead (`random_erasing_box`,
  the box `random_erasing` would fill), for `mixup.finish_batch` on the device.
  """
  flip_seed, aa_seed, erase_seed = tf.unstack(split_seed(seed, 3))
  image = resize(crop, [recipe.size, recipe.size], recipe.interpolation,
                 exact=recipe.exact_resize)
  if recipe.hflip > 0:
    image = random_flip(flip_seed, image, recipe.hflip)
  if recipe.auto_augment:
    image = auto_augment(aa_seed, image, recipe.auto_augment, recipe.fill())
  if uint8:
    box = tf.zeros([4], tf.int32)
    if recipe.re_prob > 0:
      box = random_erasing_box(_erasing_seeds(erase_seed)[0], recipe.size, recipe.size,
                               recipe.re_prob)
    return tf.ensure_shape(image, [recipe.size, recipe.size, 3]), box
  image = normalize(image, recipe.mean, recipe.std)
  if recipe.re_prob > 0:
    image = random_erasing(erase_seed, image, recipe.re_prob, mode=recipe.re_mode)
  return tf.ensure_shape(image, [recipe.size, recipe.size, 3])


def crop_for_the_step(seed, crop, recipe: TrainAugment):
  """The host's part of the recipe when the step resizes (`recipe.canvas`): the crop
  flipped (the same draw as `augment_cropped`'s, before the resize instead of after:
  the kernel is symmetric), its (height, width), and the random-erasing box
  `augment_cropped` would draw. A crop larger than the canvas is resized here to
  `recipe.size` (its size then says so). The pipeline's `padded_batch` puts it in the
  canvas (zeros at the bottom and right): one copy instead of a pad and a batch."""
  flip_seed, _, erase_seed = tf.unstack(split_seed(seed, 3))
  if recipe.hflip > 0:
    crop = random_flip(flip_seed, crop, recipe.hflip)
  shape = tf.shape(crop)
  fits = (shape[0] <= recipe.canvas) & (shape[1] <= recipe.canvas)
  window = tf.cond(fits, lambda: crop, lambda: resize(
      crop, [recipe.size, recipe.size], recipe.interpolation, exact=recipe.exact_resize))
  box = tf.zeros([4], tf.int32)
  if recipe.re_prob > 0:
    box = random_erasing_box(_erasing_seeds(erase_seed)[0], recipe.size, recipe.size,
                             recipe.re_prob)
  return tf.ensure_shape(window, [None, None, 3]), tf.shape(window)[:2], box
