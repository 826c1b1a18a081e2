"""Which layers cost an int8 file its accuracy: ONNX Runtime's int8 one layer at a time.

  python -m riformer_jax.deploy.sensitivity --artifacts runs/edge/student [--drop 4]

For PREFIX.onnx (the float32 file `riformer_jax.deploy.export` wrote), every convolution
but the stem (the MLPs' and the downsampling ones) is quantised alone, with the
export's settings and calibration (`quantize.quantize_onnx`, the manifest's
preprocessing, the embedded training split by default), and that file's predictions
on the evaluation split are compared with the float32 file's: top-1 change with its
standard error, and agreement. Layers are listed worst first (least agreement). Then
every convolution but the stem quantised, with the worst 0, 1, ... `--drop` of them
kept in float32, and last the export's own choice (`quantize.float_convs`): what
leaving layers out buys. Each layer alone adds its own quantisation error only; errors
of several layers add up, so the second table, not the first, is what a file gets.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

from riformer_jax.deploy import export, quantize, runtimes


def quantisable_layers(onnx_path):
  """`(the Conv nodes but the stem, in order; the stem's)`."""
  import onnx  # noqa: PLC0415
  convs = [node.name for node in onnx.load(onnx_path).graph.node if node.op_type == "Conv"]
  return ([name for name in convs if not name.startswith("stem")],
          [name for name in convs if name.startswith("stem")])


def _scorer(prefix, dataset, split, data_dir, limit):
  """`path -> {top1, change, change_se, agreement}` against PREFIX.onnx, all on the same
  evaluation images (read once)."""
  manifest = runtimes.read_export_manifest(prefix)
  _, batch = runtimes.fixed_batch(manifest)
  images, labels = runtimes.evaluation_set(manifest, dataset, split, data_dir, limit)
  float32 = runtimes.predict(runtimes.load(prefix + ".onnx", "onnxruntime"), images, batch)

  def score(path):
    int8 = runtimes.predict(runtimes.load(path, "onnxruntime"), images, batch)
    row = runtimes.comparison(runtimes.prediction_counts(float32, int8, labels))
    return {"top1": row["int8_top1"], "change": row["int8_top1"] - row["float32_top1"],
            "change_se": row["change_se"], "agreement": row["agreement"]}
  return manifest, batch, 100 * np.mean(float32 == labels), len(labels), score


def measure(prefix, drop=4, calibration_dataset="synthetic", calibration_split="train",
            calibration_count=128, dataset="synthetic", split="test", data_dir=None,
            limit=None, log=print):
  """`(float32 top-1, images, [per-layer rows], [rows with the worst k left float, then
  the export's choice]`)."""
  manifest, batch, float32_top1, count, score = _scorer(prefix, dataset, split, data_dir,
                                                        limit)
  config = manifest["preprocessing"]
  calibration = export.calibration_images(
      calibration_dataset, calibration_split, calibration_count, config["input_size"][-1],
      config["crop_pct"], manifest["input"]["layout"], config["baked_in"], data_dir)
  fixed_batch, _ = runtimes.fixed_batch(manifest)
  layers, stem = quantisable_layers(prefix + ".onnx")
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, "int8.onnx")

    def quantised(**selection):
      quantize.quantize_onnx(prefix + ".onnx", path, calibration, fixed_batch, **selection)
      return score(path)

    alone = []
    for i, layer in enumerate(layers):
      alone.append(dict(layer=layer, **quantised(only=[layer], float_layers=stem)))
      log(f"{i + 1}/{len(layers)} {layer}: agreement {alone[-1]['agreement']:.1f}")
    alone.sort(key=lambda row: (row["agreement"], row["change"]))
    kept_float = []
    for k in range(min(drop, len(layers) - 1) + 1):
      left_out = [row["layer"] for row in alone[:k]]
      kept_float.append(dict(float_layers=left_out,
                             **quantised(float_layers=stem + left_out)))
    default = [name for name in quantize.float_convs(prefix + ".onnx") if name not in stem]
    kept_float.append(dict(float_layers=default, export=True, **quantised()))
  return float32_top1, count, alone, kept_float


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--artifacts", required=True, help="the PREFIX export wrote")
  parser.add_argument("--drop", type=int, default=4,
                      help="leave up to this many of the worst layers in float32")
  parser.add_argument("--calibration_images", type=int, default=128)
  parser.add_argument("--dataset", default="synthetic")
  parser.add_argument("--split", default="test")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--limit", type=int, default=None, help="first N images only")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.artifacts + ".onnx"):
    sys.exit(f"sensitivity: {args.artifacts}.onnx: no such file (export it first)")
  try:
    float32_top1, count, alone, kept_float = measure(
        args.artifacts, args.drop, calibration_count=args.calibration_images,
        dataset=args.dataset, split=args.split, data_dir=args.data_dir, limit=args.limit,
        log=lambda m: print(m, file=sys.stderr, flush=True))
  except (ValueError, OSError) as e:  # a damaged file, a data set that is not there
    sys.exit(f"sensitivity: {e}")
  print(f"{args.artifacts}: float32 top-1 {float32_top1:.2f} on {count} images of "
        f"{args.dataset}/{args.split}; ONNX Runtime int8")
  print("\n| layer quantised alone | int8 top-1 | change ± SE | agreement |")
  print("|---|---:|---:|---:|")
  for row in alone:
    print(f"| {row['layer']} | {row['top1']:.2f} | {row['change']:+.2f} ± "
          f"{row['change_se']:.2f} | {row['agreement']:.2f} |")
  print("\n| layers kept float32 (worst first) | int8 top-1 | change ± SE | agreement |")
  print("|---|---:|---:|---:|")
  for row in kept_float:
    layers = ", ".join(row["float_layers"]) or "none"
    print(f"| {layers + (' (the export)' if row.get('export') else '')} | {row['top1']:.2f} "
          f"| {row['change']:+.2f} ± {row['change_se']:.2f} | {row['agreement']:.2f} |")


if __name__ == "__main__":
  main()
