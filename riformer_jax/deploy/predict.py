"""Classify images: the top classes of a converted or trained model, with their names.

    python -m riformer_jax.deploy.predict --model runs/demo/distilled/student image.png
    python -m riformer_jax.deploy.predict --model hf-hub:timm/poolformer_s12.sail_in1k cat.jpg
    riformer-predict --model DIR|hf-hub:NAME|URL [--arch NAME] [--top 5] IMAGE ...

Images go through the evaluation preprocessing the model's manifest records (timm's
`pretrained_cfg` terms: resize the shorter side to size / crop_pct, center-crop,
normalise), done with PIL as timm's evaluation transform does it. Class names come
from the manifest (a model trained on an image folder records its folders' names), or
are ImageNet's for a 1000-class model without names.
"""

import argparse
import functools
import math
import os
import sys

import jax
import numpy as np

from riformer_jax.weights import pretrained, store

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@functools.cache
def imagenet_class_names():
  """["tench, Tinca tinca", ...]: ImageNet-1k's classes in label order."""
  path = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
  with open(path) as f:
    rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
  return [names for _, names in rows]


def class_names(manifest, num_classes):
  names = manifest.get("class_names")
  if names and len(names) == num_classes:
    return list(names)
  if num_classes == 1000:
    return imagenet_class_names()
  return [f"class {i}" for i in range(num_classes)]


def preprocess(image, preprocessing):
  """A PIL image -> float32 [H, W, 3], as timm's evaluation transform makes it: the
  shorter side resized to floor(size / crop_pct) (to the size when crop_pct is None),
  a center crop, then (x / 255 - mean) / std."""
  from PIL import Image  # noqa: PLC0415 (only the image commands need PIL)

  height, width = preprocessing["input_size"][1:]
  crop_pct = preprocessing.get("crop_pct") or 1.0
  interpolation = preprocessing.get("interpolation", "bicubic")
  resample = getattr(Image.Resampling, interpolation.upper()
                     if interpolation in _INTERPOLATIONS else "BICUBIC")
  image = image.convert("RGB")
  scale = math.floor(min(height, width) / crop_pct)
  w, h = image.size
  if w <= h:
    size = (scale, int(scale * h / w))
  else:
    size = (int(scale * w / h), scale)
  image = image.resize(size, resample)
  left = int(round((size[0] - width) / 2.0))
  top = int(round((size[1] - height) / 2.0))
  image = image.crop((left, top, left + width, top + height))
  pixels = np.asarray(image, np.float32) / 255.0
  return (pixels - np.asarray(preprocessing["mean"], np.float32)) / np.asarray(
      preprocessing["std"], np.float32)


def top_classes(model, variables, images, top=5):
  """(probabilities, class indices), each [N, top], highest first."""
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top]
  return np.take_along_axis(probabilities, order, axis=-1), order


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("images", nargs="+", help="image files (anything PIL reads)")
  parser.add_argument("--model", required=True,
                      help="converted or trained model directory, hf-hub:OWNER/NAME or URL")
  parser.add_argument("--arch", help="registry name, for a URL whose checkpoint does not "
                      "say which model it holds")
  parser.add_argument("--sha256", help="expected sha256 of a URL's download")
  parser.add_argument("--top", type=int, default=5, help="classes shown per image")
  args = parser.parse_args(argv)
  if args.top < 1:
    parser.error(f"--top {args.top}: expected at least 1")
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

  try:
    directory = pretrained.resolve_directory(args.model, args.arch, args.sha256)
    model, variables = pretrained.load_pretrained(directory)
    manifest = store.read_manifest(directory)
    preprocessing = manifest.get("preprocessing")
    if preprocessing is None:
      resolution = getattr(model, "img_size", 224)  # GFNet records its own
      print(f"note: {directory} records no preprocessing; using ImageNet's mean/std, "
            f"bicubic, crop_pct 0.9 at {resolution}", file=sys.stderr)
      preprocessing = store.preprocessing_record(resolution)
    batch = []
    for path in args.images:
      try:
        with Image.open(path) as image:
          batch.append(preprocess(image, preprocessing))
      except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
  except (OSError, ValueError, KeyError, ImportError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 1
  names = class_names(manifest, model.num_classes)
  probabilities, indices = top_classes(model, variables, np.stack(batch),
                                       min(args.top, model.num_classes))
  for path, probs, classes in zip(args.images, probabilities, indices):
    print(f"{path}:")
    for rank, (p, k) in enumerate(zip(probs, classes), 1):
      print(f"  {rank}. {100 * p:6.2f}%  {names[k]}  (class {k})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
