"""Sources, determinism across resume and hosts, sharding, eval parity, bad input."""

import io
import logging
import os
import tarfile

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from riformer_jax.data import augment, decode, imagenet, pipeline, sources
from riformer_jax.train import parallel

# 32x32 outputs keep the tests fast. FULL is the paper's recipe (RandAugment on);
# FAST leaves RandAugment out where the test is about something else, because
# tracing its fifteen operations dominates the cost of building a pipeline.
FULL = augment.TrainAugment(size=32)
FAST = augment.TrainAugment(size=32, auto_augment=None)


def _photo(height, width, seed):
  """Photo-like content: smooth random colour field plus a few sharp-edged shapes."""
  rng = np.random.default_rng(seed)
  steps = rng.normal(0, 3, (height, width, 3))
  image = np.cumsum(np.cumsum(steps, 0), 1) / 8 + rng.uniform(60, 190, 3)
  for _ in range(3):
    top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
    image[top:top + rng.integers(4, height // 2), left:left + rng.integers(4, width // 2)] = \
        rng.uniform(0, 255, 3)
  return np.clip(image, 0, 255).astype(np.uint8)


def _save(path, image, fmt="JPEG", mode=None, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pil = Image.fromarray(image)
  if mode:
    pil = pil.convert(mode)
  pil.save(path, fmt, **kwargs)
  return path


def _jpeg_bytes(image, quality=90):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def _take(iterator):
  return [dict(batch) for batch in iterator]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ---------------------------------------------------------------- synthetic source


@pytest.fixture(scope="module")
def synthetic_train():
  return sources.get_source("synthetic", "train", num_examples=60)


def test_synthetic_batches_resume_and_hosts(synthetic_train):
  source = synthetic_train
  run = dict(global_batch_size=16, seed=3, recipe=FULL)
  steps_per_epoch = pipeline.steps_per_epoch(source, 16)
  assert steps_per_epoch == 3
  full = _take(pipeline.train_batches(source, num_steps=7, **run))
  assert full[0]["image"].shape == (16, 32, 32, 3) and full[0]["image"].dtype == np.float32
  assert full[0]["label"].dtype == np.int32 and full[0]["label"].max() < 10
  # Resumed at step 4 (second epoch): exactly the uninterrupted batches 4, 5, 6.
  resumed = _take(pipeline.train_batches(source, start_step=4, num_steps=3, **run))
  _assert_same_batches(full[4:], resumed)
  # Two hosts each read half of every global batch; together the same batches. Without
  # RandAugment (FAST: building a pipeline with it takes seconds; the crop and flip
  # draw from the same per-image key, and test_augment shows RandAugment a function
  # of that key alone).
  fast = dict(run, recipe=FAST)
  whole = _take(pipeline.train_batches(source, num_steps=2, **fast))
  hosts = [_take(pipeline.train_batches(source, num_steps=2, process_index=p,
                                              process_count=2, **fast)) for p in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(
        np.concatenate([hosts[p][step]["image"] for p in range(2)]), whole[step]["image"])
  # Another seed gives other batches (the same recipe: only the seed differs).
  other = _take(pipeline.train_batches(source, num_steps=1, global_batch_size=16,
                                             seed=4, recipe=FAST))
  assert not np.array_equal(other[0]["image"], whole[0]["image"])


def test_unaugmented_training_batches_are_the_normalised_images(synthetic_train):
  """With `no_augment`, a training batch is exactly the normalised examples that
  `train_indices` names (the synthetic set's plain cross-entropy recipe)."""
  (batch,) = _take(pipeline.train_batches(
      synthetic_train, global_batch_size=12, seed=2, recipe=augment.no_augment(96),
      start_step=7, num_steps=1))
  indices = pipeline.train_indices(synthetic_train, 12, seed=2, step=7)
  expected = augment.normalize(tf.gather(synthetic_train.images, indices)).numpy()
  np.testing.assert_allclose(batch["image"], expected, atol=1e-6)
  np.testing.assert_array_equal(batch["label"], synthetic_train.labels.numpy()[indices])


def test_uint8_batches_defer_normalisation_and_erasing(folder):
  """uint8=True: the same pixels before normalisation, the boxes the float batches
  erase, and the same (seed, step) determinism and resume."""
  train = sources.get_source("folder", "train", data_dir=folder)
  # No RandAugment: it adds seconds to every pipeline built and nothing to the
  # deferral (test_augment checks the uint8 path of the recipe with it).
  recipe = augment.TrainAugment(size=32, re_prob=0.5, auto_augment=None)
  run = dict(global_batch_size=6, seed=1, recipe=recipe, num_steps=3)
  floats = _take(pipeline.train_batches(train, **run))
  uint8 = _take(pipeline.train_batches(train, uint8=True, **run))
  erased = 0
  for f, u in zip(floats, uint8):
    assert u["image"].dtype == np.uint8 and u["erase"].shape == (6, 4)
    np.testing.assert_array_equal(f["label"], u["label"])
    normalised = augment.normalize(u["image"]).numpy()
    for row, (top, left, height, width) in enumerate(u["erase"]):
      inside = np.zeros((32, 32), bool)
      inside[top:top + height, left:left + width] = True
      np.testing.assert_array_equal(f["image"][row][~inside], normalised[row][~inside])
      assert np.all(np.any(f["image"][row][inside] != normalised[row][inside], -1))
      erased += height > 0
  assert 0 < erased < 18  # p = 0.5 over 18 images
  resumed = _take(pipeline.train_batches(
      train, uint8=True, start_step=2, **dict(run, num_steps=1)))
  for key in ("image", "erase", "label"):
    np.testing.assert_array_equal(resumed[0][key], uint8[2][key])


def test_canvas_batches_leave_the_resize_to_the_step(folder):
  """recipe.canvas: each row is the flipped crop unresized at the canvas's top left
  (zeros around it) with its size; resized in the step it is the host path's uint8
  image within a level (the same crop, flip and erasing draws; the flip comes before
  the resize instead of after). A crop larger than the canvas is resized on the host.
  Resume stays exact."""
  from riformer_jax.data import device_augment  # noqa: PLC0415
  train = sources.get_source("folder", "train", data_dir=folder)
  recipe = augment.TrainAugment(size=32, re_prob=0.5, auto_augment=None)
  run = dict(global_batch_size=6, seed=1, num_steps=3, uint8=True)
  host = _take(pipeline.train_batches(train, recipe=recipe, **run))
  framed = _take(pipeline.train_batches(train, recipe=recipe._replace(canvas=40), **run))
  resize = jax.jit(device_augment.resize_windows, static_argnums=2)
  big = 0
  for h, f in zip(host, framed):
    assert f["image"].shape == (6, 40, 40, 3) and f["size"].shape == (6, 2)
    np.testing.assert_array_equal(f["erase"], h["erase"])
    np.testing.assert_array_equal(f["label"], h["label"])
    for image, (height, width) in zip(f["image"], f["size"]):
      assert not image[height:].any() and not image[:, width:].any()
      big += (height, width) == (32, 32)
    resized = np.asarray(resize(f["image"], f["size"], 32)).astype(int)
    assert np.abs(resized - h["image"].astype(int)).max() <= 1
  assert big > 0  # some crops of the 40-55 px files were larger than 40: resized here
  resumed = _take(pipeline.train_batches(train, recipe=recipe._replace(canvas=40),
                                         start_step=2, **dict(run, num_steps=1)))
  for key in ("image", "size", "erase", "label"):
    np.testing.assert_array_equal(resumed[0][key], framed[2][key])
  with pytest.raises(ValueError, match="needs uint8 batches and its RandAugment"):
    _take(pipeline.train_batches(train, recipe=recipe._replace(canvas=40),
                                 **dict(run, uint8=False)))


def test_eval_batches_for_the_step_to_resize(folder):
  """eval_batches(canvas=...): JPEG windows and PNG crops in canvases with their
  geometry; resized in the step they are the host's uint8 crops (PNGs exactly, JPEG
  windows within the float rounding of a few values)."""
  from riformer_jax.data import device_augment  # noqa: PLC0415
  val = sources.get_source("folder", "val", data_dir=folder)
  run = dict(global_batch_size=9, size=24, crop_pct=0.875, normalize=False)
  (host,) = _take(pipeline.eval_batches(val, **run))
  (framed,) = _take(pipeline.eval_batches(val, canvas=64, **run))
  assert framed["image"].shape == (9, 64, 64, 3) and framed["geometry"].shape == (9, 8)
  for key in ("label", "mask", "unreadable"):
    np.testing.assert_array_equal(framed[key], host[key])
  resized = np.asarray(jax.jit(device_augment.resize_eval_windows, static_argnums=2)(
      framed["image"], framed["geometry"], 24)).astype(int)
  difference = np.abs(resized - host["image"].astype(int))
  assert difference.max() <= 2 and (difference > 0).mean() < 0.01
  pngs = [i for i, path in enumerate(val.paths) if path.endswith(".png")]
  assert pngs and all(tuple(framed["geometry"][i]) == (24,) * 4 + (0,) * 4 for i in pngs)
  np.testing.assert_array_equal(resized[pngs], host["image"][pngs])


def test_large_jpeg_crops_decode_at_a_reduced_dct_scale():
  """min_side: the window of the 1/2-scale decode, and a resized crop close to the
  full-resolution one (the scaled IDCT is a slightly different low-pass)."""
  image = _photo(760, 1000, 5)
  data = tf.constant(_jpeg_bytes(image))
  half = tf.io.decode_jpeg(data, channels=3, ratio=2, dct_method="INTEGER_ACCURATE")
  window = lambda h, w: (tf.constant(100), tf.constant(200), tf.constant(600),  # noqa: E731
                         tf.constant(700))
  scaled = decode.decode_image(data, window, min_side=224).numpy()
  np.testing.assert_array_equal(scaled, half[50:350, 100:450])
  full = decode.decode_image(data, window).numpy()
  assert full.shape == (600, 700, 3)
  np.testing.assert_array_equal(decode.decode_image(data, window, min_side=400),
                                full)  # 600 < 2 x 400: full scale
  quarter = decode.decode_image(data, window, min_side=100).numpy()
  assert quarter.shape == (150, 175, 3)
  resized = [augment.resize(x, [112, 112]).numpy().astype(int) for x in (full, scaled, quarter)]
  for other in resized[1:]:
    assert np.abs(other - resized[0]).mean() < 1.5
  assert not np.array_equal(resized[1], resized[0])


def test_each_epoch_is_a_permutation(synthetic_train):
  epoch = [pipeline.train_indices(synthetic_train, 20, seed=1, step=s) for s in range(3)]
  assert sorted(np.concatenate(epoch)) == list(range(60))
  next_epoch = np.concatenate([pipeline.train_indices(synthetic_train, 20, 1, s)
                               for s in range(3, 6)])
  assert sorted(next_epoch) == list(range(60))
  assert not np.array_equal(np.concatenate(epoch), next_epoch)


def test_eval_covers_every_example_once_across_hosts():
  source = sources.get_source("synthetic", "test", num_examples=50)
  hosts = [_take(pipeline.eval_batches(source, global_batch_size=16, size=96,
                                             crop_pct=None, process_index=p, process_count=2))
           for p in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 4
  labels, mask, images = [], [], []
  for step in range(4):
    for p in range(2):
      labels.append(hosts[p][step]["label"])
      mask.append(hosts[p][step]["mask"])
      images.append(hosts[p][step]["image"])
  labels, mask, images = map(np.concatenate, (labels, mask, images))
  assert mask.sum() == 50 and mask[:50].all()
  np.testing.assert_array_equal(labels[:50], source.labels.numpy())
  # Native size, no resize: just the normalised pixels.
  np.testing.assert_allclose(images[:50], augment.normalize(source.images).numpy(), atol=1e-6)


def test_global_batches_are_sharded_over_the_data_axis(synthetic_train):
  mesh = jax.make_mesh((8,), ("data",))
  host = _take(pipeline.train_batches(synthetic_train, global_batch_size=16, seed=0,
                                            recipe=FAST, num_steps=1))
  (batch,) = list(parallel.global_batches(iter(host), mesh))
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[3].data.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(np.asarray(batch["image"]), host[0]["image"])
  np.testing.assert_array_equal(np.asarray(batch["label"]), host[0]["label"])


# ---------------------------------------------------------------- image folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder"))
  for split, count in (("train", 6), ("val", 3)):
    for c, name in enumerate(("cat", "dog", "eel")):
      for i in range(count):
        image = _photo(40 + 3 * i, 52 - 2 * i, seed=100 * c + i)
        fmt, ext = ("PNG", "png") if i == 1 else ("JPEG", "jpg")
        _save(os.path.join(root, split, name, f"{i}.{ext}"), image, fmt)
  return root


def test_folder_source_train_and_eval(folder):
  train = sources.get_source("folder", "train", data_dir=folder)
  assert train.class_names == ["cat", "dog", "eel"] and train.num_examples == 18
  assert train.report["num_skipped"] == 0
  batches = _take(pipeline.train_batches(train, global_batch_size=6, seed=0,
                                               recipe=FAST, num_steps=3))
  seen = np.concatenate([b["label"] for b in batches])
  assert sorted(seen) == sorted([0] * 6 + [1] * 6 + [2] * 6)  # one epoch, each once
  resumed = _take(pipeline.train_batches(train, global_batch_size=6, seed=0,
                                               recipe=FAST, start_step=2, num_steps=1))
  _assert_same_batches(batches[2:], resumed)

  val = sources.get_source("folder", "val", data_dir=folder,
                                  class_names=train.class_names)
  (batch,) = _take(pipeline.eval_batches(val, global_batch_size=9, size=24,
                                               crop_pct=0.875))
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
  assert batch["mask"].all() and batch["image"].shape == (9, 24, 24, 3)


# ---------------------------------------------------------------- TFDS


class RiformerToyImages(tfds.core.GeneratorBasedBuilder):
  """A tiny TFDS data set made in the test (registered as riformer_toy_images)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(24, 0), "test": self._generate_examples(7, 1)}

  def _generate_examples(self, count, seed):
    for i in range(count):
      yield i, {"image": _photo(36, 44, seed * 1000 + i), "label": i % 3}


@pytest.fixture(scope="module", params=["array_record", "tfrecord"])
def toy_tfds(request, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp(f"tfds_{request.param}"))
  RiformerToyImages(data_dir=data_dir, file_format=request.param).download_and_prepare()
  return data_dir, request.param


def test_tfds_source_by_name(toy_tfds):
  data_dir, file_format = toy_tfds
  source = sources.get_source("tfds:riformer_toy_images", "train", data_dir=data_dir)
  assert source.random_access == (file_format == "array_record")
  assert source.num_examples == 24 and source.num_classes == 3
  run = dict(global_batch_size=8, seed=5, recipe=FAST)
  full = _take(pipeline.train_batches(source, num_steps=5, **run))
  assert full[0]["image"].shape == (8, 32, 32, 3)
  # One epoch (3 steps) has every example once, in either format.
  assert sorted(np.concatenate([b["label"] for b in full[:3]])) == sorted([0, 1, 2] * 8)
  resumed = _take(pipeline.train_batches(source, start_step=4, num_steps=1, **run))
  _assert_same_batches(full[4:], resumed)
  again = _take(pipeline.train_batches(source, num_steps=2, **run))
  _assert_same_batches(full[:2], again)
  # Two hosts: each its share, same number of steps; labels of the eval split in order.
  test = sources.get_source("riformer_toy_images", "test", data_dir=data_dir)
  hosts = [_take(pipeline.eval_batches(test, global_batch_size=4, size=32,
                                             process_index=p, process_count=2))
           for p in range(2)]
  assert len(hosts[0]) == len(hosts[1])
  valid = np.concatenate([b["label"][b["mask"]] for h in hosts for b in h])
  assert sorted(valid) == sorted(i % 3 for i in range(7))


BROKEN_JPEG = b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9"


class RiformerToyBroken(tfds.core.GeneratorBasedBuilder):
  """16 training and 8 test images, example 5 of each an undecodable JPEG (a record
  damaged before or after the split was prepared looks the same to the reader)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return RiformerToyImages._info(self)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(16, 0), "test": self._generate_examples(8, 1)}

  def _generate_examples(self, count, seed):
    for i in range(count):
      image = BROKEN_JPEG if i == 5 else _photo(20, 20, seed * 1000 + i)
      yield i, {"image": image, "label": i % 3}


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_an_undecodable_tfds_record_is_skipped_named_and_counted(tmp_path, file_format):
  RiformerToyBroken(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
  source = sources.get_source("riformer_toy_broken", "train", data_dir=str(tmp_path))
  said = []
  run = dict(global_batch_size=4, seed=3, recipe=FAST, num_steps=8)
  batches = _take(pipeline.train_batches(
      source, unreadable=pipeline.UnreadableExamples(source, 0.5, log=said.append), **run))
  assert len(batches) == 8 and len(said) == 2  # two epochs of 16, one bad record each
  # Named by its index in the split (ArrayRecord) or its file and place (TFRecord).
  if source.random_access:
    (bad,) = [i for i in range(16) if source.check(i)]
    name = f"riformer_toy_broken/train example {bad}"
  else:
    (bad,) = [i.decode() for data, _, i in source.records(source.split, ids=True)
              .as_numpy_iterator() if source.check_payload(data)]
    assert bad.startswith("riformer_toy_broken-train.tfrecord-00000-of-00001__")
    name = f"riformer_toy_broken/train record {bad}"
  assert all(f"cannot read {name} (jpeg::Uncompress failed" in line for line in said)
  # Its row is a copy of another of its batch: no batch holds a blank image.
  assert all((b["image"].reshape(4, -1).max(axis=1) > 0).all() for b in batches)
  step = int(said[1].split(":")[0].split()[1])
  resumed = _take(pipeline.train_batches(
      source, start_step=step, unreadable=pipeline.UnreadableExamples(
          source, 0.5, log=said.append), **dict(run, num_steps=8 - step)))
  _assert_same_batches(resumed, batches[step:])
  # Evaluation counts it and leaves it out.
  test = sources.get_source("riformer_toy_broken", "test", data_dir=str(tmp_path))
  (batch,) = _take(pipeline.eval_batches(test, global_batch_size=8, size=16,
                                         crop_pct=None))
  assert batch["unreadable"].sum() == 1 and batch["mask"].sum() == 7


def test_a_damaged_tfrecord_file_stops_the_run_with_its_name(tmp_path):
  """Framing damage (a flipped byte in a record's length or checksum) cannot be
  skipped record by record without shifting the rest of the epoch: a clear stop."""
  RiformerToyBroken(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  for split in ("train", "test"):
    (path,) = (tmp_path / "riformer_toy_broken" / "1.0.0").glob(f"*-{split}.tfrecord-*")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
  source = sources.get_source("riformer_toy_broken", "train", data_dir=str(tmp_path))
  with pytest.raises(pipeline.UnreadableData,
                     match=r"^cannot read a batch of riformer_toy_broken/train: .*corrupt"
                           r".* \(a file in .*riformer_toy_broken/1.0.0\); a damaged record file "
                           r"cannot be skipped: prepare the "
                           r"split again \(or as ArrayRecord, read by index\)$"):
    _take(pipeline.train_batches(source, global_batch_size=4, seed=3, recipe=FAST,
                                 num_steps=8, unreadable=pipeline.UnreadableExamples(
                                     source, 0.5, log=lambda line: None)))
  test = sources.get_source("riformer_toy_broken", "test", data_dir=str(tmp_path))
  with pytest.raises(pipeline.UnreadableData,
                     match="^cannot read a batch of riformer_toy_broken/test: .*corrupt"):
    _take(pipeline.eval_batches(test, global_batch_size=8, size=16, crop_pct=None))


def test_unknown_or_unprepared_tfds(tmp_path):
  with pytest.raises(ValueError, match="unknown TFDS data set 'no_such_data_set_xyz'"):
    sources.get_source("no_such_data_set_xyz", "train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    sources.get_source("imagenet2012", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert os.path.join(str(tmp_path), "downloads", "manual") in message
  assert "python -m riformer_jax.data.sources prepare imagenet2012" in message


def _tar(path, members):
  with tarfile.open(path, "w") as archive:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


def test_imagenet2012_from_the_two_manual_tar_files(tmp_path):
  """The real TFDS ImageNet builder on miniature copies of the two tar files."""
  manual = tmp_path / "manual"
  manual.mkdir()
  synsets = ["n01440764", "n01443537"]
  class_tars = []
  for c, synset in enumerate(synsets):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as inner:
      for i in range(3):
        data = _jpeg_bytes(_photo(30, 40, 10 * c + i))
        info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
        info.size = len(data)
        inner.addfile(info, io.BytesIO(data))
    class_tars.append((f"{synset}.tar", buffer.getvalue()))
  _tar(manual / "ILSVRC2012_img_train.tar", class_tars)
  _tar(manual / "ILSVRC2012_img_val.tar",
       [(f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg_bytes(_photo(32, 30, 50 + i)))
        for i in range(1, 5)])
  data_dir = str(tmp_path / "data")
  sources._main(["prepare", "imagenet2012", "--data_dir", data_dir,  # the CLI
                        "--manual_dir", str(manual)])
  train = sources.get_source("imagenet2012", "train", data_dir=data_dir)
  assert train.random_access and train.num_examples == 6 and train.num_classes == 1000
  (batch,) = _take(pipeline.train_batches(train, global_batch_size=6, seed=0,
                                                recipe=FAST, num_steps=1))
  assert sorted(batch["label"]) == [0, 0, 0, 1, 1, 1]
  val = sources.get_source("imagenet2012", "validation", data_dir=data_dir)
  (batch,) = _take(pipeline.eval_batches(val, global_batch_size=4, size=24))
  # validation_labels.txt starts n01751748, n09193705, n02105855, n04263257 (TFDS
  # stores the examples in its own shuffled order).
  names = sorted(val.class_names[i] for i in batch["label"])
  assert names == sorted(["n01751748", "n09193705", "n02105855", "n04263257"])


# ---------------------------------------------------------------- eval parity


def test_eval_preprocessing_matches_timm_on_jpegs(tmp_path):
  """Ours (TF decode + TF resize) against timm's eval transform (PIL) on real JPEGs.

  Decoding is bit-exact (both libjpeg-turbo with the accurate integer DCT); the
  bicubic resize follows PIL's two passes and intermediate rounding, but PIL's
  weights are fixed point, so a few pixels land one or two levels (of 255) away.
  Measured on these images: max 2 levels, mean at most 0.05 level; in normalised
  units that is 2 / (255 * 0.225) = 0.035 at worst.
  """
  import torch_reference  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import timm.data  # pylint: disable=import-outside-toplevel
  transform = timm.data.create_transform(224, interpolation="bicubic", crop_pct=0.9,
                                         is_training=False)
  std = np.array(imagenet.STD) * 255
  run = tf.function(lambda data: pipeline.eval_preprocess(
      decode.decode_image(data), 224, 0.9))
  from riformer_jax.data import device_augment  # noqa: PLC0415
  resize_eval = jax.jit(device_augment.resize_eval_windows, static_argnums=2)
  # What eval_batches runs on encoded images: the JPEG's crop window only.
  window = tf.function(lambda data: pipeline.eval_preprocess_encoded(
      data, decode.decode_image, 224, 0.9, normalize=False))
  worst, moved = [], 0
  for i, (height, width) in enumerate([(300, 200), (375, 500), (333, 500), (224, 224),
                                       (260, 301), (600, 250), (248, 1000)]):
    path = _save(str(tmp_path / f"{i}.jpg"), _photo(height, width, i), quality=90)
    with open(path, "rb") as f:
      data = tf.constant(f.read())
    with Image.open(path) as image:
      theirs = transform(image.convert("RGB")).numpy().transpose(1, 2, 0)
    windowed = pipeline.eval_preprocess_encoded(
        data, decode.decode_image, 224, 0.9).numpy()
    # And with the step resizing: the window in a canvas, resized by JAX.
    piece, geometry = pipeline.eval_window_for_the_step(data, decode.decode_image, 224,
                                                        0.9, 512)
    canvas = np.zeros((1, 512, 512, 3), np.uint8)
    canvas[0, :piece.shape[0], :piece.shape[1]] = piece.numpy()
    on_device = np.asarray(resize_eval(canvas, geometry.numpy()[None], 224))[0]
    assert piece.shape[0] < height or (height, width) == (224, 224)  # a window, decoded
    for ours in (run(data).numpy(), windowed, augment.normalize(on_device).numpy()):
      levels = np.abs(ours - theirs) * std  # in units of 1/255 of the input range
      worst.append(levels.max())
      assert levels.mean() < 0.06
    # The window path: the whole-image path's pixels but for float rounding of the
    # sample positions (relative to the window, not the image), which moves a rare
    # pixel by a level or two after PIL's rounding between the passes.
    whole = pipeline.eval_preprocess(decode.decode_image(data), 224, 0.9,
                                     normalize=False).numpy().astype(int)
    difference = np.abs(window(data).numpy().astype(int) - whole)
    assert difference.max() <= 2, (height, width)
    moved += int((difference > 0).sum())
  assert max(worst) <= 2.0 + 1e-3, worst
  assert moved < 0.001 * 7 * 224 * 224 * 3, moved


# ---------------------------------------------------------------- bad input


def test_missing_directories_name_the_path(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.get_source("folder", "train", data_dir=missing)
  (tmp_path / "root" / "val").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"train.*contains \['val'\]"):
    sources.get_source("folder", "train", data_dir=str(tmp_path / "root"))
  with pytest.raises(FileNotFoundError, match="no class folders"):
    sources.get_source("folder", "val", data_dir=str(tmp_path / "root"))
  with pytest.raises(ValueError, match="data_dir"):
    sources.get_source("folder", "train")


def test_bad_files_are_skipped_counted_or_converted(tmp_path, caplog):
  root = tmp_path / "data"
  good = _photo(30, 40, 0)
  split = root / "train"
  _save(str(split / "a" / "rgb.jpg"), good)
  _save(str(split / "a" / "gray.jpg"), good, mode="L")
  _save(str(split / "a" / "cmyk.jpg"), good, mode="CMYK")
  rgba = np.dstack([good, np.arange(30 * 40, dtype=np.uint8).reshape(30, 40, 1)])
  _save(str(split / "b" / "alpha.png"), rgba, "PNG")
  _save(str(split / "b" / "palette.png"), good, "PNG", mode="P")
  _save(str(split / "b" / "scan.tif"), good, "TIFF")
  complete = _jpeg_bytes(good)
  (split / "b" / "truncated.jpg").write_bytes(complete[:len(complete) // 2])
  (split / "b" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
  (split / "b" / "empty.png").write_bytes(b"")
  (split / "b" / "notes.txt").write_text("not an image either")
  (split / "c_empty").mkdir()
  with caplog.at_level(logging.WARNING):
    source = sources.get_source("folder", "train", data_dir=str(root))
  report = source.report
  assert source.class_names == ["a", "b", "c_empty"] and source.num_classes == 3
  assert report["empty_classes"] == ["c_empty"]
  assert report["num_skipped"] == 3 and source.num_examples == 6
  skipped = {os.path.basename(p): why for why, paths in report["skipped"].items()
             for p in paths}
  assert skipped["truncated.jpg"].startswith("truncated JPEG")
  assert skipped["garbage.jpg"].startswith("not a readable image")
  assert skipped["empty.png"] == "empty file"
  assert [os.path.basename(p) for p in report["non_image_files"]] == ["notes.txt"]
  assert report["decoded_with_pil"] == 1  # the TIFF
  assert "truncated.jpg" in caplog.text and "c_empty" in caplog.text

  decoded = {}
  for index, path in enumerate(source.paths):
    payload, label = source.lookup(tf.constant(index, tf.int64))
    decoded[os.path.basename(path)] = (source.decode(payload).numpy(), int(label))
  for name in ("rgb.jpg", "gray.jpg", "cmyk.jpg", "alpha.png", "palette.png", "scan.tif"):
    image, label = decoded[name]
    with Image.open(os.path.join(split, "a" if name.endswith("jpg") else "b", name)) as pil:
      expected = np.asarray(pil.convert("RGB"))
    assert image.shape == (30, 40, 3) and label == (0 if name.endswith("jpg") else 1)
    np.testing.assert_array_equal(image, expected, err_msg=name)
  # A whole epoch runs through the pipeline.
  batches = _take(pipeline.train_batches(source, global_batch_size=6, seed=0,
                                               recipe=FAST, num_steps=1))
  assert batches[0]["image"].shape == (6, 32, 32, 3)


def _damaged_folder(tmp_path, scan=True):
  """16 images of two classes; one of them damaged after the source indexed them (as
  a file replaced or cut during a run): JPEG markers at both ends, nothing decodable."""
  for i in range(16):
    _save(str(tmp_path / "train" / "ab"[i % 2] / f"{i}.jpg"), _photo(20, 20, i))
  source = sources.get_source("folder", "train", data_dir=str(tmp_path), scan=scan)
  broken = source.paths.index(str(tmp_path / "train" / "a" / "4.jpg"))
  (tmp_path / "train" / "a" / "4.jpg").write_bytes(
      b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9")
  return source, broken


@pytest.mark.parametrize("scan", [True, False])
def test_an_image_that_breaks_mid_run_is_skipped_named_and_counted(tmp_path, scan):
  source, broken = _damaged_folder(tmp_path, scan)
  said = []
  unreadable = pipeline.UnreadableExamples(source, max_fraction=0.5, log=said.append)
  batches = _take(pipeline.train_batches(source, global_batch_size=4, seed=0,
                                         recipe=FAST, num_steps=8, unreadable=unreadable))
  rows = [pipeline.train_indices(source, 4, 0, step) for step in range(8)]
  hits = [(step, row) for step, indices in enumerate(rows)
          for row, index in enumerate(indices) if index == broken]
  assert len(hits) == 2 and unreadable.count == 2  # two epochs of 16 images
  assert said[0] == (f"step {hits[0][0]}: cannot read {source.paths[broken]} "
                     "(jpeg::Uncompress failed. Invalid JPEG data or crop window.); "
                     "skipped: a copy of another image of its batch takes its place")
  for step, row in hits:  # the row is a copy of the batch's first readable one
    first = 1 if row == 0 else 0
    np.testing.assert_array_equal(batches[step]["image"][row],
                                  batches[step]["image"][first])
    assert batches[step]["label"][row] == batches[step]["label"][first]
    assert set(batches[step]) == {"image", "label"}
  # Resumed at the step of the second hit: the same batches, the same stand-in.
  later = hits[1][0]
  _assert_same_batches(_take(pipeline.train_batches(
      source, global_batch_size=4, seed=0, recipe=FAST, start_step=later,
      num_steps=8 - later, unreadable=pipeline.UnreadableExamples(
          source, max_fraction=0.5, log=said.append))), batches[later:])
  # Past the allowed fraction the run is told to stop, with the field and the file.
  strict = pipeline.UnreadableExamples(source, max_fraction=0.01, log=said.append)
  with pytest.raises(pipeline.TooManyUnreadable,
                     match=r"1 examples of folder/train could not be read by step \d+, "
                           r"more than config.data.max_bad_fraction=0.01 of its 16"):
    _take(pipeline.train_batches(source, global_batch_size=4, seed=0, recipe=FAST,
                                 num_steps=8, unreadable=strict))
  # The evaluation leaves it out and counts it.
  (batch,) = _take(pipeline.eval_batches(source, global_batch_size=16, size=16,
                                         crop_pct=None))
  assert batch["unreadable"].tolist() == [i == broken for i in range(16)]
  assert batch["mask"].tolist() == [i != broken for i in range(16)]


def test_folder_of_only_bad_files(tmp_path):
  (tmp_path / "train" / "a").mkdir(parents=True)
  (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"junk")
  with pytest.raises(FileNotFoundError, match="no readable images"):
    sources.get_source("folder", "train", data_dir=str(tmp_path))
