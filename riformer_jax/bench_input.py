"""Images/s of the input pipeline per host CPU core, to size the hosts of a pod.

    python -m riformer_jax.bench_input                 # 1 thread and all cores
    python -m riformer_jax.bench_input --threads 1 4 --images 128 --seconds 20

Writes ImageNet-like JPEGs (photo-like content, 500x375 and other typical sizes,
quality 90) to a temporary folder, then times the training pipeline at 224 with each
augmentation added in turn, and the evaluation preprocessing. `--threads N` gives
tf.data a private pool of N threads with no intra-op parallelism, so images/s at
N=1 is the cost of one core; the last column divides the N-thread rate by N.
This is a benchmark, not a test: numbers vary with the CPU and its load.
"""

import argparse
import os
import tempfile
import time

import numpy as np

_SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (400, 300), (281, 500))


def _photo(height, width, rng):
  """A smooth random colour field with sharp-edged shapes: JPEG-compresses like a photo."""
  small = rng.uniform(0, 255, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  channels = [np.asarray(Image.fromarray(small[..., c]).resize((width, height), Image.BICUBIC))
              for c in range(3)]
  image = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
  for _ in range(6):
    top, left = rng.integers(0, height - 20), rng.integers(0, width - 20)
    image[top:top + rng.integers(10, height // 3), left:left + rng.integers(10, width // 3)] = \
        rng.uniform(0, 255, 3)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(root, count, seed=0, classes=4):
  """`count` JPEGs in root/train/class_k/, sizes cycling through typical ImageNet ones."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(count):
    height, width = _SIZES[i % len(_SIZES)]
    folder = os.path.join(root, "train", f"class_{i % classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(_photo(height, width, rng)).save(
        os.path.join(folder, f"{i:05d}.jpg"), "JPEG", quality=90)


def _rate(iterator, batch_size, seconds, warmup=2):
  for _ in range(warmup):
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += batch_size
  return count / (time.perf_counter() - start)


def run(threads=(1, None), images=96, seconds=10.0, batch_size=32, size=224):
  """Returns [(name, {threads: images/s})] for each pipeline configuration."""
  from riformer_jax import augment, input_pipeline  # pylint: disable=g-import-not-at-top
  threads = [t or os.cpu_count() for t in threads]
  configs = [
      ("decode + random-resized crop + flip",
       augment.TrainAugment(size=size, auto_augment=None, re_prob=0.0)),
      ("+ RandAugment rand-m9-mstd0.5-inc1",
       augment.TrainAugment(size=size, re_prob=0.0)),
      ("+ AutoAugment original (instead of RA)",
       augment.TrainAugment(size=size, auto_augment="original", re_prob=0.0)),
      ("+ RandAugment + random erasing 0.25 (paper)", augment.TrainAugment(size=size)),
      ("evaluation: resize 248, center crop 224", None),
  ]
  rows = []
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, images)
    source = input_pipeline.get_source("folder", "train", data_dir=root)
    for name, recipe in configs:
      rates = {}
      for n in threads:
        if recipe is None:
          iterator = input_pipeline.eval_dataset(
              source, global_batch_size=batch_size, size=size, crop_pct=0.9,
              process_index=0, process_count=1, num_threads=n).repeat().as_numpy_iterator()
        else:
          iterator = input_pipeline.train_batches(
              source, global_batch_size=batch_size, seed=0, recipe=recipe,
              process_index=0, process_count=1, num_threads=n)
        rates[n] = _rate(iterator, batch_size, seconds)
        del iterator  # stop its prefetching before the folder goes away
      rows.append((name, rates))
  return rows, threads


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                      help="tf.data thread counts to time (0: all cores)")
  parser.add_argument("--images", type=int, default=96, help="JPEGs to write")
  parser.add_argument("--seconds", type=float, default=10.0, help="timing per cell")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--size", type=int, default=224)
  args = parser.parse_args(argv)
  rows, threads = run([t or None for t in args.threads], args.images, args.seconds,
                      args.batch_size, args.size)
  cores = os.cpu_count()
  print(f"input pipeline, {args.size}x{args.size} outputs from ImageNet-sized JPEGs; "
        f"{cores} CPU cores visible")
  header = " | ".join(f"img/s {t} thr" for t in threads)
  print(f"| pipeline | {header} | img/s per core ({threads[-1]} thr) |")
  print("|---|" + "---|" * (len(threads) + 1))
  for name, rates in rows:
    cells = " | ".join(f"{rates[t]:.0f}" for t in threads)
    print(f"| {name} | {cells} | {rates[threads[-1]] / threads[-1]:.0f} |")


if __name__ == "__main__":
  main()
