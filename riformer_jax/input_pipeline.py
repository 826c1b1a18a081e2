"""Input pipeline: sources, per-host shares, deterministic and resumable batches.

Sources (`get_source`), all read through the same `tf.data` code:

- `"synthetic"`: the embedded data set (`riformer_jax.synthetic`), generated in
  memory from a seed; nothing to download.
- `"folder"`: a plain image folder, `data_dir/split/class_name/*.jpg` (JPEG, PNG,
  BMP, GIF, WebP natively; other formats PIL can open, e.g. TIFF, through PIL).
- any TFDS name, e.g. `"imagenet2012"` or `"tfds:cifar10"`, prepared in `data_dir`.
  ImageNet needs a manual download: put `ILSVRC2012_img_train.tar` and
  `ILSVRC2012_img_val.tar` in `<data_dir>/downloads/manual/` (or point
  `--manual_dir` at them) and prepare once (hours; the tars are ~150 GB and the
  prepared copy about as much again), preferably in ArrayRecord format, which allows
  random access and so exact resumption without reading skipped records::

      python -m riformer_jax.input_pipeline prepare imagenet2012 --data_dir=$DATA
      # same as `tfds build imagenet2012 --data_dir=$DATA --file_format=array_record`,
      # but TFDS 4.9.10's CLI also needs apache-beam installed

Determinism. Training batches are a function of (seed, step): the examples of step
s are positions [s*G, (s+1)*G) (G the global batch) of epoch e = s // steps_per_epoch,
whose order is a stateless permutation `index_shuffle(position, key(seed, e))`; each
example's augmentation is keyed by (seed, e, example index). A run resumed at step
k starts its `tf.data.Dataset.range` at k, so nothing before k is read or decoded.
Every epoch drops its last partial global batch (steps_per_epoch = N // G).

Multi-host. Process p of P takes the positions [p*G/P, (p+1)*G/P) of every global
batch and reads only those files; for these random-access sources the global batch
is the same for any P.
`global_batches` turns each host's numpy batch into one `jax.Array` sharded over the
mesh's data axis.

TFDS data sets stored as TFRecord (TFDS's default) cannot be read by index: each
host reads its `tfds.even_splits` share with a per-epoch seeded file order and
shuffle buffer, and a resumed run skips the first records of its epoch without
decoding them (it still reads them). Convert to ArrayRecord to avoid that.

Bad input (folder source): files are checked when the folder is indexed (magic
bytes; JPEG/PNG end markers), so empty, truncated and non-image files are skipped
and counted in `source.report` with their paths, and a warning names them.
Grayscale and CMYK JPEGs and palette/alpha PNGs are converted to RGB by the decoder
(alpha dropped, as PIL's `convert("RGB")` in timm does). A file that still fails to
decode stops the iterator with an error naming the file, not a tf.data traceback.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from riformer_jax import augment
from riformer_jax import synthetic

# The pipeline only needs the CPU; never let TensorFlow take accelerator memory.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow was initialised before this import
  pass

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MAX_INDEX = 2**62


# ---------------------------------------------------------------- decoding


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
    return _crop(image, window_fn)

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


def _crop(image, window_fn):
  if window_fn is None:
    return image
  shape = tf.shape(image)
  top, left, height, width = window_fn(shape[0], shape[1])
  return image[top:top + height, left:left + width]


def _pil_decode(path):
  """Files TensorFlow cannot decode (e.g. TIFF), through PIL; RGB uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = path.item() if isinstance(path, np.ndarray) else path
  with Image.open(path.decode() if isinstance(path, bytes) else path) as image:
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
  """A split of a data set that the pipeline can read.

  `random_access` sources map an example index to (payload, label) in `lookup`, a
  TensorFlow function; `decode` turns the payload into a uint8 RGB image.
  """

  name: str
  split: str
  num_examples: int
  num_classes: int
  class_names: Optional[List[str]] = None
  random_access: bool = True
  report: Dict = dataclasses.field(default_factory=dict)

  def lookup(self, index):
    raise NotImplementedError

  def decode(self, payload, window_fn=None, min_side=None):
    return decode_image(payload, window_fn, min_side)

  def describe(self, index) -> str:
    return f"{self.name}/{self.split} example {index}"

  def check(self, index) -> Optional[str]:
    """A reason why example `index` cannot be decoded, or None (slow; on errors)."""
    try:
      payload, _ = self.lookup(tf.constant(index, tf.int64))
      self.decode(payload)
    except (tf.errors.OpError, ValueError, OSError) as error:
      return str(error).splitlines()[0]
    return None


class SyntheticSource(Source):
  """The embedded data set, held in memory as decoded uint8 images."""

  def __init__(self, split, seed=0, num_examples=None, **kwargs):
    images, labels = synthetic.generate(split, num_examples, seed=seed, **kwargs)
    super().__init__("synthetic", split, len(labels), synthetic.NUM_CLASSES,
                     class_names=list(synthetic.CLASS_NAMES))
    self.images = tf.constant(images)
    self.labels = tf.constant(labels, tf.int32)

  def lookup(self, index):
    return tf.gather(self.images, index), tf.gather(self.labels, index)

  def decode(self, payload, window_fn=None, min_side=None):
    del min_side  # decoded already
    return _crop(payload, window_fn)


@dataclasses.dataclass
class _Scan:
  path: str
  problem: Optional[str] = None  # skip reason
  needs_pil: bool = False


def _scan_file(path) -> _Scan:
  """Cheap validity check: size, magic bytes, and the end marker of JPEG/PNG."""
  try:
    size = os.path.getsize(path)
    if size == 0:
      return _Scan(path, "empty file")
    with open(path, "rb") as f:
      head = f.read(16)
      f.seek(max(0, size - 64))
      tail = f.read().rstrip(b"\x00\r\n ")
  except OSError as error:
    return _Scan(path, f"unreadable: {error}")
  if head.startswith(b"\xff\xd8\xff"):
    return _Scan(path, None if tail.endswith(b"\xff\xd9") else "truncated JPEG (no end marker)")
  if head.startswith(b"\x89PNG\r\n\x1a\n"):
    return _Scan(path, None if b"IEND" in tail else "truncated PNG (no IEND chunk)")
  if head.startswith((b"GIF87a", b"GIF89a", b"BM")):
    return _Scan(path)
  if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
    declared = int.from_bytes(head[4:8], "little") + 8
    return _Scan(path, None if declared <= size else "truncated WebP")
  # Not a format TensorFlow decodes: accept it only if PIL can read it all.
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as image:
      image.load()
    return _Scan(path, needs_pil=True)
  except Exception as error:  # PIL raises many types for bad files
    return _Scan(path, f"not a readable image: {type(error).__name__}")


class FolderSource(Source):
  """`root/split/class_name/image` files; classes are the sorted folder names."""

  def __init__(self, root, split, class_names=None, scan=True, max_workers=32):
    if not root:
      raise ValueError("dataset='folder' needs data_dir=<root> (root/split/class/*.jpg)")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"data_dir {root!r} does not exist "
                              "(expected root/split/class_name/image.jpg)")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
      raise FileNotFoundError(f"split folder {split_dir!r} does not exist; {root!r} "
                              f"contains {found or 'no folders'}")
    present = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)))
    if class_names is None:
      class_names = present
    else:
      unknown = sorted(set(present) - set(class_names))
      if unknown:
        raise ValueError(f"{split_dir!r} has class folders {unknown} that are not in "
                         "class_names (pass the training split's class_names)")
    if not class_names:
      raise FileNotFoundError(f"{split_dir!r} has no class folders "
                              "(expected root/split/class_name/image.jpg)")
    paths, labels, other_files = [], [], []
    empty_classes = []
    for label, name in enumerate(class_names):
      class_dir = os.path.join(split_dir, name)
      files = sorted(os.listdir(class_dir)) if os.path.isdir(class_dir) else []
      images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
      other_files += [os.path.join(class_dir, f) for f in files if f not in images]
      if not images:
        empty_classes.append(name)
      paths += [os.path.join(class_dir, f) for f in images]
      labels += [label] * len(images)

    scans = [_Scan(p) for p in paths]
    if scan:
      with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        scans = list(pool.map(_scan_file, paths))
    keep = [s.problem is None for s in scans]
    skipped = collections.defaultdict(list)
    for s in scans:
      if s.problem:
        skipped[s.problem].append(s.path)
    self.paths = [p for p, k in zip(paths, keep) if k]
    self.needs_pil = np.array([s.needs_pil for s, k in zip(scans, keep) if k], bool)
    labels = np.array([l for l, k in zip(labels, keep) if k], np.int32)
    if not self.paths:
      raise FileNotFoundError(f"no readable images under {split_dir!r} "
                              f"(skipped: {dict(skipped) or 'none'})")
    super().__init__(
        "folder", split, len(self.paths), len(class_names), class_names=list(class_names),
        report=dict(images=len(self.paths), skipped=dict(skipped),
                    num_skipped=sum(len(v) for v in skipped.values()),
                    empty_classes=empty_classes, non_image_files=other_files,
                    decoded_with_pil=int(self.needs_pil.sum())))
    if skipped:
      log.warning("%s: skipped %d bad image file(s): %s", split_dir,
                  self.report["num_skipped"],
                  "; ".join(f"{why}: {', '.join(p[:3])}{' ...' if len(p) > 3 else ''}"
                            for why, p in skipped.items()))
    if empty_classes:
      log.warning("%s: class folder(s) without images: %s", split_dir, empty_classes)
    self._paths = tf.constant(self.paths)
    self._pil = tf.constant(self.needs_pil)
    self._labels = tf.constant(labels)

  def lookup(self, index):
    return ((tf.gather(self._paths, index), tf.gather(self._pil, index)),
            tf.gather(self._labels, index))

  def decode(self, payload, window_fn=None, min_side=None):
    path, needs_pil = payload

    def with_pil():
      image = tf.numpy_function(_pil_decode, [path], tf.uint8, stateful=False)
      return _crop(tf.ensure_shape(image, [None, None, 3]), window_fn)

    return tf.cond(needs_pil, with_pil,
                   lambda: decode_image(tf.io.read_file(path), window_fn, min_side))

  def describe(self, index):
    return self.paths[index]


def _tfds():
  """tensorflow_datasets, imported on first use (the synthetic set does not need it)."""
  # TFDS 4.9.10 imports the `importlib_resources` backport when it locates a builder's
  # code (e.g. while preparing imagenet2012) but declares it only for Python < 3.9;
  # the standard library module provides the same API on the Pythons we support.
  if "importlib_resources" not in sys.modules:
    try:
      import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      import importlib.resources.abc  # pylint: disable=g-import-not-at-top
      sys.modules["importlib_resources"] = importlib.resources
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def manual_download_help(name, data_dir=None):
  """Where TFDS expects manually downloaded files, and the one-time prepare step."""
  data_dir = data_dir or "~/tensorflow_datasets"
  manual = os.path.join(data_dir, "downloads", "manual")
  if name == "imagenet2012":
    files = "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org)"
  else:
    files = "the files its TFDS page lists"
  return (f"TFDS data set {name!r} is not prepared in {data_dir!r}. Put {files} in "
          f"{manual}/ and run once:\n  python -m riformer_jax.input_pipeline prepare "
          f"{name} --data_dir={data_dir}\n(or `tfds build {name} --data_dir={data_dir} "
          f"--file_format=array_record`, which needs apache-beam)")


def _tfds_builder(name, data_dir):
  tfds = _tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as error:  # DatasetNotFoundError and registry errors
    raise ValueError(f"unknown TFDS data set {name!r}: {error}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(manual_download_help(name, data_dir))
  return builder


def _tfds_keys(builder):
  keys = builder.info.supervised_keys
  if keys and isinstance(keys[0], str):
    return keys[0], keys[1]
  return "image", "label"


class TfdsIndexedSource(Source):
  """A TFDS split in ArrayRecord format: random access by index."""

  def __init__(self, name, split, builder):
    tfds = _tfds()
    image_key, label_key = _tfds_keys(builder)
    self._data = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    self._keys = image_key, label_key
    num_classes = builder.info.features[label_key].num_classes
    super().__init__(name, split, len(self._data), num_classes,
                     class_names=list(builder.info.features[label_key].names))

  def _read(self, index):
    example = self._data[int(index)]
    return example[self._keys[0]], np.int32(example[self._keys[1]])

  def lookup(self, index):
    data, label = tf.py_function(self._read, [index], (tf.string, tf.int32))
    return tf.ensure_shape(data, []), tf.ensure_shape(label, [])


class TfdsSequentialSource(Source):
  """A TFDS split in TFRecord format: read in (seeded) sequence, not by index."""

  def __init__(self, name, split, builder):
    image_key, label_key = _tfds_keys(builder)
    self.builder = builder
    self._keys = image_key, label_key
    num_examples = builder.info.splits[split].num_examples
    num_classes = builder.info.features[label_key].num_classes
    super().__init__(name, split, num_examples, num_classes,
                     class_names=list(builder.info.features[label_key].names),
                     random_access=False)

  def host_split(self, process_index, process_count, drop_remainder):
    return _tfds().even_splits(self.split, n=process_count,
                               drop_remainder=drop_remainder)[process_index]

  def records(self, host_split, shuffle_seed=None, shuffle_buffer=0):
    """(encoded image, label) records of `host_split`; file order and buffer seeded."""
    tfds = _tfds()
    options = tf.data.Options()
    options.deterministic = True
    config = tfds.ReadConfig(options=options, shuffle_seed=shuffle_seed,
                             interleave_cycle_length=16, try_autocache=False)
    ds = self.builder.as_dataset(
        split=host_split, shuffle_files=shuffle_seed is not None, read_config=config,
        decoders={self._keys[0]: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[self._keys[0]], tf.cast(ex[self._keys[1]], tf.int32)))
    if shuffle_buffer:
      ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds


def get_source(dataset: str, split: str, *, data_dir: Optional[str] = None, seed: int = 0,
               class_names: Optional[Sequence[str]] = None, scan: bool = True,
               num_examples: Optional[int] = None) -> Source:
  """The `split` of `dataset`: "synthetic", "folder" or a TFDS name ("tfds:" optional).

  Args:
    dataset: "synthetic", "folder", "imagenet2012", "tfds:<name>", ...
    split: "train", "validation"/"val"/"test", or a TFDS split ("train[:10%]").
    data_dir: the folder root, or the TFDS data directory.
    seed: generation seed of the synthetic set (both splits use it; they differ).
    class_names: folder source only: fix the class list (pass the train split's).
    scan: folder source only: check every file when indexing (recommended).
    num_examples: synthetic only: size of the split (default: synthetic's).
  """
  if dataset == "synthetic":
    return SyntheticSource(split, seed=seed, num_examples=num_examples)
  if dataset == "folder":
    return FolderSource(data_dir, split, class_names=class_names, scan=scan)
  name = dataset[len("tfds:"):] if dataset.startswith("tfds:") else dataset
  builder = _tfds_builder(name, data_dir)
  if split not in builder.info.splits and split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"TFDS data set {name!r} has splits {sorted(builder.info.splits)}, "
                     f"not {split!r}")
  file_format = getattr(builder.info, "file_format", None)
  if getattr(file_format, "value", file_format) == "array_record":
    return TfdsIndexedSource(name, split, builder)
  return TfdsSequentialSource(name, split, builder)


def prepare_tfds(name, data_dir, manual_dir=None, file_format="array_record"):
  """One-time `download_and_prepare` (ImageNet: from the two tar files)."""
  tfds = _tfds()
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(download_config=config)
  return builder


# ---------------------------------------------------------------- iteration


def _host(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def _host_batch(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  return global_batch_size // process_count


def _root_key(seed, stream):
  """Stateless key for one random stream (1: order, 2: augmentation) of a run."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0x5EED], tf.int64), tf.constant(stream, tf.int64))


def _options(num_threads=None):
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


def steps_per_epoch(source: Source, global_batch_size: int, process_count: int = 1) -> int:
  """Full global batches per epoch (the partial last batch is dropped)."""
  if source.random_access:
    steps = source.num_examples // global_batch_size
  else:
    steps = (source.num_examples // process_count) // (global_batch_size // process_count)
  if steps == 0:
    raise ValueError(f"{source.name}/{source.split} has {source.num_examples} examples, "
                     f"fewer than one global batch of {global_batch_size}")
  return steps


def _preprocess_train(source, payload, label, key, recipe, uint8):
  crop_key, aug_key = tf.unstack(augment.split_seed(key, 2))

  def window(height, width):
    return augment.random_resized_crop_window(crop_key, height, width, recipe.scale,
                                              recipe.ratio)

  image = source.decode(payload, window, recipe.size if recipe.reduced_dct else None)
  if uint8:
    image, box = augment.augment_cropped(aug_key, image, recipe, uint8=True)
    return {"image": image, "erase": box, "label": label}
  return {"image": augment.augment_cropped(aug_key, image, recipe), "label": label}


def train_dataset(source: Source, *, global_batch_size: int, seed: int,
                  recipe: augment.TrainAugment = augment.TrainAugment(), start_step: int = 0,
                  num_steps: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, num_threads: Optional[int] = None,
                  prefetch: int = 2, uint8: bool = False) -> tf.data.Dataset:
  """This host's training batches from `start_step` on (random-access sources).

  Each element is {"image": float32 [B, size, size, 3] normalised, "label": int32
  [B]} with B = global_batch_size / process_count: this host's rows of the global
  batch. Endless unless `num_steps` is given. With `uint8`, "image" is uint8 before
  normalisation and "erase" int32 [B, 4] the random-erasing boxes, for
  `mixup.finish_batch` in the jitted step (a quarter of the bytes, less host work).
  """
  if not source.random_access:
    raise ValueError(f"{source.name} is read sequentially; use train_batches()")
  process_index, process_count = _host(process_index, process_count)
  host_batch = _host_batch(global_batch_size, process_count)
  n = source.num_examples
  epoch_steps = steps_per_epoch(source, global_batch_size)
  order_key, aug_key = _root_key(seed, 1), _root_key(seed, 2)
  stop = _MAX_INDEX if num_steps is None else (start_step + num_steps) * host_batch

  def locate(counter):
    step, row = counter // host_batch, counter % host_batch
    epoch = step // epoch_steps
    position = (step % epoch_steps) * global_batch_size + process_index * host_batch + row
    epoch_key = tf.random.experimental.stateless_fold_in(order_key, epoch)
    index = tf.random.experimental.index_shuffle(position, epoch_key, tf.constant(n - 1, tf.int64))
    key = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(aug_key, epoch), index)
    payload, label = source.lookup(index)
    return _preprocess_train(source, payload, label, key, recipe, uint8)

  ds = tf.data.Dataset.range(start_step * host_batch, stop)
  ds = ds.map(locate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True)
  return ds.prefetch(prefetch).with_options(_options(num_threads))


def _sequential_train_batches(source, global_batch_size, seed, recipe, start_step,
                              num_steps, process_index, process_count, shuffle_buffer,
                              num_threads, uint8):
  """TFRecord TFDS: one seeded pass per epoch; resuming skips records undecoded."""
  host_batch = _host_batch(global_batch_size, process_count)
  epoch_steps = steps_per_epoch(source, global_batch_size, process_count)
  host_examples = source.num_examples // process_count
  host_split = source.host_split(process_index, process_count, drop_remainder=True)
  aug_key = _root_key(seed, 2)
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    epoch, offset = divmod(step, epoch_steps)
    shuffle_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)
    records = source.records(host_split, shuffle_seed, shuffle_buffer)
    records = records.take(epoch_steps * host_batch).skip(offset * host_batch)
    base = process_index * host_examples + offset * host_batch

    def preprocess(position, record, epoch=epoch):
      key = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(aug_key, epoch), position + base)
      return _preprocess_train(source, record[0], record[1], key, recipe, uint8)

    ds = records.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True).prefetch(2)
    for batch in ds.with_options(_options(num_threads)).as_numpy_iterator():
      yield batch
      step += 1
      if num_steps is not None and step >= start_step + num_steps:
        return


def train_batches(source: Source, *, global_batch_size: int, seed: int,
                  recipe: augment.TrainAugment = augment.TrainAugment(), start_step: int = 0,
                  num_steps: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, shuffle_buffer: int = 16_384,
                  num_threads: Optional[int] = None,
                  uint8: bool = False) -> Iterator[Dict[str, np.ndarray]]:
  """This host's training batches (numpy dicts) from `start_step` on.

  Batch s is a function of (seed, s) only; `start_step=k` yields what an
  uninterrupted run yields from step k on. Decoding errors surface as a ValueError
  that names the file. `uint8`: as in `train_dataset`.
  """
  process_index, process_count = _host(process_index, process_count)
  if not source.random_access:
    yield from _sequential_train_batches(
        source, global_batch_size, seed, recipe, start_step, num_steps, process_index,
        process_count, shuffle_buffer, num_threads, uint8)
    return
  ds = train_dataset(source, global_batch_size=global_batch_size, seed=seed, recipe=recipe,
                     start_step=start_step, num_steps=num_steps, process_index=process_index,
                     process_count=process_count, num_threads=num_threads, uint8=uint8)
  step = start_step
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as error:
      raise _decode_error(source, error, train_indices(
          source, global_batch_size, seed, step, process_index, process_count)) from None
    yield batch
    step += 1


def train_indices(source, global_batch_size, seed, step, process_index=0, process_count=1):
  """Example indices of this host's rows of training batch `step` (random access)."""
  host_batch = _host_batch(global_batch_size, process_count)
  epoch_steps = steps_per_epoch(source, global_batch_size)
  epoch = step // epoch_steps
  first = (step % epoch_steps) * global_batch_size + process_index * host_batch
  epoch_key = tf.random.experimental.stateless_fold_in(_root_key(seed, 1), epoch)
  positions = tf.range(first, first + host_batch, dtype=tf.int64)
  return tf.random.experimental.index_shuffle(
      positions, epoch_key, tf.constant(source.num_examples - 1, tf.int64)).numpy()


def _decode_error(source, error, indices):
  """A ValueError naming the example(s) of the failed batch that do not decode."""
  bad = []
  for index in indices:
    reason = source.check(int(index))
    if reason:
      bad.append(f"{source.describe(int(index))}: {reason}")
  detail = "; ".join(bad) if bad else str(error).splitlines()[0]
  return ValueError(f"cannot read a batch of {source.name}/{source.split}: {detail}")


def eval_preprocess(image, size=224, crop_pct: Optional[float] = 0.9,
                    mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD, normalize=True):
  """timm's evaluation transform on a uint8 HWC image -> float32 [size, size, 3].

  Resize (bicubic, antialiased) so the shorter side is `floor(size / crop_pct)`, the
  longer `int(short' * long / short)` as torchvision computes it, round to uint8 as
  PIL does, center crop `size` (offsets rounded like torchvision), normalise.
  `crop_pct=None` skips the resize (e.g. the synthetic set at its native size).
  `normalize=False` returns the uint8 crop (what an exported model with the
  normalisation baked in takes).
  """
  if crop_pct is not None:
    if not 0 < crop_pct <= 1:
      raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    scale = tf.constant(math.floor(size / crop_pct), tf.float64)
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    height, width = shape[0], shape[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    new_long = tf.floor(scale * long / short)
    new_h = tf.where(height <= width, scale, new_long)
    new_w = tf.where(height <= width, new_long, scale)
    new_size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    image = tf.cond(tf.reduce_all(new_size == tf.shape(image)[:2]),
                    lambda: image, lambda: augment.resize(image, new_size))
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  tf.debugging.assert_greater_equal(tf.minimum(shape[0], shape[1]), size,
                                    message="image smaller than the eval crop")
  image = image[top:top + size, left:left + size]
  if not normalize:
    return tf.ensure_shape(image, [size, size, 3])
  return tf.ensure_shape(augment.normalize(image, mean, std), [size, size, 3])


def eval_dataset(source: Source, *, global_batch_size: int, size: int = 224,
                 crop_pct: Optional[float] = 0.9, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_threads: Optional[int] = None, normalize: bool = True) -> tf.data.Dataset:
  """The `tf.data.Dataset` behind `eval_batches` (one pass)."""
  process_index, process_count = _host(process_index, process_count)
  host_batch = _host_batch(global_batch_size, process_count)

  def preprocess(payload, label, valid):
    image = eval_preprocess(source.decode(payload), size, crop_pct, normalize=normalize)
    return {"image": image, "label": label, "mask": valid}

  if source.random_access:
    n = source.num_examples
    steps = -(-n // global_batch_size)

    def locate(counter):
      step, row = counter // host_batch, counter % host_batch
      position = step * global_batch_size + process_index * host_batch + row
      payload, label = source.lookup(tf.minimum(position, n - 1))
      return preprocess(payload, label, position < n)

    ds = tf.data.Dataset.range(steps * host_batch).map(
        locate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    counts = [source.builder.info.splits[source.host_split(p, process_count, False)]
              .num_examples for p in range(process_count)]
    steps = -(-max(counts) // host_batch)
    records = source.records(source.host_split(process_index, process_count, False))
    records = records.map(lambda data, label: (data, label, True))
    # Pad with copies of the first record, masked out.
    padding = records.take(1).map(lambda d, l, v: (d, l, False)).repeat()
    ds = records.concatenate(padding).take(steps * host_batch).map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True).prefetch(2)
  return ds.with_options(_options(num_threads))


def eval_batches(source: Source, *, global_batch_size: int, size: int = 224,
                 crop_pct: Optional[float] = 0.9, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_threads: Optional[int] = None, normalize: bool = True) -> Iterator[Dict[str, np.ndarray]]:
  """Every example exactly once, in order, as this host's rows of padded batches.

  Elements are {"image", "label", "mask"}; `mask` is False on the padding that fills
  the last global batch (and, for sequential TFDS sources, the shorter hosts), so a
  metric is `sum(correct * mask) / sum(mask)` over the whole loop. All hosts yield
  the same number of batches. `crop_pct=None` skips the resize (native size);
  `normalize=False` yields the uint8 crops.
  """
  ds = eval_dataset(source, global_batch_size=global_batch_size, size=size,
                    crop_pct=crop_pct, process_index=process_index,
                    process_count=process_count, num_threads=num_threads,
                    normalize=normalize)
  yield from ds.as_numpy_iterator()


# ---------------------------------------------------------------- devices


def data_sharding(mesh, axis="data"):
  """Batch dimension split over the mesh's `axis`, everything else replicated."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def to_global(host_batch, mesh, axis="data"):
  """One host's numpy batch -> global `jax.Array`s sharded over `axis`.

  Every process passes its own rows (in process order); the result's leading
  dimension is the global batch.
  """
  sharding = data_sharding(mesh, axis)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def global_batches(host_batches, mesh, axis="data"):
  """Maps `to_global` over an iterator of host batches."""
  for batch in host_batches:
    yield to_global(batch, mesh, axis)


def _main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Prepare a TFDS data set once.")
  sub = parser.add_subparsers(dest="command", required=True)
  prepare = sub.add_parser("prepare", help="download_and_prepare a TFDS data set")
  prepare.add_argument("name", help="e.g. imagenet2012")
  prepare.add_argument("--data_dir", required=True)
  prepare.add_argument("--manual_dir", default=None,
                       help="folder with the manually downloaded files "
                            "(default <data_dir>/downloads/manual)")
  prepare.add_argument("--file_format", default="array_record",
                       choices=("array_record", "tfrecord"))
  args = parser.parse_args(argv)
  builder = prepare_tfds(args.name, args.data_dir, args.manual_dir, args.file_format)
  print(builder.info.splits)


if __name__ == "__main__":
  _main()
