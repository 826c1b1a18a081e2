"""Data sources: what a split holds and how one example is read.

- `"synthetic"`: the embedded data set (`riformer_jax.data.synthetic`), generated in
  memory from a seed; nothing to download.
- `"folder"`: a plain image folder, `data_dir/split/class_name/*.jpg` (JPEG, PNG,
  BMP, GIF, WebP natively; other formats PIL can open, e.g. TIFF, through PIL).
- any TFDS name, e.g. `"imagenet2012"` or `"tfds:cifar10"`, prepared in `data_dir`.
  ImageNet needs a manual download: put `ILSVRC2012_img_train.tar` and
  `ILSVRC2012_img_val.tar` in `<data_dir>/downloads/manual/` (or point
  `--manual_dir` at them) and prepare once (hours; the tars are ~150 GB and the
  prepared copy about as much again), preferably in ArrayRecord format, which allows
  random access and so exact resumption without reading skipped records::

      python -m riformer_jax.data.sources prepare imagenet2012 --data_dir=$DATA
      # same as `tfds build imagenet2012 --data_dir=$DATA --file_format=array_record`,
      # but TFDS 4.9.10's CLI also needs apache-beam installed

Bad input (folder source): files are checked when the folder is indexed (magic
bytes; JPEG/PNG end markers), so empty, truncated and non-image files are skipped
and counted in `source.report` with their paths, and a warning names them.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from riformer_jax.data import decode, synthetic

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
    return decode.decode_image(payload, window_fn, min_side)

  def describe(self, index) -> str:
    return f"{self.name}/{self.split} example {index}"

  def encoded(self, payload):
    """The payload's encoded image bytes (a string tensor), or None where the source
    holds decoded images: the evaluation decodes a JPEG's crop window only."""
    return payload if payload.dtype == tf.string else None

  def check(self, index) -> Optional[str]:
    """A reason why example `index` cannot be decoded, or None (slow; on errors)."""
    try:
      payload, _ = self.lookup(tf.constant(index, tf.int64))
    except (tf.errors.OpError, ValueError, OSError) as error:
      return str(error).splitlines()[0]
    return self.check_payload(payload)

  def check_payload(self, payload) -> Optional[str]:
    """A reason why an encoded image cannot be decoded, or None (eager; on errors)."""
    try:
      self.decode(payload)
    except (tf.errors.OpError, ValueError, OSError) as error:
      return str(error).splitlines()[0]
    return None


@functools.lru_cache(maxsize=4)
def _synthetic_split(split, seed, num_examples):
  """One embedded split as (images, labels) constants, generated once per process:
  demo.py and roadmap.py train many runs on the same two splits, and a generation
  takes seconds. Tensors are immutable, so the runs can share them."""
  images, labels = synthetic.generate(split, num_examples, seed=seed)
  return tf.constant(images), tf.constant(labels, tf.int32)


class SyntheticSource(Source):
  """The embedded data set, held in memory as decoded uint8 images."""

  def __init__(self, split, seed=0, num_examples=None):
    self.images, self.labels = _synthetic_split(split, seed, num_examples)
    super().__init__("synthetic", split, int(self.labels.shape[0]), synthetic.NUM_CLASSES,
                     class_names=list(synthetic.CLASS_NAMES))

  def lookup(self, index):
    return tf.gather(self.images, index), tf.gather(self.labels, index)

  def decode(self, payload, window_fn=None, min_side=None):
    del min_side  # decoded already
    return decode.crop(payload, window_fn)


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
      image = tf.numpy_function(decode.pil_decode, [path], tf.uint8, stateful=False)
      return decode.crop(tf.ensure_shape(image, [None, None, 3]), window_fn)

    return tf.cond(needs_pil, with_pil,
                   lambda: decode.decode_image(tf.io.read_file(path), window_fn, min_side))

  def describe(self, index):
    return self.paths[index]

  def encoded(self, payload):
    return tf.io.read_file(payload[0])


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
          f"{manual}/ and run once:\n  python -m riformer_jax.data.sources prepare "
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

  def records(self, host_split, shuffle_seed=None, shuffle_buffer=0, ids=False):
    """(encoded image, label) records of `host_split`; file order and buffer seeded.
    `ids` adds each record's TFDS id (its file and position in it), the same order."""
    tfds = _tfds()
    options = tf.data.Options()
    options.deterministic = True
    config = tfds.ReadConfig(options=options, shuffle_seed=shuffle_seed,
                             interleave_cycle_length=16, try_autocache=False,
                             add_tfds_id=ids)
    ds = self.builder.as_dataset(
        split=host_split, shuffle_files=shuffle_seed is not None, read_config=config,
        decoders={self._keys[0]: tfds.decode.SkipDecoding()})
    image, label = self._keys

    def record(example):
      fields = example[image], tf.cast(example[label], tf.int32)
      return fields + (example["tfds_id"],) if ids else fields
    ds = ds.map(record)
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
