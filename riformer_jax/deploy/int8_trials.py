"""int8 recipes side by side: ONNX Runtime's and NNCF's in both runtimes, and LiteRT's.

  python -m riformer_jax.deploy.int8_trials --artifacts runs/edge/student \\
      [--variants ort,nncf,...] [--time_calls 50]
  python -m riformer_jax.deploy.int8_trials --artifacts runs/edge/student --litert all

For PREFIX.onnx (the float32 file `riformer_jax.deploy.export` wrote), each variant
writes an int8 QDQ file from the same calibration images (the export's: the first
`--calibration_images` of the embedded training split), which ONNX Runtime runs and
OpenVINO runs after converting it (as the export's own int8 IR is made). Each row is
that file against the float32 file in the same runtime on the evaluation split: top-1
change with its paired standard error, and agreement of top-1. NNCF's accuracy control
checks agreement on the next `--validation_images` of the training split, never on the
evaluation split. With `--time_calls`, each file's latency on one thread at the
manifest's batch (1 if symbolic), the variants' calls interleaved round by round.
`--keep DIR` leaves each variant's files there. `--litert` does the same for
ai-edge-quantizer's recipes on PREFIX.tflite, in LiteRT.
"""

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from riformer_jax.deploy import export, quantize, runtimes, sensitivity

# name: (what the variant does, how it writes DESTINATION from SOURCE).
VARIANTS = {
    "ort": ("ONNX Runtime, MLP convs, percentile ranges (the export's)",
            lambda src, dst, c: quantize.quantize_onnx(src, dst, c.images, c.batch)),
    "ort_minmax": ("ONNX Runtime, MLP convs, min/max ranges",
                   lambda src, dst, c: quantize.quantize_onnx(
                       src, dst, c.images, c.batch, ranges="MinMax")),
    "ort_all_convs": ("ONNX Runtime, every conv but the stem, min/max ranges",
                      lambda src, dst, c: quantize.quantize_onnx(
                          src, dst, c.images, c.batch, float_layers=c.stem,
                          ranges="MinMax")),
    "ort_all_convs_percentile": ("ONNX Runtime, every conv but the stem, percentile ranges",
                                 lambda src, dst, c: quantize.quantize_onnx(
                                     src, dst, c.images, c.batch, float_layers=c.stem)),
    "ort_percentile_9999": ("ONNX Runtime, MLP convs, 99.99th percentile ranges",
                            lambda src, dst, c: quantize.quantize_onnx(
                                src, dst, c.images, c.batch, percentile=99.99)),
    "ort_percentile_999": ("ONNX Runtime, MLP convs, 99.9th percentile ranges",
                           lambda src, dst, c: quantize.quantize_onnx(
                               src, dst, c.images, c.batch, percentile=99.9)),
    "ort_entropy": ("ONNX Runtime, MLP convs, entropy ranges",
                    lambda src, dst, c: quantize.quantize_onnx(
                        src, dst, c.images, c.batch, ranges="Entropy")),
    "nncf": ("NNCF, its defaults",
             lambda src, dst, c: quantize.quantize_nncf(src, dst, c.images, c.batch)),
    "nncf_float_convs": ("NNCF, stem and downsampling float",
                         lambda src, dst, c: quantize.quantize_nncf(
                             src, dst, c.images, c.batch, ignored=c.float_convs)),
    "nncf_bias": ("NNCF, full bias correction",
                  lambda src, dst, c: quantize.quantize_nncf(
                      src, dst, c.images, c.batch, fast_bias_correction=False)),
    "nncf_transformer": ("NNCF, transformer model type",
                         lambda src, dst, c: quantize.quantize_nncf(
                             src, dst, c.images, c.batch, transformer=True)),
    "nncf_accuracy": ("NNCF with accuracy control (agreement >= 98.5%)",
                      lambda src, dst, c: quantize.quantize_nncf(
                          src, dst, c.images, c.batch, validation=c.validation,
                          max_drop=0.015)),
    "nncf_transformer_accuracy": (
        "NNCF, transformer model type, with accuracy control",
        lambda src, dst, c: quantize.quantize_nncf(
            src, dst, c.images, c.batch, transformer=True, validation=c.validation,
            max_drop=0.015)),
}

# The same for LiteRT's int8 (ai-edge-quantizer on PREFIX.tflite, FULLY_CONNECTED ops).
_EVERY_MATMUL = r"^(?!.*/(stem|head)/).*$"  # all but the classifier's
LITERT_VARIANTS = {
    "litert": ("LiteRT, static, the MLPs' fc1 (the export's)",
               lambda model, c: quantize.quantize_litert(model, c.images, c.batch)),
    "litert_every_matmul": ("LiteRT, static, fc1 and fc2",
                            lambda model, c: quantize.quantize_litert(
                                model, c.images, c.batch, layers=_EVERY_MATMUL)),
    "litert_fc2": ("LiteRT, static, fc2 only",
                   lambda model, c: quantize.quantize_litert(model, c.images, c.batch,
                                                           layers=r".*/fc2/.*")),
    "litert_dynamic": ("LiteRT, dynamic (run-time ranges), fc1 and fc2",
                       lambda model, c: quantize.quantize_litert(
                           model, c.images, c.batch, layers=_EVERY_MATMUL,
                           dynamic=True)),
}


class _Calibration:
  """What the variants share: calibration images, the graph's fixed batch, the Conv
  names to keep float, and the accuracy control's validation images with the float32
  file's predictions (`make_validation()`, run only if a variant asks for them)."""

  def __init__(self, images, batch, stem=(), float_convs=(), make_validation=None):
    self.images, self.batch, self.stem = images, batch, stem
    self.float_convs, self._make_validation = float_convs, make_validation

  @functools.cached_property
  def validation(self):
    return self._make_validation()


def _evaluation_set(prefix, dataset, split, data_dir, limit):
  """`(manifest, the file's fixed batch or None, the batch to feed, images, labels)`."""
  manifest = runtimes.read_export_manifest(prefix)
  images, labels = runtimes.evaluation_set(manifest, dataset, split, data_dir, limit)
  return (manifest, *runtimes.fixed_batch(manifest), images, labels)


def _training_images(manifest, dataset, count, data_dir):
  """The first `count` training images of `dataset`, as the file takes them."""
  config = manifest["preprocessing"]
  return export.calibration_images(dataset, "train", count, config["input_size"][-1],
                                   config["crop_pct"], manifest["input"]["layout"],
                                   config["baked_in"], data_dir)


def _scores(comparison):
  """`{top1, change, change_se, agreement}` of a `runtimes.comparison`."""
  return {"top1": comparison["int8_top1"],
          "change": comparison["int8_top1"] - comparison["float32_top1"],
          "change_se": comparison["change_se"], "agreement": comparison["agreement"]}


def _median_ms(run, images, calls):
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    run(images)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def measure(prefix, variants=tuple(VARIANTS), calibration_count=128,
            validation_count=500, dataset="synthetic", split="test", data_dir=None,
            limit=None, time_calls=0, rounds=3, keep=None, log=print):
  """`(images, float32 top-1 {runtime: value}, rows)`: a row per variant with, per
  runtime (onnxruntime, openvino), `{top1, change, change_se, agreement[, ms]}` (ms:
  the median call of the best of `rounds` rounds of `time_calls`).
  `keep`: a folder to leave each variant's files in (VARIANT.onnx, .xml, .bin)."""
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}: expected some of {list(VARIANTS)}")
  manifest, fixed_batch, batch, images, labels = _evaluation_set(prefix, dataset, split,
                                                                 data_dir, limit)
  source = prefix + ".onnx"

  def validation():  # the training images after the calibration ones
    images = _training_images(manifest, dataset, calibration_count + validation_count,
                              data_dir)[calibration_count:]
    return images, runtimes.predict(runtimes.load(source, "onnxruntime"), images, batch)
  shared = _Calibration(_training_images(manifest, dataset, calibration_count, data_dir),
                        fixed_batch, sensitivity.quantisable_layers(source)[1],
                        quantize.float_convs(source), validation)

  with tempfile.TemporaryDirectory() as scratch:
    float32 = {"onnxruntime": source, "openvino": os.path.join(scratch, "float32.xml")}
    export.save_openvino(source, float32["openvino"])
    float32_predictions = {runtime: runtimes.predict(runtimes.load(path, runtime), images,
                                                     batch)
                           for runtime, path in float32.items()}
    rows, files = [], {}
    for name in variants:
      path = os.path.join(scratch, name + ".onnx")
      log(f"{name}: {VARIANTS[name][0]}")
      with contextlib.redirect_stdout(sys.stderr):  # NNCF logs and draws to stdout
        VARIANTS[name][1](source, path, shared)
      export.save_openvino(path, os.path.join(scratch, name + ".xml"))
      if keep:
        os.makedirs(keep, exist_ok=True)
        for suffix in (".onnx", ".xml", ".bin"):
          shutil.copy(os.path.join(scratch, name + suffix), keep)
      files[name] = {"onnxruntime": path, "openvino": os.path.join(scratch, name + ".xml")}
      row = {"variant": name, "what": VARIANTS[name][0]}
      for runtime, file in files[name].items():
        counts = runtimes.prediction_counts(
            float32_predictions[runtime],
            runtimes.predict(runtimes.load(file, runtime), images, batch), labels)
        row[runtime] = _scores(runtimes.comparison(counts))
      rows.append(row)
    if time_calls:
      sample = np.repeat(images[:1], fixed_batch or 1, 0)
      runs = {(row["variant"], runtime): runtimes.load(file, runtime, threads=1)
              for row in rows for runtime, file in files[row["variant"]].items()}
      timings = {key: [] for key in runs}
      for run in runs.values():
        run(sample)  # compile and warm up
      for _ in range(rounds):
        for key, run in runs.items():
          timings[key].append(_median_ms(run, sample, time_calls))
      for row in rows:
        for runtime in files[row["variant"]]:
          row[runtime]["ms"] = min(timings[(row["variant"], runtime)])
  float32_top1 = {runtime: 100 * float(np.mean(p == labels))
                  for runtime, p in float32_predictions.items()}
  return len(labels), float32_top1, rows


def measure_litert(prefix, variants=tuple(LITERT_VARIANTS), calibration_count=128,
                   dataset="synthetic", split="test", data_dir=None, limit=None,
                   log=print):
  """`(images, float32 top-1, rows)` of LiteRT's int8 recipes on PREFIX.tflite, each
  row `{variant, what, litert: {top1, change, change_se, agreement}}` against the
  float32 file."""
  unknown = sorted(set(variants) - set(LITERT_VARIANTS))
  if unknown:
    raise ValueError(f"unknown LiteRT variant(s) {unknown}: expected some of "
                     f"{list(LITERT_VARIANTS)}")
  manifest, fixed_batch, batch, images, labels = _evaluation_set(prefix, dataset, split,
                                                                 data_dir, limit)
  shared = _Calibration(_training_images(manifest, dataset, calibration_count, data_dir),
                        fixed_batch)
  with open(prefix + ".tflite", "rb") as f:
    float_model = f.read()
  float32 = runtimes.predict(runtimes.load(prefix + ".tflite", "litert"), images, batch)
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for name in variants:
      log(f"{name}: {LITERT_VARIANTS[name][0]}")
      path = os.path.join(scratch, name + ".tflite")
      with open(path, "wb") as f:
        f.write(LITERT_VARIANTS[name][1](float_model, shared))
      result = runtimes.comparison(runtimes.prediction_counts(
          float32, runtimes.predict(runtimes.load(path, "litert"), images, batch), labels))
      rows.append({"variant": name, "what": LITERT_VARIANTS[name][0],
                   "litert": _scores(result)})
  return len(labels), 100 * float(np.mean(float32 == labels)), rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--artifacts", required=True, help="the PREFIX export wrote")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--litert", default="",
                      help="instead, LiteRT's recipes on PREFIX.tflite: 'all' or some of "
                           f"{', '.join(LITERT_VARIANTS)}")
  parser.add_argument("--calibration_images", type=int, default=128)
  parser.add_argument("--validation_images", type=int, default=500,
                      help="training-split images the accuracy control checks on")
  parser.add_argument("--dataset", default="synthetic")
  parser.add_argument("--split", default="test")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--limit", type=int, default=None, help="first N images only")
  parser.add_argument("--time_calls", type=int, default=0,
                      help="time each file over this many calls per round (0: no timing)")
  parser.add_argument("--keep", default=None,
                      help="leave each variant's int8 files in this folder")
  args = parser.parse_args(argv)
  source = args.artifacts + (".tflite" if args.litert else ".onnx")
  if not os.path.isfile(source):
    sys.exit(f"int8_trials: {source}: no such file (export it first)")
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  try:
    if args.litert:
      count, float32_top1, rows = measure_litert(
          args.artifacts, (tuple(LITERT_VARIANTS) if args.litert == "all" else
                           [v.strip() for v in args.litert.split(",") if v.strip()]),
          args.calibration_images, args.dataset, args.split, args.data_dir, args.limit,
          log=log)
      float32_top1 = {"litert": float32_top1}
    else:
      count, float32_top1, rows = measure(
          args.artifacts, [v.strip() for v in args.variants.split(",") if v.strip()],
          args.calibration_images, args.validation_images, args.dataset, args.split,
          args.data_dir, args.limit, args.time_calls, keep=args.keep, log=log)
  except ImportError as e:
    sys.exit(f"int8_trials: {e}; the edge runtimes are an optional extra: "
             "pip install -r requirements-edge.txt")
  except (ValueError, OSError) as e:  # a damaged file, a data set that is not there
    sys.exit(f"int8_trials: {e}")
  names = {"onnxruntime": "ORT", "openvino": "OpenVINO", "litert": "LiteRT"}
  print(f"{args.artifacts}: {count} images of {args.dataset}/{args.split}; float32 top-1 "
        + ", ".join(f"{top1:.2f} ({names[runtime]})"
                    for runtime, top1 in float32_top1.items()))
  timed = bool(args.time_calls) and not args.litert
  header = ["variant"] + [f"{names[r]} {what}" for r in float32_top1
                          for what in ("change ± SE", "agreement")]
  header += [f"{names[r]} ms" for r in float32_top1] if timed else []
  print("\n| " + " | ".join(header) + " |")
  print("|---|" + "---:|" * (len(header) - 1))
  for row in rows:
    cells = [row["what"]]
    for runtime in float32_top1:
      r = row[runtime]
      cells += [f"{r['change']:+.2f} ± {r['change_se']:.2f}", f"{r['agreement']:.2f}"]
    cells += [f"{row[r]['ms']:.2f}" for r in float32_top1] if timed else []
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
