"""Exported artifacts in their runtimes, and int8 against float32 on a data set.

  python -m riformer_jax.deploy.runtimes --artifacts out/student [--dataset synthetic --split test]

prints, for each runtime `riformer_jax.deploy.export` wrote PREFIX for, the top-1 of the
float32 and int8 artifacts on the evaluation split (preprocessed by the project's
evaluation pipeline as the manifest says) and how often their top-1 agree.

`load(path, runtime, threads)` returns `images -> logits` for one artifact; each
runtime is imported only when asked for (`riformer_jax.bench.edge` runs each in its own process).
"""

import argparse
import json
import os
import sys

import numpy as np

RUNTIMES = ("xla", "onnxruntime", "openvino", "litert")
# The file each runtime reads, by suffix of PREFIX (PREFIX_int8 for int8).
SUFFIX = {"xla": ".jax", "onnxruntime": ".onnx", "openvino": ".xml", "litert": ".tflite"}


class ArtifactError(ValueError):
  """An artifact its runtime cannot load (damaged, truncated, or not what the suffix
  says): one line naming the file and the runtime's own reason."""


def load(path, runtime, threads=None, precision=None):
  """`images (numpy) -> logits (numpy)` running `path` in `runtime` on the CPU.

  `precision`: OpenVINO's INFERENCE_PRECISION_HINT, "f32" unless given (its CPU
  default is bfloat16 where the CPU has bfloat16 units; export.save_openvino).

  Raises:
    ArtifactError: the runtime failed to read or compile `path`.
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime={runtime!r}: expected one of {RUNTIMES}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    return _load(path, runtime, threads, precision)
  except ImportError:
    raise
  except Exception as e:  # each runtime raises its own types (pybind, RuntimeError)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
    raise ArtifactError(f"{path}: {runtime} cannot load it ({type(e).__name__}: "
                        f"{reason}); export it again") from e


def _load(path, runtime, threads, precision):
  if runtime == "onnxruntime":
    import onnxruntime as ort  # noqa: PLC0415
    options = ort.SessionOptions()
    options.log_severity_level = 3  # float16 graphs warn about CPU kernels they lack
    if threads:
      options.intra_op_num_threads = threads
      options.inter_op_num_threads = 1
      # Idle pool threads would otherwise spin after each run, taking a core from
      # whatever runs next (another runtime in the benchmark).
      options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]
  if runtime == "openvino":
    import openvino as ov  # noqa: PLC0415
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision or "f32"}
    if threads:
      config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    return lambda images: request.infer({0: images})[compiled.output(0)].copy()
  if runtime == "litert":
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
    interpreter = Interpreter(path, **({"num_threads": threads} if threads else {}))
    interpreter.allocate_tensors()
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    allocated = [tuple(source["shape"])]  # resized only when the batch changes

    def run(images):
      if allocated[0] != images.shape:
        interpreter.resize_tensor_input(source["index"], images.shape)
        interpreter.allocate_tensors()
        allocated[0] = images.shape
      interpreter.set_tensor(source["index"], images)
      interpreter.invoke()
      return interpreter.get_tensor(target["index"]).copy()
    return run
  import jax  # noqa: PLC0415 (xla, the last of the RUNTIMES load() accepts)
  with open(path, "rb") as f:
    exported = jax.export.deserialize(f.read())
  call = jax.jit(exported.call)
  return lambda images: np.asarray(call(images))


def read_export_manifest(prefix):
  """PREFIX.json, what `export` wrote beside its artifacts (a model directory's
  manifest is `riformer_jax.weights.store.read_manifest`'s)."""
  path = prefix + ".json"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no export manifest (write one with "
                            "`python -m riformer_jax.deploy.export`)")
  with open(path) as f:
    return json.load(f)


def package_versions(names):
  """`{name: version}` of the installed distributions among `names`."""
  from importlib import metadata  # noqa: PLC0415
  versions = {}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def pipeline_batches(dataset, split, *, size, crop_pct, layout="NHWC", normalize=True,
                     data_dir=None, limit=None):
  """`(images, labels)` of a split through the evaluation pipeline, 64 at a time, in
  `layout`; uint8 crops with `normalize=False`; the first `limit` images only."""
  from riformer_jax.data import pipeline, sources  # noqa: PLC0415 (TensorFlow)
  source = sources.get_source(dataset, split, data_dir=data_dir)
  seen = 0
  for batch in pipeline.eval_batches(
      source, global_batch_size=64, size=size, crop_pct=crop_pct or None,
      process_index=0, process_count=1, normalize=normalize):
    images, labels = batch["image"][batch["mask"]], batch["label"][batch["mask"]]
    if limit:
      images, labels = images[:limit - seen], labels[:limit - seen]
    if layout == "NCHW":
      images = images.transpose(0, 3, 1, 2)
    if len(labels):
      yield np.ascontiguousarray(images), labels
    seen += len(labels)
    if limit and seen >= limit:
      return


def evaluation_batches(manifest, dataset, split, data_dir=None, limit=None):
  """`(images as the artifacts take them, labels)` of a split, 64 at a time."""
  config = manifest["preprocessing"]
  return pipeline_batches(dataset, split, size=config["input_size"][-1],
                          crop_pct=config["crop_pct"], layout=manifest["input"]["layout"],
                          normalize=not config["baked_in"], data_dir=data_dir,
                          limit=limit)


def fixed_batch(manifest):
  """`(the artifact's fixed batch or None, the batch to feed it)`: 32 where symbolic."""
  batch = manifest["input"]["shape"][0]
  batch = None if batch == "batch" else batch
  return batch, batch or 32


def evaluation_set(manifest, dataset, split, data_dir=None, limit=None):
  """`(images, labels)` of the whole split (`evaluation_batches` concatenated)."""
  return tuple(np.concatenate(parts) for parts in zip(
      *evaluation_batches(manifest, dataset, split, data_dir, limit)))


def predict(run, images, batch):
  """Argmax of `run` over `images` in chunks of `batch` (the artifact's fixed batch)."""
  predictions = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    if len(chunk) < batch:  # a fixed-batch artifact: pad the last chunk
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
    predictions.append(np.argmax(run(chunk), -1)[:len(images) - start])
  return np.concatenate(predictions)


def int8_accuracy(prefix, dataset="synthetic", split="test", data_dir=None, limit=None,
                  threads=None):
  """Rows `{runtime, float32_top1, int8_top1, agreement, images}` per runtime."""
  manifest = read_export_manifest(prefix)
  _, batch = fixed_batch(manifest)
  runners = {}
  for runtime in RUNTIMES[1:]:
    paths = [prefix + suffix + SUFFIX[runtime] for suffix in ("", "_int8")]
    if all(os.path.exists(p) for p in paths):
      runners[runtime] = [load(p, runtime, threads) for p in paths]
  if not runners:
    raise FileNotFoundError(f"{prefix}: no float32/int8 pair of artifacts (export "
                            "with --int8)")
  counts = {runtime: np.zeros(6, np.int64) for runtime in runners}
  for images, labels in evaluation_batches(manifest, dataset, split, data_dir, limit):
    for runtime, (float32_run, int8_run) in runners.items():
      counts[runtime] += prediction_counts(predict(float32_run, images, batch),
                                           predict(int8_run, images, batch), labels)
  return manifest, [dict(runtime=runtime, **comparison(count))
                    for runtime, count in counts.items()]


def prediction_counts(float32, int8, labels):
  """`[float32 right, int8 right, the two agree, float32 only right, int8 only right,
  images]` of two files' predictions on the same images: sums over batches add up."""
  right32, right8 = float32 == labels, int8 == labels
  return np.array([np.sum(right32), np.sum(right8), np.sum(float32 == int8),
                   np.sum(right32 & ~right8), np.sum(right8 & ~right32), len(labels)])


def comparison(counts):
  """`{images, float32_top1, int8_top1, agreement, change_se}` (points) of
  `prediction_counts`. The change is the mean of a per-image d in {-1, 0, 1} over the
  same images, so its standard error is std(d) / sqrt(n)."""
  right32, right8, agree, only32, only8, total = (int(c) for c in counts)
  change = (only8 - only32) / total
  variance = max((only8 + only32) / total - change ** 2, 0.0)
  return {"images": total, "float32_top1": 100 * right32 / total,
          "int8_top1": 100 * right8 / total, "agreement": 100 * agree / total,
          "change_se": 100 * float(np.sqrt(variance / max(total - 1, 1)))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--artifacts", required=True, help="the PREFIX export wrote")
  parser.add_argument("--dataset", default="synthetic")
  parser.add_argument("--split", default="test")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--limit", type=int, default=None, help="first N images only")
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args(argv)
  try:
    manifest, rows = int8_accuracy(args.artifacts, args.dataset, args.split,
                                   args.data_dir, args.limit)
  except ImportError as e:
    sys.exit(f"edge: {e}; the edge runtimes are an optional extra: "
             "pip install \"riformer-jax[edge]\" (in a clone: pip install -r "
             "requirements-edge.txt)")
  except (ValueError, OSError) as e:  # ArtifactError is a ValueError
    sys.exit(f"edge: {e}")
  print(f"{manifest['model']} from {manifest['source']}, {args.dataset}/{args.split}, "
        f"{rows[0]['images']} images")
  print("| runtime | float32 top-1 | int8 top-1 | change ± SE | top-1 agreement |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['runtime']} | {r['float32_top1']:.2f} | {r['int8_top1']:.2f} | "
          f"{r['int8_top1'] - r['float32_top1']:+.2f} ± {r['change_se']:.2f} | "
          f"{r['agreement']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"manifest": manifest, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
