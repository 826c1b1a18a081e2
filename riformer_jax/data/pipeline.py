"""The tf.data pipeline: deterministic, resumable, per-host batches of any source.

Determinism. Training batches are a function of (seed, step): the examples of step
s are positions [s*G, (s+1)*G) (G the global batch) of epoch e = s // steps_per_epoch,
whose order is a stateless permutation `index_shuffle(position, key(seed, e))`; each
example's augmentation is keyed by (seed, e, example index). A run resumed at step
k starts its `tf.data.Dataset.range` at k, so nothing before k is read or decoded.
Every epoch drops its last partial global batch (steps_per_epoch = N // G).

Multi-host. Process p of P takes the positions [p*G/P, (p+1)*G/P) of every global
batch and reads only those files; for these random-access sources the global batch
is the same for any P. `riformer_jax.train.parallel.global_batches` turns each host's
numpy batch into one `jax.Array` sharded over the mesh's data axis.

TFDS data sets stored as TFRecord (TFDS's default) cannot be read by index: each
host reads its `tfds.even_splits` share with a per-epoch seeded file order and
shuffle buffer, and a resumed run skips the first records of its epoch without
decoding them (it still reads them). Convert to ArrayRecord to avoid that.

An example that cannot be read or decoded is skipped, named and counted (see
"Unreadable examples" below); a batch that fails for any other reason stops the
iterator with an error naming the data set, not a tf.data traceback.
"""

import math
import re
from typing import Dict, Iterator, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from riformer_jax.data import augment, imagenet, sources

_MAX_INDEX = 2**62


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


def steps_per_epoch(source: sources.Source, global_batch_size: int, process_count: int = 1) -> int:
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
  if recipe.canvas:
    image, size, box = augment.crop_for_the_step(aug_key, image, recipe)
    return {"image": image, "size": size, "erase": box, "label": label}
  if uint8:
    image, box = augment.augment_cropped(aug_key, image, recipe, uint8=True)
    return {"image": image, "erase": box, "label": label}
  return {"image": augment.augment_cropped(aug_key, image, recipe), "label": label}


def train_dataset(source: sources.Source, *, global_batch_size: int, seed: int,
                  recipe: augment.TrainAugment = augment.TrainAugment(), start_step: int = 0,
                  num_steps: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, num_threads: Optional[int] = None,
                  prefetch: int = 2, uint8: bool = False,
                  skip: Sequence[int] = ()) -> tf.data.Dataset:
  """This host's training batches from `start_step` on (random-access sources).

  Each element is {"image": float32 [B, size, size, 3] normalised, "label": int32
  [B]} with B = global_batch_size / process_count: this host's rows of the global
  batch. Endless unless `num_steps` is given. With `uint8`, "image" is uint8 before
  normalisation and "erase" int32 [B, 4] the random-erasing boxes, for
  `mixup.finish_batch` in the jitted step (a quarter of the bytes, less host work).
  Examples whose index is in `skip` (known unreadable) are not read: their rows are
  copies of another of their batch (`_stand_in_for_unreadable`); "index" [B] and
  "readable" [B] say which.
  """
  if not source.random_access:
    raise ValueError(f"{source.name} is read sequentially; use train_batches()")
  process_index, process_count = _host(process_index, process_count)
  host_batch = _host_batch(global_batch_size, process_count)
  n = source.num_examples
  epoch_steps = steps_per_epoch(source, global_batch_size)
  order_key, aug_key = _root_key(seed, 1), _root_key(seed, 2)
  stop = _MAX_INDEX if num_steps is None else (start_step + num_steps) * host_batch

  def locate(counter):  # (example index, augmentation key)
    step, row = counter // host_batch, counter % host_batch
    epoch = step // epoch_steps
    position = (step % epoch_steps) * global_batch_size + process_index * host_batch + row
    epoch_key = tf.random.experimental.stateless_fold_in(order_key, epoch)
    index = tf.random.experimental.index_shuffle(position, epoch_key, tf.constant(n - 1, tf.int64))
    key = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(aug_key, epoch), index)
    return index, key

  skipped = _skip_tensor(skip)

  def read(counter):
    index, key = locate(counter)

    def decoded():
      payload, label = source.lookup(index)
      return _preprocess_train(source, payload, label, key, recipe, uint8)
    return _unless_skipped(index, skipped, decoded, lambda: _placeholder(recipe, uint8))

  ds = tf.data.Dataset.range(start_step * host_batch, stop)
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _batch(ds, host_batch, recipe.canvas)
  if skip:
    ds = ds.map(_stand_in_for_unreadable)
  return ds.prefetch(prefetch).with_options(_options(num_threads))


def _batch(ds, host_batch, canvas=0):
  """Batches; with a `canvas`, the images (windows for the step to resize) go into
  their canvas here, zeros at the bottom and right: one copy, not a pad and a batch."""
  if not canvas:
    return ds.batch(host_batch, drop_remainder=True)
  frame = tf.TensorShape([canvas, canvas, 3])
  shapes = {key: frame if key == "image" else spec.shape
            for key, spec in ds.element_spec.items()}
  return ds.padded_batch(host_batch, padded_shapes=shapes, drop_remainder=True)


# Unreadable examples. tf.data has no per-element try: an image that fails to read or
# decode (damaged or replaced after the source's scan, a flaky network filesystem, a
# corrupt record) stops the iterator. `ignore_errors` would drop it and shift every
# later batch (no exact resume), and isolating each element in a dataset of its own
# cost 2.6x the input rate (measured), so the host finds the failing batch's bad
# examples (`Source.check`) and rebuilds the pipeline from that step with them
# skipped: no cost until a file fails, the same batches on every host and on resume.

def _skip_tensor(skip):
  return tf.constant(sorted(skip), tf.int64) if skip else None


def _unless_skipped(index, skipped, decoded, placeholder):
  """`decoded()` with index and readable=True, or the placeholder where `index` is in
  `skipped` (its file is then never touched). Nothing to skip (every run until a file
  fails): no branch at all."""
  if skipped is None:
    return dict(decoded(), index=index, readable=tf.constant(True))
  bad = tf.reduce_any(tf.equal(index, skipped))
  element = tf.cond(bad, placeholder, decoded)
  return dict(element, index=index, readable=tf.logical_not(bad))


def _placeholder(recipe, uint8):
  """What an unreadable training example holds until `_stand_in_for_unreadable`."""
  size = recipe.size
  if uint8 or recipe.canvas:
    element = {"image": tf.zeros([size, size, 3], tf.uint8),
               "erase": tf.zeros([4], tf.int32), "label": tf.constant(-1, tf.int32)}
    if recipe.canvas:  # a size x size window in its canvas
      element["size"] = tf.constant([size, size], tf.int32)
    return element
  return {"image": tf.zeros([size, size, 3], tf.float32), "label": tf.constant(-1, tf.int32)}


def _stand_in_for_unreadable(batch):
  """Each unreadable row becomes a copy of the batch's first readable one (image,
  label, erasing box): the step keeps its shape and weights, and the copy depends on
  the batch alone, so a resumed run sees the same batch. `index` and `readable` stay
  for the host's count."""
  readable = batch["readable"]
  first = tf.argmax(tf.cast(readable, tf.int32), output_type=tf.int32)
  rows = tf.where(readable, tf.range(tf.shape(readable)[0]), first)
  return {k: v if k in ("index", "readable") else tf.gather(v, rows)
          for k, v in batch.items()}


def _sequential_train_batches(source, global_batch_size, seed, recipe, start_step,
                              num_steps, process_index, process_count, shuffle_buffer,
                              num_threads, uint8, unreadable):
  """TFRecord TFDS: one seeded pass per epoch; resuming skips records undecoded. A
  batch that fails is read again with its bad records (found by decoding each
  eagerly) skipped, from that step on, for the rest of the epoch."""
  host_batch = _host_batch(global_batch_size, process_count)
  epoch_steps = steps_per_epoch(source, global_batch_size, process_count)
  host_examples = source.num_examples // process_count
  host_split = source.host_split(process_index, process_count, drop_remainder=True)
  aug_key = _root_key(seed, 2)
  step, skip = start_step, {}
  while num_steps is None or step < start_step + num_steps:
    epoch, offset = divmod(step, epoch_steps)
    shuffle_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)
    epoch_records = source.records(host_split, shuffle_seed, shuffle_buffer).take(
        epoch_steps * host_batch)
    first = process_index * host_examples  # this host's positions in the epoch
    skipped = _skip_tensor(skip.get(epoch, ()))

    def read(position, record, epoch=epoch):
      index = position + first
      key = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(aug_key, epoch), index)
      return _unless_skipped(
          index, skipped,
          lambda: _preprocess_train(source, record[0], record[1], key, recipe, uint8),
          lambda: _placeholder(recipe, uint8))

    ds = epoch_records.enumerate().skip(offset * host_batch).map(
        read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _batch(ds, host_batch, recipe.canvas)
    if skip.get(epoch):
      ds = ds.map(_stand_in_for_unreadable)
    try:
      for batch in ds.prefetch(2).with_options(_options(num_threads)).as_numpy_iterator():
        yield _count_unreadable(batch, unreadable, step)
        step += 1
        if num_steps is not None and step >= start_step + num_steps:
          return
    except tf.errors.OpError as error:
      row = (step % epoch_steps) * host_batch
      records = source.records(host_split, shuffle_seed, shuffle_buffer, ids=True)
      bad = {}
      try:
        for i, (payload, _, record_id) in enumerate(records.skip(row).take(host_batch)):
          reason = source.check_payload(payload)
          if reason:  # named by the record's file and place, for the log
            bad[row + first + i] = (f"{source.name}/{source.split} record "
                                    f"{record_id.numpy().decode()}", reason)
      except tf.errors.OpError:  # the records themselves: a record cannot be skipped
        pass                     # without shifting every later one (no exact resume)
      if not bad.keys() - skip.get(epoch, set()):
        raise UnreadableData(
            f"cannot read a batch of {source.name}/{source.split}: "
            f"{_first_line(error)} (a file in {source.builder.data_dir}); a damaged "
            "record file cannot be skipped: prepare the split again (or as ArrayRecord, "
            "read by index)") from None
      unreadable.described.update(bad)
      skip.setdefault(epoch, set()).update(bad)


class UnreadableData(ValueError):
  """A batch that cannot be read for a cause other than its examples' images (a
  damaged TFRecord file, an unreachable folder), named."""


class TooManyUnreadable(UnreadableData):
  """More unreadable training examples than the run allows."""


class UnreadableExamples:
  """The training examples a run could not read (skipped, see above): counted, the first
  `named` named with their reason (read again on the host), and past `max_fraction` of
  the split a `TooManyUnreadable` that stops the run. The count is this host's."""

  def __init__(self, source, max_fraction=0.001, log=print, named=5):
    self.source, self.max_fraction, self.log, self.named = source, max_fraction, log, named
    self.count, self.names = 0, []
    # index -> (name, reason), filled by the sequential reader, whose index is a place
    # in this epoch's order, not an example: the reader names the record it found.
    self.described = {}

  def add(self, indices, step):
    self.count += len(indices)
    for index in indices[:max(0, self.named - len(self.names))]:
      if int(index) in self.described:
        name, reason = self.described[int(index)]
      else:
        name = self.source.describe(int(index))
        reason = self.source.check(int(index)) if self.source.random_access else None
      if reason:
        reason = _without_tf_wrapping(reason)
      self.names.append(name)
      self.log(f"step {step}: cannot read {name}{f' ({reason})' if reason else ''}; "
               "skipped: a copy of another image of its batch takes its place"
               + ("" if len(self.names) < self.named else " (further ones are counted "
                  "in data/unreadable, not named)"))
    limit = self.max_fraction * self.source.num_examples
    if self.count > limit:
      raise TooManyUnreadable(
          f"{self.count} examples of {self.source.name}/{self.source.split} could not "
          f"be read by step {step}, more than config.data.max_bad_fraction="
          f"{self.max_fraction} of its {self.source.num_examples} ({limit:.0f}); the "
          f"first: {', '.join(self.names)}. Check the data (files replaced or damaged "
          "during the run? a network filesystem?), or raise the field")


def _count_unreadable(batch, unreadable, step):
  """The batch without its bookkeeping; unreadable rows go to `unreadable`."""
  readable, indices = batch.pop("readable"), batch.pop("index")
  if not readable.all():
    unreadable.add(indices[~readable], step)
  return batch


def train_batches(source: sources.Source, *, global_batch_size: int, seed: int,
                  recipe: augment.TrainAugment = augment.TrainAugment(), start_step: int = 0,
                  num_steps: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, shuffle_buffer: int = 16_384,
                  num_threads: Optional[int] = None, uint8: bool = False,
                  unreadable: Optional[UnreadableExamples] = None,
                  ) -> Iterator[Dict[str, np.ndarray]]:
  """This host's training batches (numpy dicts) from `start_step` on.

  Batch s is a function of (seed, s) only; `start_step=k` yields what an
  uninterrupted run yields from step k on. An example that cannot be read is replaced
  by a copy of another of its batch and goes to `unreadable` (by default an
  `UnreadableExamples` of `source` that logs to stdout). `uint8`: as in
  `train_dataset`. With `recipe.canvas`, "image" is uint8 [B, canvas, canvas, 3], the
  flipped crops unresized, and "size" int32 [B, 2] their (height, width), for
  `device_augment.resize_windows` in the step.
  """
  process_index, process_count = _host(process_index, process_count)
  if recipe.canvas and (not uint8 or recipe.auto_augment):
    raise ValueError("a recipe with a canvas (the step resizes) needs uint8 batches and "
                     "its RandAugment/AutoAugment in the step")
  unreadable = unreadable or UnreadableExamples(source)
  if not source.random_access:
    yield from _sequential_train_batches(
        source, global_batch_size, seed, recipe, start_step, num_steps, process_index,
        process_count, shuffle_buffer, num_threads, uint8, unreadable)
    return
  step, end, skip = start_step, None if num_steps is None else start_step + num_steps, set()
  while end is None or step < end:
    ds = train_dataset(source, global_batch_size=global_batch_size, seed=seed,
                       recipe=recipe, start_step=step,
                       num_steps=None if end is None else end - step,
                       process_index=process_index, process_count=process_count,
                       num_threads=num_threads, uint8=uint8, skip=skip)
    try:
      for batch in ds.as_numpy_iterator():
        yield _count_unreadable(batch, unreadable, step)
        step += 1
      return
    except tf.errors.OpError as error:  # a file failed: skip it and rebuild from here
      indices = train_indices(source, global_batch_size, seed, step, process_index,
                              process_count)
      bad = {int(i) for i in indices if source.check(int(i))} - skip
      if not bad:
        raise _decode_error(source, error, indices) from None
      skip |= bad


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
  """An `UnreadableData` naming the example(s) of the failed batch that do not decode."""
  bad = []
  for index in indices:
    reason = source.check(int(index))
    if reason:
      bad.append(f"{source.describe(int(index))}: {reason}")
  detail = "; ".join(bad) if bad else _first_line(error)
  return UnreadableData(f"cannot read a batch of {source.name}/{source.split}: {detail}")


def eval_preprocess(image, size=224, crop_pct: Optional[float] = 0.9,
                    mean=imagenet.MEAN, std=imagenet.STD, normalize=True):
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
    shape = tf.shape(image)
    new_size = tf.stack(_eval_geometry(shape[0], shape[1], size, crop_pct)[:2])
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


def _eval_geometry(height, width, size, crop_pct):
  """eval_preprocess's resized size (new_h, new_w) and crop offsets (top, left)."""
  scale = tf.constant(math.floor(size / crop_pct), tf.float64)
  height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  new_long = tf.floor(scale * long / short)
  new_h = tf.cast(tf.where(height <= width, scale, new_long), tf.int32)
  new_w = tf.cast(tf.where(height <= width, new_long, scale), tf.int32)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
  return new_h, new_w, top, left


def _eval_jpeg_plan(data, size, crop_pct):
  """For a JPEG: int32 (height, width, new_h, new_w, top, left, y0, x0, rows, cols):
  its size, `eval_preprocess`'s resized size and crop offsets, and the window of input
  pixels under the crop plus the resampling kernel's reach."""
  shape = tf.image.extract_jpeg_shape(data)
  height, width = shape[0], shape[1]
  new_h, new_w, top, left = _eval_geometry(height, width, size, crop_pct)

  def span(offset, new, old):  # (first input index, count) under output [offset, +size)
    scale = tf.cast(new, tf.float32) / tf.cast(old, tf.float32)
    reach = 2.0 / tf.minimum(scale, 1.0) + 2.0  # the widened kernel's radius, plus slack
    first = tf.floor((tf.cast(offset, tf.float32) + 0.5) / scale - 0.5 - reach)
    last = tf.math.ceil((tf.cast(offset + size, tf.float32) - 0.5) / scale - 0.5 + reach)
    first = tf.maximum(tf.cast(first, tf.int32), 0)
    return first, tf.minimum(tf.cast(last, tf.int32) + 1, old) - first

  y0, rows = span(top, new_h, height)
  x0, cols = span(left, new_w, width)
  return height, width, new_h, new_w, top, left, y0, x0, rows, cols


def _decode_window(data, y0, x0, rows, cols):
  return tf.image.decode_and_crop_jpeg(data, tf.stack([y0, x0, rows, cols]), channels=3,
                                       dct_method="INTEGER_ACCURATE")


def _eval_jpeg_window(data, size, crop_pct):
  """`eval_preprocess(decode(data))`'s uint8 crop of a JPEG, decoding and resizing only
  what the crop needs: the input rows and columns under the centre crop (plus the
  resampling kernel's reach) are decoded (`decode_and_crop_jpeg`), and each of PIL's
  two passes (width first, uint8 rounding between) computes only the crop's output
  pixels, by TensorFlow's same resampling op with a translation. Every output pixel
  is computed from the same input pixels with the same kernel as resizing the whole
  image and cropping; sample positions relative to the window round differently in
  float32, which moves about one value in 10,000 by a level or two, and timm's parity
  bounds hold unchanged (tests/test_input_pipeline.py)."""
  height, width, new_h, new_w, top, left, y0, x0, rows, cols = _eval_jpeg_plan(
      data, size, crop_pct)
  scale_y = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
  scale_x = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
  x = tf.cast(_decode_window(data, y0, x0, rows, cols), tf.float32)[None]

  def resample(x, out_size, scale, translation):
    return tf.raw_ops.ScaleAndTranslate(
        images=x, size=out_size, scale=scale, translation=translation,
        kernel_type="keyscubic", antialias=True)

  one = tf.constant(1.0)
  x = resample(x, tf.stack([rows, size]), tf.stack([one, scale_x]),
               tf.stack([0.0, tf.cast(x0, tf.float32) * scale_x - tf.cast(left, tf.float32)]))
  x = tf.clip_by_value(tf.round(x), 0.0, 255.0)  # PIL's uint8 between its passes
  x = resample(x, tf.constant([size, size]), tf.stack([scale_y, one]),
               tf.stack([tf.cast(y0, tf.float32) * scale_y - tf.cast(top, tf.float32), 0.0]))
  return tf.ensure_shape(augment.to_uint8(x[0]), [size, size, 3])


def _identity_geometry(size):
  """The geometry of a finished `size` crop: `resize_eval_windows` leaves it as is."""
  return tf.constant([size, size, size, size, 0, 0, 0, 0], tf.int32)


def eval_window_for_the_step(data, decode_fn, size, crop_pct, canvas):
  """The host's part of the evaluation when the step resizes: (uint8 window, int32
  [8] geometry) for `device_augment.resize_eval_windows`. A JPEG whose window fits the
  canvas sends the decoded window and (height, width, new_h, new_w, top, left, y0,
  x0); anything else (other formats, windows too large) the finished crop with the
  geometry of an identity resize."""
  def whole():
    return (eval_preprocess(decode_fn(data), size, crop_pct, normalize=False),
            _identity_geometry(size))

  if crop_pct is None:
    return whole()

  def jpeg():
    plan = _eval_jpeg_plan(data, size, crop_pct)
    rows, cols = plan[-2:]
    return tf.cond((rows <= canvas) & (cols <= canvas),
                   lambda: (_decode_window(data, *plan[6:]), tf.stack(plan[:8])), whole)
  window, geometry = tf.cond(tf.io.is_jpeg(data), jpeg, whole)
  return tf.ensure_shape(window, [None, None, 3]), tf.ensure_shape(geometry, [8])


def eval_preprocess_encoded(data, decode_fn, size=224, crop_pct: Optional[float] = 0.9,
                            mean=imagenet.MEAN, std=imagenet.STD, normalize=True):
  """`eval_preprocess(decode_fn(data), ...)` for encoded bytes; a JPEG takes
  `_eval_jpeg_window` (a third of the time for ImageNet-sized photos)."""
  def whole():
    return eval_preprocess(decode_fn(data), size, crop_pct, normalize=False)
  if crop_pct is None:
    image = whole()
  else:
    if not 0 < crop_pct <= 1:
      raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    image = tf.cond(tf.io.is_jpeg(data), lambda: _eval_jpeg_window(data, size, crop_pct),
                    whole)
  if not normalize:
    return image
  return tf.ensure_shape(augment.normalize(image, mean, std), [size, size, 3])


def eval_dataset(source: sources.Source, *, global_batch_size: int, size: int = 224,
                 crop_pct: Optional[float] = 0.9, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_threads: Optional[int] = None, normalize: bool = True,
                 start_batch: int = 0, skip: Sequence[int] = (),
                 canvas: int = 0) -> tf.data.Dataset:
  """The `tf.data.Dataset` behind `eval_batches` (one pass, from `start_batch` on;
  rows whose position in the split is in `skip` are not read: masked, unreadable)."""
  process_index, process_count = _host(process_index, process_count)
  host_batch = _host_batch(global_batch_size, process_count)
  skipped = _skip_tensor(skip)

  def preprocess(position, payload, label, valid):
    def decoded():
      encoded = source.encoded(payload)
      element = {"label": label, "mask": valid}
      if encoded is None:
        element["image"] = eval_preprocess(source.decode(payload), size, crop_pct,
                                           normalize=normalize and not canvas)
        if canvas:
          element["geometry"] = _identity_geometry(size)
      elif canvas:  # the step resizes (and normalises) the JPEG's window
        element["image"], element["geometry"] = eval_window_for_the_step(
            encoded, lambda _: source.decode(payload), size, crop_pct, canvas)
      else:  # a JPEG decodes only the crop's window
        element["image"] = eval_preprocess_encoded(
            encoded, lambda _: source.decode(payload), size, crop_pct, normalize=normalize)
      return element

    def placeholder():
      element = {"image": tf.zeros([size, size, 3], tf.float32 if normalize and not canvas
                                   else tf.uint8), "label": label, "mask": False}
      if canvas:
        element["geometry"] = _identity_geometry(size)
      return element
    element = _unless_skipped(position, skipped, decoded, placeholder)
    element["unreadable"] = ~element.pop("readable") & valid
    element.pop("index")
    return element

  if source.random_access:
    n = source.num_examples
    steps = -(-n // global_batch_size)

    def locate(counter):
      step, row = counter // host_batch, counter % host_batch
      position = step * global_batch_size + process_index * host_batch + row
      payload, label = source.lookup(tf.minimum(position, n - 1))
      return preprocess(position, payload, label, position < n)

    ds = tf.data.Dataset.range(start_batch * host_batch, steps * host_batch).map(
        locate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    steps = _sequential_eval_steps(source, host_batch, process_count)
    ds = _sequential_eval_records(source, host_batch, steps, process_index,
                                  process_count).skip(start_batch * host_batch).map(
        lambda position, record: preprocess(position, *record),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _batch(ds, host_batch, canvas).prefetch(2).with_options(_options(num_threads))


def _sequential_eval_steps(source, host_batch, process_count):
  counts = [source.builder.info.splits[source.host_split(p, process_count, False)]
            .num_examples for p in range(process_count)]
  return -(-max(counts) // host_batch)


def _sequential_eval_records(source, host_batch, steps, process_index, process_count):
  """(position, (data, label, valid)) of this host's part, padded with masked copies of
  its first record to `steps` batches."""
  records = source.records(source.host_split(process_index, process_count, False))
  records = records.map(lambda data, label: (data, label, True))
  padding = records.take(1).map(lambda d, l, v: (d, l, False)).repeat()
  return records.concatenate(padding).take(steps * host_batch).enumerate()


def eval_batches(source: sources.Source, *, global_batch_size: int, size: int = 224,
                 crop_pct: Optional[float] = 0.9, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_threads: Optional[int] = None, normalize: bool = True,
                 canvas: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Every example exactly once, in order, as this host's rows of padded batches.

  Elements are {"image", "label", "mask", "unreadable"}; `mask` is False on the
  padding that fills the last global batch (and, for sequential TFDS sources, the
  shorter hosts) and on images that cannot be read (`unreadable` True: count them), so
  a metric is `sum(correct * mask) / sum(mask)` over the whole loop. All hosts yield
  the same number of batches. `crop_pct=None` skips the resize (native size);
  `normalize=False` yields the uint8 crops. With a `canvas`, the step resizes: "image"
  is uint8 [B, canvas, canvas, 3] (decoded JPEG windows, or finished crops) and
  "geometry" int32 [B, 8], for `device_augment.resize_eval_windows`.
  """
  process_index, process_count = _host(process_index, process_count)
  host_batch = _host_batch(global_batch_size, process_count)
  batch_index, skip = 0, set()
  while True:
    ds = eval_dataset(source, global_batch_size=global_batch_size, size=size,
                      crop_pct=crop_pct, process_index=process_index,
                      process_count=process_count, num_threads=num_threads,
                      normalize=normalize, start_batch=batch_index, skip=skip,
                      canvas=canvas)
    try:
      for batch in ds.as_numpy_iterator():
        yield batch
        batch_index += 1
      return
    except tf.errors.OpError as error:  # an image failed: skip it and rebuild from here
      try:
        bad = _bad_eval_positions(source, batch_index, host_batch, global_batch_size,
                                  process_index, process_count) - skip
      except tf.errors.OpError:  # the records themselves (a damaged TFRecord file)
        bad = set()
      if not bad:
        raise UnreadableData(f"cannot read a batch of {source.name}/{source.split}: "
                             f"{_first_line(error)}") from None
      skip |= bad


def _first_line(error):
  return _without_tf_wrapping(str(error).splitlines()[0])


def _without_tf_wrapping(message):
  """TensorFlow's message without its graph-node and op wrapping around the words."""
  return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\].*", "", message).strip()


def _bad_eval_positions(source, batch_index, host_batch, global_batch_size,
                        process_index, process_count):
  """Positions in batch `batch_index` of this host whose example does not decode."""
  if source.random_access:
    first = batch_index * global_batch_size + process_index * host_batch
    return {p for p in range(first, min(first + host_batch, source.num_examples))
            if source.check(p)}
  steps = _sequential_eval_steps(source, host_batch, process_count)
  records = _sequential_eval_records(source, host_batch, steps, process_index,
                                     process_count)
  return {int(position) for position, (data, _, _) in
          records.skip(batch_index * host_batch).take(host_batch)
          if source.check_payload(data)}
