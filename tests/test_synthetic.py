"""The embedded data set: deterministic, balanced, and labelled by arrangement only."""

import numpy as np
import pytest
from scipy import ndimage

from riformer_jax.data import synthetic


@pytest.fixture(scope="module")
def sample():
  return synthetic.generate("train", 600, seed=0)


def _blob_centres(images):
  """Centres (y, x) of the two blobs in each image, found from the pixels alone."""
  centres = []
  for image in images:
    bright = np.all(image >= 150, axis=-1)  # blobs: every channel in [150, 255]
    labels, count = ndimage.label(bright)
    sizes = ndimage.sum(bright, labels, range(1, count + 1))
    largest = np.argsort(sizes)[-2:] + 1
    centres.append(ndimage.center_of_mass(bright, labels, largest))
  return np.array(centres) + 0.5  # pixel centres


def test_deterministic_with_independent_splits():
  a_images, a_labels = synthetic.generate("train", 30, seed=7)
  b_images, b_labels = synthetic.generate("train", 30, seed=7)
  np.testing.assert_array_equal(a_images, b_images)
  np.testing.assert_array_equal(a_labels, b_labels)
  assert not np.array_equal(synthetic.generate("train", 30, seed=8)[0], a_images)
  test_images, _ = synthetic.generate("test", 30, seed=7)
  assert not np.array_equal(test_images, a_images)
  np.testing.assert_array_equal(synthetic.generate("validation", 30, seed=7)[0], test_images)
  with pytest.raises(ValueError, match="synthetic split 'dev'"):
    synthetic.generate("dev", 10)


def test_shapes_and_balance(sample):
  images, labels = sample
  assert images.shape == (600, 96, 96, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), [60] * 10)
  assert synthetic.SPLIT_SIZES == {"train": 5000, "test": 1000}
  assert len(synthetic.CLASS_NAMES) == synthetic.NUM_CLASSES == 10


def test_label_is_the_orientation_of_the_pair(sample):
  """Reading the two blob positions off the pixels gives the label, every time; the
  mirror image has the mirrored label (so flip augmentation would corrupt labels)."""
  images, labels = sample
  centres = _blob_centres(images[:200])
  np.testing.assert_array_equal(synthetic.pair_orientation(centres), labels[:200])
  distance = np.linalg.norm(centres[:, 0] - centres[:, 1], axis=-1)
  assert distance.min() > 55 and distance.max() < 81
  mirrored = _blob_centres(images[:50, :, ::-1])
  np.testing.assert_array_equal(synthetic.pair_orientation(mirrored),
                                synthetic.NUM_CLASSES - 1 - labels[:50])


def test_colour_brightness_and_position_carry_no_label(sample):
  """Per-image colour histograms, brightness, blob area and the pair's midpoint do
  not predict the class: a least-squares linear probe on them stays near chance,
  while the same probe on the pair's direction is far above it."""
  images, labels = sample
  histograms = np.concatenate(
      [np.stack([np.histogram(image[..., c], bins=8, range=(0, 256))[0] for c in range(3)])
       .reshape(-1) for image in images]).reshape(len(images), -1) / images[0, ..., 0].size
  bright = np.all(images >= 150, axis=-1).mean(axis=(1, 2))
  centres = _blob_centres(images)
  midpoint = centres.mean(axis=1) / 96
  features = np.concatenate([histograms, bright[:, None], midpoint], axis=1)

  def probe_accuracy(x):
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    targets = np.eye(10)[labels]
    weights, *_ = np.linalg.lstsq(x[:400], targets[:400], rcond=None)
    return np.mean(np.argmax(x[400:] @ weights, axis=1) == labels[400:])

  assert probe_accuracy(features) < 0.2  # chance: 0.1
  offset = centres[:, 1] - centres[:, 0]
  angle = np.arctan2(-offset[:, 0], offset[:, 1])
  assert probe_accuracy(np.stack([np.cos(2 * angle), np.sin(2 * angle)], 1)) > 0.5
