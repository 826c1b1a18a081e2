"""Images/s of the input pipeline per host CPU core, ours next to timm's, to size hosts.

    python -m riformer_jax.bench.input                     # 1 core, then all cores
    python -m riformer_jax.bench.input --cores 1 --seconds 8 --rounds 3 --json out.json
    python -m riformer_jax.bench.input --breakdown         # where our time goes

Writes ImageNet-like JPEGs (photo-like content, 500x375 and other typical sizes,
quality 90) to a temporary folder and times, on the same files, our tf.data
pipeline and timm's (`timm.data.create_transform` on PIL images, as a DataLoader
worker runs it: open, convert to RGB, transform, collate batches of 32) for the
training recipe with each augmentation added in turn and for the evaluation
transform. Each side runs in worker processes pinned to the measured cores
(`sched_setaffinity`): ours as one process with a tf.data pool of that many threads,
timm's as one process per core with `torch.set_num_threads(1)`, as DataLoader
workers are. Rows alternate between the two sides, round after round, so both see the
same machine; the ratio column is ours / timm's. Our side starts a fresh iterator for
each timed cell and drops it after, so its threads are idle while timm's cell runs.
Rows do the same work on both sides unless their name says otherwise (`ROWS`): "uint8
out" rows stop before normalising and erasing on both (timm's `use_prefetcher=True`
transforms leave them to its GPU PrefetchLoader, ours to the jitted step). timm and torch are development
dependencies (requirements-dev.txt). This is a benchmark, not a test: the numbers
vary with the CPU and its load.
"""

import argparse
import gc
import glob
import io
import json
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np

_SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (400, 300), (281, 500))
_PAPER = "rand-m9-mstd0.5-inc1"

# Each row: (name, our side, timm's side); `evaluation`: the eval transform. Both sides
# do the same work on the host unless the name says otherwise. "uint8 out": the host
# stops before normalising and erasing, which run on the device (our jitted step;
# timm's `use_prefetcher=True` transforms, whose PrefetchLoader does both on the GPU).
# Ours: recipe fields, `uint8` batches; timm: create_transform's arguments.
ROWS = (
    ("decode + random-resized crop + flip, uint8 out",
     dict(auto_augment=None, re_prob=0.0, uint8=True),
     dict(auto_augment=None, re_prob=0.0, use_prefetcher=True)),
    ("+ RandAugment rand-m9-mstd0.5-inc1 on the host, uint8 out",
     dict(auto_augment=_PAPER, re_prob=0.25, uint8=True),
     dict(auto_augment=_PAPER, re_prob=0.25, use_prefetcher=True)),
    ("+ AutoAugment original on the host, uint8 out",
     dict(auto_augment="original", re_prob=0.25, uint8=True),
     dict(auto_augment="original", re_prob=0.25, use_prefetcher=True)),
    ("paper's recipe all on the host (RA, normalise, erase), float32 out",
     dict(auto_augment=_PAPER, re_prob=0.25),
     dict(auto_augment=_PAPER, re_prob=0.25, use_prefetcher=False)),
    ("paper's recipe, ours with RandAugment on the device (host: decode, crop, resize, "
     "flip), timm's on the host; uint8 out",
     dict(auto_augment=None, re_prob=0.25, uint8=True),
     dict(auto_augment=_PAPER, re_prob=0.25, use_prefetcher=True)),
    ("paper's recipe as each trains by default: ours with the resize and RandAugment on "
     "the device (host: decode the crop, flip, 512 canvas), timm's all on the host; "
     "uint8 out",
     dict(auto_augment=None, re_prob=0.25, uint8=True, canvas=512),
     dict(auto_augment=_PAPER, re_prob=0.25, use_prefetcher=True)),
    ("evaluation: resize 248, centre crop 224 (ours: the JPEG's window), uint8 out",
     dict(evaluation=True), dict(evaluation=True)),
    ("evaluation as each runs it by default: ours the JPEG's window in a 512 canvas, "
     "resized in the step; timm's all on the host; uint8 out",
     dict(evaluation=True, canvas=512), dict(evaluation=True)),
)


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


def _timed(next_batch, batch_size, seconds, warmup=2):
  for _ in range(warmup):
    next_batch()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next_batch()
    count += batch_size
  return count / (time.perf_counter() - start)


# ---------------------------------------------------------------- the two sides


def _ours(root, names, threads, batch_size, size):
  """{row: a function that starts a fresh iterator and returns its next-batch
  function} of our pipeline with `threads` tf.data threads. Fresh for each timed cell,
  and dropped after it: a live tf.data iterator keeps refilling its buffers on the
  pinned cores, which would slow timm's cell that follows."""
  from riformer_jax.data import augment, pipeline, sources  # pylint: disable=g-import-not-at-top
  source = sources.get_source("folder", "train", data_dir=root)

  def start(spec):
    if spec.get("evaluation"):
      iterator = pipeline.eval_dataset(
          source, global_batch_size=batch_size, size=size, crop_pct=0.9, process_index=0,
          process_count=1, num_threads=threads, normalize=False,
          canvas=spec.get("canvas", 0)).repeat().as_numpy_iterator()
    else:
      spec = dict(spec)
      uint8 = spec.pop("uint8", False)
      iterator = pipeline.train_batches(
          source, global_batch_size=batch_size, seed=0, recipe=augment.TrainAugment(
              size=size, **spec), process_index=0, process_count=1, num_threads=threads,
          uint8=uint8)
    return lambda: next(iterator)
  return {name: (lambda spec=ours: start(spec)) for name, ours, _ in ROWS if name in names}


def _timm(root, names, batch_size, size):
  """{row: a function producing one collated batch} of timm's transforms on PIL."""
  # torch_models first: its torchvision workaround must precede timm's import.
  import riformer_jax.bench.torch_models  # noqa: F401  # isort: skip
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from timm.data import auto_augment, create_transform  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)
  posterize = auto_augment.NAME_TO_OP["PosterizeIncreasing"]

  def posterize_to_zero_bits(image, bits, **kwargs):
    # Pillow >= 11 refuses 0 bits, which the recipe's magnitude noise reaches;
    # the Pillow timm's recipe was made with returned black (so do we: augment.py).
    return image.point([0] * 256 * len(image.getbands())) if bits <= 0 else \
        posterize(image, bits, **kwargs)

  for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[name] = posterize_to_zero_bits
  files = sorted(glob.glob(os.path.join(root, "train", "*", "*.jpg")))
  position = [0]

  def batch_of(transform):
    images = []
    for _ in range(batch_size):
      path = files[position[0] % len(files)]
      position[0] += 1
      with open(path, "rb") as f:  # timm's ImageDataset: open, PIL, convert("RGB")
        image = Image.open(f).convert("RGB")
      images.append(transform(image))
    if isinstance(images[0], np.ndarray):  # use_prefetcher: uint8, timm's fast_collate
      return torch.from_numpy(np.stack(images))
    return torch.stack(images)  # DataLoader's default_collate

  functions = {}
  for name, _, spec in ROWS:
    if name not in names:
      continue
    if spec.get("evaluation"):
      transform = create_transform(size, is_training=False, interpolation="bicubic",
                                   crop_pct=0.9, use_prefetcher=True)
    else:
      transform = create_transform(size, is_training=True, re_mode="pixel",
                                   interpolation="bicubic", **spec)
    functions[name] = lambda t=transform: (lambda: batch_of(t))
  return functions


def _worker(connection, side, cores, root, names, batch_size, size):
  """A process pinned to `cores` that times rows on request: ("rate", row, seconds)."""
  os.sched_setaffinity(0, cores)
  if side == "ours":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.threading.set_inter_op_parallelism_threads(len(cores))
    tf.config.threading.set_intra_op_parallelism_threads(1)
    rows = _ours(root, names, len(cores), batch_size, size)
  else:
    rows = _timm(root, names, batch_size, size)
  connection.send("ready")
  while True:
    request = connection.recv()
    if request is None:
      return
    try:
      if request[0] == "breakdown":
        connection.send(breakdown(root, size, *request[1:]))
      else:
        _, row, seconds = request
        next_batch = rows[row]()
        rate = _timed(next_batch, batch_size, seconds)
        del next_batch  # our iterator's threads stop before the other side's cell
        gc.collect()
        connection.send(rate)
    except Exception as e:  # pylint: disable=broad-except
      connection.send(RuntimeError(f"{side} pipeline, {request[:2]}: {type(e).__name__}: {e}"))


def _answer(connection):
  answer = connection.recv()
  if isinstance(answer, Exception):
    raise answer
  return answer


class _Side:
  """Worker processes of one side: ours (one, on all cores) or timm (one per core)."""

  def __init__(self, side, cores, root, names, batch_size, size):
    context = multiprocessing.get_context("spawn")
    groups = [set(cores)] if side == "ours" else [{c} for c in cores]
    self.connections, self.processes = [], []
    for group in groups:
      mine, theirs = context.Pipe()
      process = context.Process(target=_worker, args=(theirs, side, group, root, names,
                                                      batch_size, size), daemon=True)
      process.start()
      self.connections.append(mine)
      self.processes.append(process)
    for connection, process in zip(self.connections, self.processes):
      while not connection.poll(1):  # a worker that died would leave recv() waiting
        if not process.is_alive():
          raise RuntimeError(f"{side} worker exited with code {process.exitcode} "
                             "before it was ready (its traceback is above)")
      if connection.recv() != "ready":
        raise RuntimeError(f"{side} worker failed to start")

  def rate(self, row, seconds):
    """Images/s of all this side's workers at once, summed."""
    for connection in self.connections:
      connection.send(("rate", row, seconds))
    return sum(_answer(connection) for connection in self.connections)

  def ask(self, request):
    self.connections[0].send(request)
    return _answer(self.connections[0])

  def close(self):
    for connection in self.connections:
      connection.send(None)
    for process in self.processes:
      process.join(timeout=30)


def run(cores=(1, None), images=96, seconds=8.0, rounds=2, batch_size=32, size=224,
        rows=None):
  """Measured rows: [{row, cores, ours, timm, ratio, ours_rounds, timm_rounds}]."""
  available = sorted(os.sched_getaffinity(0))
  names = [name for name, _, _ in ROWS if rows is None or name in rows]
  if rows is not None and len(names) != len(rows):
    raise ValueError(f"unknown rows {sorted(set(rows) - set(names))}; known: "
                     f"{[name for name, _, _ in ROWS]}")
  results = []
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, images)
    for count in [c or len(available) for c in cores]:
      use = available[:count]
      sides = {side: _Side(side, use, root, names, batch_size, size)
               for side in ("ours", "timm")}
      try:
        measured = {name: {"ours": [], "timm": []} for name in names}
        for round_index in range(rounds):
          order = ("ours", "timm") if round_index % 2 == 0 else ("timm", "ours")
          for name in names:
            for side in order:
              measured[name][side].append(sides[side].rate(name, seconds))
      finally:
        for side in sides.values():
          side.close()
      for name in names:
        ours, timm = (statistics.mean(measured[name][s]) for s in ("ours", "timm"))
        results.append(dict(row=name, cores=count, ours=ours, timm=timm, ratio=ours / timm,
                            ours_rounds=measured[name]["ours"],
                            timm_rounds=measured[name]["timm"]))
  return results


# ---------------------------------------------------------------- breakdown


def breakdown(root, size=224, repeats=200):
  """Our per-image cost by stage, in ms on the calling (pinned) core: [(stage, ms)].

  Each stage runs as a one-thread tf.data map over prepared inputs (the files, their
  crops, 224 px images), less the same map doing nothing; RandAugment's operations
  are timed at magnitude 9, always applied. Batching, the transfer to the device and
  the jitted finishing step are timed per image for a batch of 32.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from riformer_jax.data import augment, decode, pipeline  # pylint: disable=g-import-not-at-top
  from riformer_jax.train import mixup  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(root, "train", "*", "*.jpg")))
  data = [open(p, "rb").read() for p in paths]
  recipe = augment.TrainAugment(size=size)
  options = pipeline._options(1)  # pylint: disable=protected-access

  def cost(function, inputs):
    def per_image(fn):
      ds = tf.data.Dataset.from_tensor_slices(inputs).repeat().enumerate()
      # One element of the result: a value Grappler cannot fold away, cheap to pass on.
      ds = ds.map(lambda i, x: tf.reshape(fn(tf.stack([i, 7 * i + 1]), x), [-1])[:1],
                  num_parallel_calls=1)
      iterator = iter(ds.with_options(options))
      for _ in range(10):
        next(iterator)
      start = time.perf_counter()
      for _ in range(repeats):
        next(iterator)
      return (time.perf_counter() - start) / repeats * 1e3
    return max(0.0, per_image(function) - per_image(lambda seed, x: x))

  def window(seed, x):
    shape = tf.image.extract_jpeg_shape(x)
    return augment.random_resized_crop_window(seed, shape[0], shape[1])

  crops = [decode.decode_image(
      tf.constant(d), lambda h, w, i=i: augment.random_resized_crop_window(
          tf.constant([i, 1], tf.int64), h, w)).numpy() for i, d in enumerate(data[:24])]
  resized = np.stack([augment.resize(c, [size, size]).numpy() for c in crops])
  ragged = tf.RaggedTensor.from_nested_row_lengths(  # [crop, (height), (width), 3]
      np.concatenate([c.reshape(-1, 3) for c in crops]),
      [[c.shape[0] for c in crops], [c.shape[1] for c in crops for _ in range(c.shape[0])]])
  normalised = np.stack([augment.normalize(r).numpy() for r in resized])
  rows = [
      ("read the file", cost(lambda s, p: tf.io.read_file(p), paths)),
      ("decode the whole JPEG (what timm decodes)", cost(
          lambda s, x: tf.io.decode_jpeg(x, channels=3, dct_method="INTEGER_ACCURATE"), data)),
      ("draw the crop window + decode only the window", cost(
          lambda s, x: tf.image.decode_and_crop_jpeg(
              x, tf.stack(window(s, x)), channels=3, dct_method="INTEGER_ACCURATE"), data)),
      (f"resize the crop to {size}, one float pass (default)", cost(
          lambda s, x: augment.resize(x.to_tensor(), [size, size], exact=False), ragged)),
      (f"resize the crop to {size}, PIL's two passes (exact_resize)", cost(
          lambda s, x: augment.resize(x.to_tensor(), [size, size], exact=True), ragged)),
      ("flip (p = 0.5)", cost(lambda s, x: augment.random_flip(s, x), resized)),
  ]
  # A crop of twice the output size or more, as larger photos give: reduced_dct.
  buffer = io.BytesIO()
  Image.fromarray(_photo(4 * size, 5 * size, np.random.default_rng(1))).save(
      buffer, "JPEG", quality=90)
  large = [buffer.getvalue()]
  big_window = lambda h, w: (size // 2, size // 2, 3 * size, 4 * size)  # noqa: E731
  for scale, min_side in (("full scale", None), ("1/2 DCT scale (reduced_dct)", size)):
    rows.append((f"decode a {3 * size}x{4 * size} window of a {4 * size}x{5 * size} JPEG "
                 f"+ resize, {scale}", cost(lambda s, x, m=min_side: augment.resize(
                     decode.decode_image(x, big_window, m), [size, size],
                     exact=False), large)))
  for name in augment.RAND_INCREASING_OPS:
    op, level_to_arg = augment.OPS[name]
    rows.append((f"  RandAugment op {name} (applied, m = 9)", cost(
        lambda s, x, op=op, arg=level_to_arg: op(x, arg(tf.constant(9.0), 1.0)), resized)))
  rows += [
      (f"RandAugment {_PAPER} as drawn (2 ops, p = 0.5 each)",
       cost(lambda s, x: augment.auto_augment(s, x, _PAPER), resized)),
      ("normalise to float32 (host)", cost(lambda s, x: augment.normalize(x), resized)),
      ("random erasing 0.25 on float32 (host)",
       cost(lambda s, x: augment.random_erasing(s, x), normalised)),
      ("random erasing box only (uint8 batches)",
       cost(lambda s, x: augment.random_erasing_box(s, size, size), resized)),
  ]
  for dtype, images in (("float32", normalised), ("uint8", resized)):
    ds = tf.data.Dataset.from_tensor_slices(images).repeat().batch(32).with_options(options)
    iterator = ds.as_numpy_iterator()
    rows.append((f"batch of 32 to numpy, {dtype}, per image",
                 _per_image_ms(lambda it=iterator: next(it), 32, max(1, repeats // 10))))
    batch = next(iterator)
    rows.append((f"host-to-device transfer, {dtype}, per image", _per_image_ms(
        lambda b=batch: jax.block_until_ready(jax.device_put(b)), 32, max(1, repeats // 10))))
  finish = jax.jit(lambda key, x, boxes: mixup.finish_batch(
      key, x, boxes, recipe.mean, recipe.std))
  device_batch = jax.device_put(resized)
  box = [size // 8, size // 8, size // 3, size // 4]  # as large as the mean erased box
  boxes = jax.device_put(np.tile(np.array([box], np.int32), (len(resized), 1)))
  key = jax.random.key(0)
  rows.append(("normalise + erase in the jitted step (this CPU as the device), per image",
               _per_image_ms(lambda: jax.block_until_ready(finish(key, device_batch, boxes)),
                             len(resized), max(1, repeats // 10))))
  return rows


def _per_image_ms(call, batch_size, repeats):
  call()
  start = time.perf_counter()
  for _ in range(repeats):
    call()
  return (time.perf_counter() - start) / repeats / batch_size * 1e3


# ---------------------------------------------------------------- command line


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cores", type=int, nargs="+", default=[1, 0],
                      help="cores to measure on (0: all this process may use)")
  parser.add_argument("--images", type=int, default=96, help="JPEGs to write")
  parser.add_argument("--seconds", type=float, default=8.0, help="timing per cell")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--rows", type=int, nargs="+",
                      help="only these rows (1 = the first of the table)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time each stage of our pipeline on one core")
  parser.add_argument("--json", help="write the rows (and the breakdown) here")
  args = parser.parse_args(argv)
  results = run(args.cores, args.images, args.seconds, args.rounds, args.batch_size,
                args.size, args.rows and [ROWS[i - 1][0] for i in args.rows])
  print(f"input pipeline, {args.size}x{args.size} from ImageNet-sized JPEGs, batch "
        f"{args.batch_size}; {os.cpu_count()} CPU cores, {args.rounds} interleaved rounds "
        f"of {args.seconds:g} s")
  print("| pipeline | cores | ours img/s | timm img/s | ours / timm | ratio by round |")
  print("|---|---|---|---|---|---|")
  for r in results:
    by_round = ", ".join(f"{o / t:.2f}" for o, t in zip(r["ours_rounds"], r["timm_rounds"]))
    print(f"| {r['row']} | {r['cores']} | {r['ours']:.0f} | {r['timm']:.0f} | "
          f"{r['ratio']:.2f} | {by_round} |")
  stages = None
  if args.breakdown:
    with tempfile.TemporaryDirectory() as root:
      write_jpegs(root, min(args.images, 24))
      side = _Side("ours", sorted(os.sched_getaffinity(0))[:1], root, (), args.batch_size,
                   args.size)
      try:
        stages = side.ask(("breakdown",))
      finally:
        side.close()
    print("\nour per-image cost by stage, one core (ms)")
    print("| stage | ms per image |")
    print("|---|---|")
    for stage, ms in stages:
      print(f"| {stage} | {ms:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": results, "breakdown": stages}, f, indent=1)


if __name__ == "__main__":
  main()
