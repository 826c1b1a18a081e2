"""Training augmentation against timm/PIL, and each augmentation's invariants."""

import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import torch_reference  # noqa: F401  (makes timm importable)
from timm.data import auto_augment as timm_aa  # noqa: E402
from timm.data import transforms as timm_transforms  # noqa: E402

from riformer_jax.data import augment, device_augment, imagenet


def _noise_image(seed=0, shape=(37, 53, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _gradient_image(shape=(37, 53)):
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  return np.stack([(yy * 5 + xx * 2) % 256, (xx * 4) % 256, (yy * 7) % 256],
                  -1).astype(np.uint8)


_NO_ARG = ("AutoContrast", "Equalize", "Invert")
_OP_CASES = [
    ("AutoContrast", None), ("Equalize", None), ("Invert", None), ("Posterize", 2),
    ("Posterize", 7), ("Solarize", 100), ("Solarize", 256), ("SolarizeAdd", 80),
    ("Color", 0.3), ("Color", 1.7), ("Contrast", 0.3), ("Contrast", 1.9),
    ("Brightness", 0.4), ("Brightness", 1.8), ("Sharpness", 0.2), ("Sharpness", 1.9),
    ("Rotate", 27.0), ("Rotate", -13.0), ("ShearX", 0.27), ("ShearY", -0.2),
    ("TranslateXRel", 0.3), ("TranslateYRel", -0.41),
]


def _operation(path, name):
  """The operation `name` of the host path (TensorFlow) or the device path (jitted
  JAX), as a function of (uint8 numpy image, argument) -> uint8 numpy image."""
  if path == "host":
    return lambda image, arg: augment.OPS[name][0](tf.constant(image), arg).numpy()
  op = jax.jit(device_augment.OPS[name][0])
  return lambda image, arg: np.asarray(op(jnp.asarray(image), arg))


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("name,arg", _OP_CASES)
def test_operations_match_pil(name, arg, path):
  """Each RandAugment/AutoAugment operation against the PIL function timm calls, on
  the host path (TensorFlow) and the device path (jitted JAX).

  Photometric operations reproduce PIL's integer arithmetic exactly (AutoContrast
  within one level: PIL computes its scale in double). Geometric ones use bilinear
  interpolation here; compared with PIL's bilinear they agree to one level (float
  rounding of sample positions that fall on pixel boundaries).
  """
  op = _operation(path, name)
  for image in (_noise_image(), _gradient_image()):
    kwargs = dict(fillcolor=augment.FILL, resample=Image.BILINEAR)
    args = () if name in _NO_ARG else (arg,)
    expected = np.asarray(timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, **kwargs))
    actual = op(image, 0.0 if arg is None else arg)
    assert actual.dtype == np.uint8 and actual.shape == image.shape
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1, name
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
      assert diff.mean() < 0.1, name
    elif name != "AutoContrast":
      assert diff.max() == 0, name


@pytest.mark.parametrize("path", ["host", "device"])
def test_posterize_to_zero_bits_is_black(path):
  # Newer Pillow rejects bits=0 (timm's PosterizeIncreasing at magnitude 10); older
  # Pillow, which timm's recipe was tuned with, returned a black image.
  assert not _operation(path, "Posterize")(_noise_image(), 0).any()


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_magnitude_to_argument_matches_timm(name, path):
  assert sorted(device_augment.OPS) == sorted(augment.OPS)
  level = augment.OPS[name][1] if path == "host" else device_augment.OPS[name][1]
  hparams = dict(translate_const=100, img_mean=augment.FILL)
  for magnitude in (0.0, 3.3, 5.0, 8.7, 9.0, 10.0):
    for sign in (1.0, -1.0):
      # timm negates when random.random() > 0.5.
      with mock.patch.object(timm_aa.random, "random", return_value=0.9 if sign < 0 else 0.1):
        level_fn = timm_aa.LEVEL_TO_ARG[name]
        expected = level_fn(magnitude, hparams)[0] if level_fn else 0.0
      actual = float(level(np.float32(magnitude), np.float32(sign)))
      assert actual == pytest.approx(expected, abs=1e-5), (name, magnitude, sign)


def test_timm_operation_lists_and_policies():
  assert augment.RAND_OPS == tuple(timm_aa._RAND_TRANSFORMS)
  assert augment.RAND_INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
  for policy in ("original", "originalr", "v0", "v0r"):
    reference = timm_aa.auto_augment_policy(policy, dict(translate_const=100, img_mean=augment.FILL))
    ours = augment.AUTO_AUGMENT_POLICIES[policy]
    assert [[(op.name, op.prob, op.magnitude) for op in sub] for sub in reference] == \
        [[tuple(step) for step in sub] for sub in ours]


def test_parse_auto_augment():
  config = augment.parse_auto_augment("rand-m9-mstd0.5-inc1")
  assert config.kind == "rand" and config.magnitude == 9 and config.num_layers == 2
  assert config.prob == 0.5 and config.magnitude_std == 0.5
  assert config.ops == augment.RAND_INCREASING_OPS
  assert augment.parse_auto_augment("rand-m7-n3-mstd101").magnitude_std == math.inf
  config = augment.parse_auto_augment("original-mstd0.5")
  assert config.kind == "auto" and len(config.policy) == 25 and config.magnitude_std == 0.5
  for bad in ("randaug", "rand-q9", "original-m9", "rand-m"):
    with pytest.raises(ValueError, match="auto_augment="):
      augment.parse_auto_augment(bad)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "original", "v0-mstd0.5"])
def test_auto_augment_is_a_deterministic_function_of_the_seed(spec):
  image = tf.constant(_gradient_image((48, 40)))
  run = tf.function(lambda seed: augment.auto_augment(seed, image, spec))
  outputs = [run(tf.constant([s, 7], tf.int64)).numpy() for s in range(12)]
  again = run(tf.constant([3, 7], tf.int64)).numpy()
  np.testing.assert_array_equal(outputs[3], again)
  for out in outputs:
    assert out.dtype == np.uint8 and out.shape == (48, 40, 3)
  changed = sum(not np.array_equal(out, image.numpy()) for out in outputs)
  distinct = len({out.tobytes() for out in outputs})
  assert changed >= 6 and distinct >= 6


def test_random_resized_crop_window_properties():
  run = tf.function(lambda s, h, w: augment.random_resized_crop_window(s, h, w))
  areas, ratios = [], []
  for s in range(200):
    top, left, h, w = [int(v) for v in run(tf.constant([s, 1], tf.int64), 300, 400)]
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    areas.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
  assert min(ratios) >= 3 / 4 - 0.05 and max(ratios) <= 4 / 3 + 0.05
  # torchvision's loop retries crops that do not fit, which favours small ones: its
  # mean area fraction on 300x400 is 0.432 (20,000 draws of timm's get_params).
  assert 0.38 < np.mean(areas) < 0.48
  first = [int(v) for v in run(tf.constant([5, 1], tf.int64), 300, 400)]
  assert first == [int(v) for v in run(tf.constant([5, 1], tf.int64), 300, 400)]


@pytest.mark.parametrize("shape", [(20, 400), (400, 20), (100, 110)])
def test_random_resized_crop_fallback_matches_torchvision(shape):
  """No try fits (area fraction > 1): the centred crop with the clamped ratio."""
  image = Image.new("RGB", (shape[1], shape[0]))
  expected = timm_transforms.RandomResizedCropAndInterpolation.get_params(
      image, scale=(1.5, 2.0), ratio=(3 / 4, 4 / 3))
  actual = augment.random_resized_crop_window(tf.constant([0, 0], tf.int64), shape[0],
                                              shape[1], scale=(1.5, 2.0))
  assert tuple(int(v) for v in actual) == tuple(expected)


def _smooth_image(shape=(150, 200, 3), seed=0):
  steps = np.random.default_rng(seed).normal(0, 3, shape)
  return np.clip(np.cumsum(np.cumsum(steps, 0), 1) / 10 + 128, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(224, 224), (57, 91), (400, 300)])
def test_resize_matches_pil_bicubic(size):
  """Up- and down-scaling agree with PIL on a photo-like image.

  exact: same kernel, same two passes (width first) and the same rounding to uint8
  in between; PIL's fixed-point weights move under 1.5% of the pixels, by at most 2.
  One float pass (the training default) skips the intermediate rounding: a few
  tenths of a level on average, at most 3 levels of 255.
  """
  image = _smooth_image()
  expected = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC)).astype(int)
  actual = augment.resize(tf.constant(image), size).numpy().astype(int)
  assert np.abs(actual - expected).max() <= 2
  assert np.abs(actual - expected).mean() < 0.03
  single = augment.resize(tf.constant(image), size, exact=False).numpy().astype(int)
  assert np.abs(single - expected).max() <= 3
  assert np.abs(single - expected).mean() < 0.3
  if size != image.shape[:2]:
    assert not np.array_equal(single, actual)  # the two paths really differ


def test_the_uint8_path_defers_exactly_normalisation_and_erasing():
  """augment_cropped(uint8=True) is the float path before its last two steps: the
  same pixels (normalised alike outside the box) and the box the float path erases."""
  recipe = augment.TrainAugment(size=40, re_prob=1.0)
  crop = tf.constant(_noise_image(shape=(50, 70, 3)))
  for s in range(6):
    seed = tf.constant([s, 2], tf.int64)
    host = augment.augment_cropped(seed, crop, recipe).numpy()
    image, box = augment.augment_cropped(seed, crop, recipe, uint8=True)
    assert image.dtype == tf.uint8
    top, left, height, width = box.numpy()
    assert height > 0 and width > 0
    inside = np.zeros((40, 40), bool)
    inside[top:top + height, left:left + width] = True
    normalised = augment.normalize(image).numpy()
    np.testing.assert_array_equal(host[~inside], normalised[~inside])
    assert np.all(np.any(host[inside] != normalised[inside], axis=-1))
  _, box = augment.augment_cropped(tf.constant([0, 2], tf.int64), crop,
                                   recipe._replace(re_prob=0.0), uint8=True)
  assert not np.any(box.numpy())


def test_flip():
  image = tf.constant(_noise_image())
  flipped = [not np.array_equal(augment.random_flip(tf.constant([s, 0], tf.int64), image),
                                image) for s in range(100)]
  assert 30 < sum(flipped) < 70
  np.testing.assert_array_equal(
      augment.random_flip(tf.constant([0, 0], tf.int64), image, prob=1.0), image[:, ::-1])


def test_random_erasing_fills_the_box_it_draws():
  image = tf.zeros([64, 48, 3]) + 5.0
  for s in range(10):
    seed = tf.constant([s, 3], tf.int64)
    out = augment.random_erasing(seed, image, probability=1.0).numpy()
    top, left, height, width = augment.random_erasing_box(
        augment.split_seed(seed, 2)[0], 64, 48, probability=1.0).numpy()
    expected = np.zeros((64, 48), bool)
    expected[top:top + height, left:left + width] = True
    np.testing.assert_array_equal(np.any(out != 5.0, axis=-1), expected)


def test_random_erasing_box_and_values():
  image = tf.zeros([64, 48, 3]) + 5.0
  fractions = []
  for s in range(40):
    out = augment.random_erasing(tf.constant([s, 3], tf.int64), image, probability=1.0).numpy()
    erased = np.any(out != 5.0, axis=-1)
    rows, cols = np.nonzero(erased.any(1))[0], np.nonzero(erased.any(0))[0]
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert erased.sum() == height * width  # one solid rectangle
    assert height < 64 and width < 48
    fractions.append(height * width / (64 * 48))
    values = out[erased]
    if values.size > 300:
      assert abs(values.mean()) < 0.3 and 0.7 < values.std() < 1.3  # N(0, 1)
  assert 0.02 - 0.005 <= min(fractions) and max(fractions) <= 1 / 3 + 0.02
  kept = [np.array_equal(augment.random_erasing(tf.constant([s, 4], tf.int64), image).numpy(),
                         image.numpy()) for s in range(200)]
  assert 0.65 < np.mean(kept) < 0.85  # probability 0.25
  const = augment.random_erasing(tf.constant([1, 1], tf.int64), image, 1.0, mode="const")
  assert np.sum(const.numpy() == 0.0) > 0


def test_training_recipe_output():
  recipe = augment.TrainAugment(size=32)
  crop = tf.constant(_noise_image(shape=(50, 70, 3)))
  run = tf.function(lambda s: augment.augment_cropped(s, crop, recipe))
  for s in range(8):
    out = run(tf.constant([s, 9], tf.int64)).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    lo = (0 - np.array(imagenet.MEAN)) / np.array(imagenet.STD)
    hi = (1 - np.array(imagenet.MEAN)) / np.array(imagenet.STD)
    inside = np.all((out >= lo - 1e-5) & (out <= hi + 1e-5), axis=-1)
    assert inside.mean() > 0.5  # everything but an erased box is a normalised pixel
  np.testing.assert_array_equal(run(tf.constant([2, 9], tf.int64)),
                                run(tf.constant([2, 9], tf.int64)))


def _our_draws(spec, count):
  """(applied op names, their magnitudes) of `count` images through our RandAugment,
  recorded by swapping every operation for one that only notes what it was given."""
  applied, magnitudes = [], []

  def recording(name, level_to_arg):
    def op(image, _arg, **_):
      applied.append(name)
      return image

    def level(m, sign):
      magnitudes.append((name, float(m)))
      return level_to_arg(m, sign)
    return op, level

  ops = {name: recording(name, level) for name, (_, level) in augment.OPS.items()}
  image = tf.zeros((4, 4, 3), tf.uint8)
  with mock.patch.dict(augment.OPS, ops):
    for i in range(count):
      augment.auto_augment(tf.constant([i, 7], tf.int32), image, spec)
  return applied, magnitudes


def _device_draws(spec, count):
  the_plan = device_augment.plan(spec)
  draws = jax.jit(device_augment.sample, static_argnums=(1, 2))(
      jax.random.key(0), count, the_plan)
  applied = np.asarray(draws.apply).reshape(-1)
  names = [the_plan.names[i] for i in np.asarray(draws.op).reshape(-1)[applied]]
  magnitudes = np.asarray(draws.magnitude).reshape(-1)[applied]
  with_level = [timm_aa.LEVEL_TO_ARG[n] is not None for n in names]
  return names, [(n, m) for n, m, keep in zip(names, magnitudes, with_level) if keep]


def _timm_policy_draws(transform, count):
  """(applied op names, their magnitudes) of timm's RandAugment or AutoAugment."""
  import random  # noqa: PLC0415
  applied, magnitudes = [], []
  ops = transform.ops if hasattr(transform, "ops") else [
      op for sub in transform.policy for op in sub]
  for op in ops:
    def aug_fn(image, *_, name=op.name, **__):
      applied.append(name)
      return image
    level_fn = op.level_fn
    op.aug_fn = aug_fn
    if level_fn is not None:
      op.level_fn = lambda m, hparams, name=op.name, fn=level_fn: (
          magnitudes.append((name, m)), fn(m, hparams))[1]
  random.seed(0)
  np.random.seed(0)
  image = Image.new("RGB", (4, 4))
  for _ in range(count):
    transform(image)
  return applied, magnitudes


@pytest.mark.parametrize("path,count", [("host", 1500), ("device", 3000)])
def test_rand_augment_samples_as_timm_does(path, count):
  """Which ops run, how often a layer applies its op (p = 0.5) and the magnitudes
  (9 + N(0, 0.5) clipped to [0, 10]), ours (host or device path) against timm's on
  `count` images (two layers each): a wrong p, a missing noise or clip, or a skewed
  op choice fails."""
  from scipy import stats  # noqa: PLC0415
  spec = "rand-m9-mstd0.5-inc1"
  ours, ours_m = (_our_draws if path == "host" else _device_draws)(spec, count)
  theirs, theirs_m = _timm_policy_draws(
      timm_aa.rand_augment_transform(spec, {"img_mean": augment.FILL}), count)
  layers = 2 * count
  # How often a layer applies its op: both near 0.5, and near each other.
  for applied in (ours, theirs):
    assert abs(len(applied) / layers - 0.5) < 4 * math.sqrt(0.25 / layers)
  # Which op: uniform over timm's 15 (chi-square on the applied counts, both sides).
  names = augment.RAND_INCREASING_OPS
  for applied in (ours, theirs):
    counts = [applied.count(n) for n in names]
    assert sum(counts) == len(applied)  # no op outside timm's list
    assert stats.chisquare(counts).pvalue > 1e-3, counts
  table = [[ours.count(n) for n in names], [theirs.count(n) for n in names]]
  assert stats.chi2_contingency(table).pvalue > 1e-3, table
  # Magnitudes: the same distribution (two-sample KS), within [0, 10], with the clip's
  # mass at 10 (P(N(9, 0.5) > 10) = 2.3%).
  ours_m, theirs_m = [m for _, m in ours_m], [m for _, m in theirs_m]
  assert stats.ks_2samp(ours_m, theirs_m).pvalue > 1e-3
  assert min(ours_m) >= 0 and max(ours_m) == 10.0
  assert 0.01 < np.mean(np.asarray(ours_m) == 10.0) < 0.04
  assert abs(np.std(ours_m) - np.std(theirs_m)) < 0.05


# ---------------------------------------------------------------- in the jitted step


@pytest.mark.parametrize("size", [(150, 200), (57, 91), (120, 90), (40, 40)])
def test_device_resize_of_a_window_matches_pil_bicubic(size):
  """The step's resize of a crop in a canvas (`resize_windows`) against PIL's bicubic,
  shrinking and enlarging: within a level, a few tenths on average (the host path's
  single float pass allows 3 and 0.3); what lies outside the window does not count."""
  image = _smooth_image()[:size[0], :size[1]]
  resize = jax.jit(device_augment.resize_windows, static_argnums=2)
  for out in (224, 64):
    expected = np.asarray(Image.fromarray(image).resize((out, out), Image.BICUBIC))
    for padding in (0, 255):
      canvas = np.full((1, 256, 256, 3), padding, np.uint8)
      canvas[0, :size[0], :size[1]] = image
      actual = np.asarray(resize(canvas, np.array([size], np.int32), out))[0]
      diff = np.abs(actual.astype(int) - expected.astype(int))
      assert diff.max() <= 1 and diff.mean() < 0.25, (size, out, padding)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "original"])
def test_device_layers_run_the_drawn_operation(spec):
  """`apply` runs, per image and layer, exactly the operation its draws name (or
  nothing where the draw skips it): each image against the operation called alone."""
  the_plan = device_augment.plan(spec)
  names = the_plan.names
  image = jnp.asarray(_gradient_image((24, 20)))
  layers = the_plan.num_layers
  batch = jnp.stack([image] * (2 * len(names)))
  op = np.repeat(np.arange(len(names)), 2)
  draws = device_augment.Draws(
      op=jnp.asarray(np.stack([op] + [np.zeros_like(op)] * (layers - 1), 1)),
      apply=jnp.asarray(np.stack([np.arange(op.size) % 2 == 0] +
                                 [np.zeros(op.size, bool)] * (layers - 1), 1)),
      magnitude=jnp.full((op.size, layers), 7.3), sign=jnp.full((op.size, layers), -1.0))
  out = np.asarray(jax.jit(device_augment.apply, static_argnums=2)(batch, draws, the_plan))
  for row, index in enumerate(op):
    fn, level = device_augment.OPS[names[index]]
    expected = fn(image, level(jnp.float32(7.3), jnp.float32(-1.0))) if row % 2 == 0 \
        else image
    np.testing.assert_array_equal(out[row], np.asarray(expected), err_msg=names[index])


def test_device_augment_is_a_function_of_its_key():
  images = jnp.asarray(np.stack([_gradient_image((32, 32))] * 16))
  run = jax.jit(device_augment.auto_augment, static_argnums=2)
  the_plan = device_augment.plan("rand-m9-mstd0.5-inc1")
  a = np.asarray(run(jax.random.key(3), images, the_plan))
  np.testing.assert_array_equal(a, np.asarray(run(jax.random.key(3), images, the_plan)))
  b = np.asarray(run(jax.random.key(4), images, the_plan))
  assert not np.array_equal(a, b)
  # Per image: the 16 copies of one image come out as (mostly) different images.
  assert len({row.tobytes() for row in a}) >= 8


def test_device_auto_augment_samples_as_timm_does():
  """AutoAugment "original": which operations run how often (sub-policy choice times
  each step's probability), ours against timm's on 4000 images."""
  from scipy import stats  # noqa: PLC0415
  ours, _ = _device_draws("original", 4000)
  theirs, _ = _timm_policy_draws(
      timm_aa.auto_augment_transform("original", {"img_mean": augment.FILL}), 4000)
  names = sorted(set(ours) | set(theirs))
  table = [[ours.count(n) for n in names], [theirs.count(n) for n in names]]
  assert stats.chi2_contingency(table).pvalue > 1e-3, (names, table)
  # Expected applications per image from the policy itself: 25 sub-policies, mean
  # of their step probabilities summed.
  expected = sum(p for sub in augment.AUTO_AUGMENT_POLICIES["original"]
                 for _, p, _ in sub) / 25
  assert abs(len(ours) / 4000 - expected) < 0.05
