"""Image decoding for the pipeline: JPEG with the crop window decoded alone (and,
opt-in, at a reduced DCT scale), everything else through `tf.io.decode_image` or PIL.

Grayscale and CMYK JPEGs and palette/alpha PNGs are converted to RGB (alpha dropped,
as PIL's `convert("RGB")` in timm does).
"""

import numpy as np
import tensorflow as tf

# The pipeline only needs the CPU; never let TensorFlow take accelerator memory.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow was initialised before this import
  pass


def _is_jpeg(data):
  return tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff"


def decode_image(data, window_fn=None, min_side=None):
  """Encoded bytes -> uint8 RGB HWC, optionally only the crop `window_fn(h, w)`.

  JPEGs decode with the accurate integer DCT (PIL's default, for parity with timm)
  and, when cropping, through `decode_and_crop_jpeg`, which skips the pixels outside
  the window. Grayscale/CMYK JPEGs and gray/palette/alpha PNGs come out as RGB.
  `min_side`: decode a JPEG crop at the smallest of libjpeg's DCT scales 1/2, 1/4,
  1/8 that keeps its shorter side at least this long (the window rounded to the
  scaled grid), so a large crop meant for a small output costs a fraction of its
  full decode and resize.
  """

  def jpeg():
    if window_fn is None:
      return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    shape = tf.image.extract_jpeg_shape(data)
    window = window_fn(shape[0], shape[1])
    if min_side is None:
      return tf.image.decode_and_crop_jpeg(data, tf.stack(window), channels=3,
                                           dct_method="INTEGER_ACCURATE")
    shorter = tf.minimum(window[2], window[3])
    scale_index = tf.reduce_sum(tf.cast(shorter >= min_side * tf.constant([2, 4, 8]),
                                        tf.int32))
    return tf.switch_case(scale_index, [
        lambda ratio=ratio: _decode_scaled(data, shape, window, ratio)
        for ratio in (1, 2, 4, 8)])

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    return crop(image, window_fn)

  image = tf.cond(_is_jpeg(data), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def _decode_scaled(data, shape, window, ratio):
  """The window (full-resolution coordinates) of a JPEG decoded at 1/`ratio`."""
  scaled = (shape[:2] + ratio - 1) // ratio  # libjpeg rounds the scaled size up
  top, left, height, width = [(v + ratio // 2) // ratio for v in window]
  top, left = tf.minimum(top, scaled[0] - 1), tf.minimum(left, scaled[1] - 1)
  height = tf.clip_by_value(height, 1, scaled[0] - top)
  width = tf.clip_by_value(width, 1, scaled[1] - left)
  return tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, height, width]),
                                       channels=3, ratio=ratio,
                                       dct_method="INTEGER_ACCURATE")


def crop(image, window_fn):
  if window_fn is None:
    return image
  shape = tf.shape(image)
  top, left, height, width = window_fn(shape[0], shape[1])
  return image[top:top + height, left:left + width]


def pil_decode(path):
  """Files TensorFlow cannot decode (e.g. TIFF), through PIL; RGB uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = path.item() if isinstance(path, np.ndarray) else path
  with Image.open(path.decode() if isinstance(path, bytes) else path) as image:
    return np.asarray(image.convert("RGB"))
