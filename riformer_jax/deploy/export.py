"""Deployable artifacts of a model: ONNX, OpenVINO IR, LiteRT, `jax.export`, SavedModel.

  python -m riformer_jax.deploy.export --src runs/demo/distilled/student --dst out/student \\
      [--format all|onnx,openvino,litert,jax,savedmodel] [--batch 1] [--layout NCHW] \\
      [--dtype float16] [--preprocess] [--fused] [--int8]

`--src` is any directory `load_pretrained` reads, or a timm hub name
(`hf-hub:timm/poolformer_s12.sail_in1k`, converted once into the cache). A
training-time RIFormer is re-parameterised first (the deploy form computes the same
function without the mixer).
Every artifact takes images `images` (NHWC by default, float32; uint8 RGB with
`--preprocess`, which bakes `(x / 255 - mean) / std` into the graph) and returns
float32 `logits`. Next to them `PREFIX.json` records the model, the input and output,
and the preprocessing the model expects (mean, std, crop_pct, interpolation, size), as
timm's `pretrained_cfg` does. Files (PREFIX = `--dst`):

  PREFIX.onnx               ONNX (opset 17): ONNX Runtime, or any ONNX consumer
  PREFIX.xml, PREFIX.bin    OpenVINO IR
  PREFIX.tflite             LiteRT (TensorFlow Lite)
  PREFIX.jax                a serialized `jax.export.Exported`
  PREFIX_savedmodel/        TensorFlow SavedModel, signature `serving_default`
  PREFIX_int8.{onnx,xml,bin,tflite}   with --int8: post-training static quantisation

The routes, chosen by measurement (BENCHMARKS.md, "Edge, this CPU"):
  ONNX: the graph is built from the params (`riformer_jax.deploy.onnx_graph` says why).
  OpenVINO: that ONNX graph read by OpenVINO's own ONNX front end; it runs as fast as
    `torch.onnx`'s file of MMPreTrain's RIFormer (NCHW graphs ran 20% faster in
    OpenVINO than jax2onnx's NHWC trace, issue 17).
  LiteRT: the JAX program lowered to StableHLO (jax2tf) and converted by TensorFlow's
    `TFLiteConverter`, which lowers StableHLO to LiteRT builtins: the model as JAX
    computes it, NHWC as LiteRT's kernels are; a fixed batch gives a much smaller graph.
  jax, SavedModel: `jax.export` (StableHLO with the parameters baked in).
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from riformer_jax.deploy import quantize, runtimes
from riformer_jax.models import activations, baselines, metaformer, registry, surgery
from riformer_jax.weights import hub, pretrained, store

FORMATS = ("onnx", "openvino", "litert", "jax", "savedmodel")
# LiteRT's int8 comes from ai-edge-quantizer: TFLiteConverter's own int8 (representative
# data set) on the StableHLO route wrote files that LiteRT 2.3 aborts on (2026-12-02).
INT8_FORMATS = ("onnx", "openvino", "litert")
# Which files each format writes, by suffix of PREFIX (a "/" ends a directory).
_FILES = {"onnx": (".onnx",), "openvino": (".xml", ".bin"), "litert": (".tflite",),
          "jax": (".jax",), "savedmodel": ("_savedmodel/",)}


class ExportError(ValueError):
  """A user error (bad option, unsupported model for a format): one line, no traceback."""


def load_for_export(src, fused=False, log=print):
  """`(module, params, manifest)` ready to export; training-time RIFormer -> deploy form.
  `src` is a directory, or a hub name or URL converted once into the cache."""
  src = pretrained.resolve_directory(src)
  manifest = store.read_manifest(src)
  module, variables = pretrained.load_pretrained(src)
  params = variables["params"]
  is_metaformer = isinstance(module, metaformer.MetaFormer)
  if registry.has_deploy_form(module):
    params = surgery.reparameterize(params)
    module = module.clone(deploy=True)
    log(f"{src}: a training-time RIFormer; exporting its re-parameterised deploy form "
        "(the same function without the token mixer)")
  if fused:
    if not (is_metaformer and module.deploy):
      raise ExportError(f"--fused needs a RIFormer (deploy or training form); {src} holds "
                        f"{manifest['model']}")
    module = module.clone(fused=True)
  return module, jax.device_get(params), manifest


def preprocessing(manifest, resolution=None, crop_pct=None):
  """The evaluation preprocessing the model expects, in timm's `pretrained_cfg` terms."""
  config = dict(store.preprocessing_record(), **manifest.get("preprocessing", {}))
  if crop_pct is not None:
    config["crop_pct"] = crop_pct or None  # 0: no resize, only the centre crop
  size = resolution or config["input_size"][-1]
  config["input_size"] = [3, size, size]
  return config


def inference_function(module, params, layout="NHWC", preprocess=None):
  """`images -> float32 logits` with the params closed over (baked in on export)."""
  variables = {"params": params}

  def forward(images):
    if preprocess:  # (x / 255 - mean) / std, as pipeline.eval_preprocess
      shape = (3,) if layout == "NHWC" else (3, 1, 1)
      mean, std = (jnp.reshape(jnp.asarray(v, jnp.float32), shape) for v in preprocess)
      images = (images.astype(jnp.float32) / 255.0 - mean) / std
    if layout == "NCHW":
      images = jnp.transpose(images, (0, 2, 3, 1))
    return module.apply(variables, images, train=False).astype(jnp.float32)
  return forward


def input_spec(resolution, batch=None, layout="NHWC", preprocess=False):
  """`(shape, dtype)` of the `images` input; a None batch is symbolic."""
  shape = ((batch, resolution, resolution, 3) if layout == "NHWC"
           else (batch, 3, resolution, resolution))
  return shape, (np.uint8 if preprocess else np.float32)


def export_jax(module, params, resolution, batch=None, layout="NHWC", preprocess=None,
               platforms=("cpu", "cuda")):
  """A `jax.export.Exported`; a None batch is the symbolic dimension `b`."""
  shape, dtype = input_spec(resolution, batch, layout, preprocess)
  if batch is None:
    (symbolic,) = jax.export.symbolic_shape("b")
    shape = (symbolic,) + shape[1:]
  forward = inference_function(module, params, layout, preprocess)
  return jax.export.export(jax.jit(forward), platforms=platforms)(
      jax.ShapeDtypeStruct(shape, dtype))


def _tf_function(module, params, resolution, batch, layout, preprocess):
  """The model as a `tf.function` (through jax2tf's StableHLO) with a named input."""
  import tensorflow as tf  # noqa: PLC0415 (optional: SavedModel and LiteRT only)
  from jax.experimental import jax2tf  # noqa: PLC0415

  shape, dtype = input_spec(resolution, batch, layout, preprocess)
  polymorphic = None if batch else ["(b, " + ", ".join(map(str, shape[1:])) + ")"]
  converted = jax2tf.convert(
      inference_function(module, params, layout, preprocess),
      polymorphic_shapes=polymorphic, native_serialization_platforms=("cpu", "cuda"),
      native_serialization_disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(activations.ERF_CUSTOM_CALL)])

  @tf.function(input_signature=[tf.TensorSpec(shape, tf.as_dtype(dtype), name="images")],
               autograph=False)  # plain call, nothing to convert (and no warnings)
  def serving_default(images):
    return {"logits": converted(images)}
  return serving_default


def save_saved_model(module, params, resolution, directory, batch=None, layout="NHWC",
                     preprocess=None):
  """A TensorFlow SavedModel with a `serving_default` signature."""
  import tensorflow as tf  # noqa: PLC0415

  function = _tf_function(module, params, resolution, batch, layout, preprocess)
  wrapper = tf.Module()
  wrapper.serving_default = function
  tf.saved_model.save(wrapper, directory, signatures={"serving_default": function})


def litert_model(module, params, resolution, batch=None, layout="NHWC", preprocess=None,
                 dtype="float32"):
  """LiteRT flatbuffer bytes (float16: weights stored as float16)."""
  import tensorflow as tf  # noqa: PLC0415

  holder = tf.Module()  # what the converter reads the function's variables from
  holder.serving_default = _tf_function(module, params, resolution, batch, layout,
                                        preprocess)
  with activations.builtin_gelu_for_litert():  # GELU as one builtin op (at a fixed batch)
    concrete = holder.serving_default.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
  if dtype == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  try:
    return converter.convert()
  except Exception as e:  # ConverterError and the MLIR passes' own types
    errors = [line.rsplit("error: ", 1)[-1] for line in str(e).splitlines()
              if "error: " in line] or [type(e).__name__]
    raise ExportError(
        f"LiteRT's converter failed at {resolution} px, batch {batch or 'symbolic'}: "
        f"{errors[0].strip()[:300]}. Degenerate sizes (a 1x1 last stage at batch 1) "
        "are known to fail: try another --resolution or --batch") from e


def onnx_model(module, params, resolution, batch=None, layout="NHWC", preprocess=None,
               dtype="float32"):
  """An `onnx.ModelProto` of a MetaFormer (RIFormer, IdentityFormer, PoolFormer) or of
  a MetaFormer baseline with `onnx_graph.BASELINE_MIXERS` (riformerv2, PoolFormerV2)."""
  from riformer_jax.deploy import onnx_graph  # noqa: PLC0415 (needs the edge extra: onnx)

  if isinstance(module, baselines.MetaFormerBaseline):
    return onnx_graph.baseline_model(
        params, token_mixers=module.token_mixers, norm=module.norm, resolution=resolution,
        batch=batch, layout=layout, dtype=dtype, preprocess=preprocess)
  return onnx_graph.metaformer_model(
      params, token_mixer=module.token_mixer, head=module.head, resolution=resolution,
      batch=batch, layout=layout, dtype=dtype, preprocess=preprocess, fused=module.fused)


def _onnx_covers(module):
  from riformer_jax.deploy import onnx_graph  # noqa: PLC0415 (the edge extra: onnx)

  if isinstance(module, baselines.MetaFormerBaseline):
    return set(module.token_mixers) <= set(onnx_graph.BASELINE_MIXERS)
  return isinstance(module, metaformer.MetaFormer)


def save_openvino(onnx_path, xml_path, dtype="float32"):
  """OpenVINO IR converted by OpenVINO from the ONNX file (weights float16 on request).

  Which precision it computes in is the loader's choice: on CPUs with bfloat16 units
  OpenVINO picks bfloat16 (relative error 4e-3 on our models) unless compiled with
  `{"INFERENCE_PRECISION_HINT": "f32"}`; a hint stored in the IR's rt_info is not
  applied (2026.4), so the manifest records the config that float32 needs."""
  import openvino as ov  # noqa: PLC0415

  # Core.read_model is the ONNX front end that ov.convert_model wraps (none of its
  # options are needed). save_model compresses to float16 unless told not to.
  ov.save_model(ov.Core().read_model(onnx_path), xml_path,
                compress_to_fp16=dtype == "float16")


def calibration_images(dataset, split, count, resolution, crop_pct, layout="NHWC",
                       preprocess=False, data_dir=None):
  """`count` evaluation-preprocessed images of `dataset/split`, as the artifact takes
  them (uint8 crops with `preprocess`, else normalised float32)."""
  images = np.concatenate([images for images, _ in runtimes.pipeline_batches(
      dataset, split, size=resolution, crop_pct=crop_pct, layout=layout,
      normalize=not preprocess, data_dir=data_dir, limit=count)])
  if len(images) < count:
    raise ExportError(f"{dataset}/{split} holds {len(images)} images; "
                      f"--calibration_images={count} asks for more")
  return images


def artifact_paths(prefix, formats, int8=False):
  """`{format or format_int8: [paths]}` of what `export` writes for `prefix`."""
  paths = {f: [prefix + s for s in _FILES[f]] for f in formats}
  if int8:
    paths.update({f + "_int8": [prefix + "_int8" + s for s in _FILES[f]]
                  for f in formats if f in INT8_FORMATS})
  return paths


def export(src, prefix, formats=FORMATS, *, resolution=None, batch=None, layout="NHWC",
           dtype="float32", preprocess=False, fused=False, int8=False, crop_pct=None,
           calibration_dataset="synthetic", calibration_split="train",
           calibration_count=128, data_dir=None, log=print):
  """Writes the artifacts of `src` in `formats` next to `prefix`; returns the manifest.

  Everything is written in a temporary directory and moved into place at the end: a
  failure leaves no partial artifact at `prefix`.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ExportError(f"unknown format(s) {unknown}: expected some of {FORMATS} or 'all'")
  if layout not in ("NHWC", "NCHW"):
    raise ExportError(f"--layout={layout}: expected NHWC or NCHW")
  if dtype not in ("float32", "float16"):
    raise ExportError(f"--dtype={dtype}: expected float32 or float16")
  if int8 and dtype != "float32":
    raise ExportError("--int8 quantises the float32 model; drop --dtype=float16")
  if int8 and not set(INT8_FORMATS) & set(formats):
    raise ExportError(f"--int8 writes int8 {', '.join(INT8_FORMATS)} artifacts; --format "
                      f"{','.join(formats)} has none of them")
  if int8 and batch and calibration_count < batch:
    raise ExportError(f"--calibration_images={calibration_count} is less than one "
                      f"batch of {batch}")
  if resolution is not None and resolution < 1:  # 0 read as "the manifest's" before
    raise ExportError(f"--resolution={resolution}: expected a positive size")
  if batch is not None and batch < 1:
    raise ExportError(f"--batch={batch}: expected a positive batch size (or none for "
                      "a symbolic one)")
  module, params, manifest = load_for_export(src, fused, log)
  config = preprocessing(manifest, resolution, crop_pct)
  size = config["input_size"][-1]
  normalisation = (config["mean"], config["std"]) if preprocess else None
  if {"onnx", "openvino"} & set(formats) and not _onnx_covers(module):
    raise ExportError(f"--format onnx and openvino cover the MetaFormers (RIFormer, "
                      f"IdentityFormer, PoolFormer) and the baselines whose token mixers "
                      f"are affine, pooling or identity (riformerv2, PoolFormerV2), not "
                      f"{manifest['model']}; litert, jax and savedmodel take any model")

  parent = os.path.dirname(os.path.abspath(prefix))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  stage = os.path.join(staging, os.path.basename(prefix))
  kwargs = dict(batch=batch, layout=layout, preprocess=normalisation)
  try:
    calibration = None
    if int8:
      calibration = calibration_images(calibration_dataset, calibration_split,
                                       calibration_count, size, config["crop_pct"], layout,
                                       preprocess, data_dir)
      log(f"calibrating int8 on {len(calibration)} images of "
          f"{calibration_dataset}/{calibration_split}")
    if {"onnx", "openvino"} & set(formats):
      import onnx  # noqa: PLC0415
      onnx.save(onnx_model(module, params, size, dtype=dtype, **kwargs), stage + ".onnx")
      if int8:
        quantize.quantize_onnx(stage + ".onnx", stage + "_int8.onnx", calibration,
                               batch)
      if "openvino" in formats:
        save_openvino(stage + ".onnx", stage + ".xml", dtype)
        if int8:
          save_openvino(stage + "_int8.onnx", stage + "_int8.xml")
    if "litert" in formats:
      float_model = litert_model(module, params, size, dtype=dtype, **kwargs)
      with open(stage + ".tflite", "wb") as f:
        f.write(float_model)
      if int8:
        with open(stage + "_int8.tflite", "wb") as f:
          f.write(quantize.quantize_litert(float_model, calibration, batch))
    # float16 in XLA: the model's own compute dtype (params and norm statistics
    # stay float32, as in training with a half-precision compute dtype).
    xla_module = module.clone(dtype=jnp.float16) if dtype == "float16" else module
    if "jax" in formats:
      with open(stage + ".jax", "wb") as f:
        f.write(export_jax(xla_module, params, size, **kwargs).serialize())
    if "savedmodel" in formats:
      save_saved_model(xla_module, params, size, stage + "_savedmodel", **kwargs)

    paths = artifact_paths(prefix, formats, int8)
    shape, input_dtype = input_spec(size, batch, layout, preprocess)
    record = {
        "model": manifest["model"], "kwargs": manifest["kwargs"],
        "source": src if hub.is_remote(src) else os.path.abspath(src), "deploy": bool(getattr(module, "deploy", False)),
        "fused": bool(getattr(module, "fused", False)),
        "artifacts": {k: [os.path.basename(p) for p in v] for k, v in paths.items()},
        "input": {"name": "images", "shape": ["batch" if d is None else d for d in shape],
                  "layout": layout, "dtype": np.dtype(input_dtype).name},
        "output": {"name": "logits", "dtype": "float32"},
        "dtype": dtype,
        # compile_model's config for the float32 result (export.save_openvino); a
        # float16 file computes in what the device prefers.
        "openvino_config": ({"INFERENCE_PRECISION_HINT": "f32"} if dtype == "float32"
                            else {}),
        "preprocessing": dict(config, baked_in=preprocess),
        "int8": ({"method": "post-training static", "calibration":
                  f"{calibration_dataset}/{calibration_split}",
                  "calibration_images": len(calibration)} if int8 else None),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": runtimes.package_versions(("jax", "onnx", "onnxruntime", "openvino",
                                           "tensorflow-cpu", "ai-edge-litert")),
    }
    with open(stage + ".json", "w") as f:
      json.dump(record, f, indent=2)
    # All written: move into place (the manifest last, so that it names only files
    # that are there).
    for files in paths.values():
      for path in files:
        staged = os.path.join(staging, os.path.basename(path.rstrip("/")))
        final = path.rstrip("/")
        if os.path.isdir(final):
          shutil.rmtree(final)
        os.replace(staged, final)
    os.replace(stage + ".json", prefix + ".json")
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  for files in artifact_paths(prefix, formats, int8).values():
    log(f"wrote {' '.join(files)}")
  log(f"wrote {prefix}.json ({manifest['model']}, input {record['input']['shape']} "
      f"{record['input']['dtype']} {layout})")
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True,
                      help="a directory load_pretrained reads, or an hf-hub: name")
  parser.add_argument("--dst", required=True, help="output path prefix")
  parser.add_argument("--format", default="all",
                      help=f"'all' or a comma-separated list of {', '.join(FORMATS)}")
  parser.add_argument("--resolution", type=int, default=None,
                      help="input height and width (default: the manifest's, else 224)")
  parser.add_argument("--batch", type=int, default=None,
                      help="a fixed batch size (default: symbolic; edge runtimes run "
                           "a fixed batch faster, LiteRT much faster)")
  parser.add_argument("--layout", default="NHWC", choices=("NHWC", "NCHW"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
  parser.add_argument("--preprocess", action="store_true",
                      help="uint8 RGB input; the mean/std normalisation is in the graph")
  parser.add_argument("--fused", action="store_true",
                      help="RIFormer with the fused deploy block")
  parser.add_argument("--crop_pct", type=float, default=None,
                      help="recorded in the manifest (default: the source's, else "
                           "0.9; 0: no resize, only the centre crop)")
  parser.add_argument("--int8", action="store_true",
                      help="also int8 onnx, openvino and litert, calibrated on --calibration_*")
  parser.add_argument("--calibration_dataset", default="synthetic",
                      help="any data set riformer_jax.data.sources reads (default: the embedded one)")
  parser.add_argument("--calibration_split", default="train")
  parser.add_argument("--calibration_images", type=int, default=128)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  formats = FORMATS if args.format == "all" else tuple(
      f.strip() for f in args.format.split(",") if f.strip())
  try:
    export(args.src, args.dst, formats, resolution=args.resolution, batch=args.batch,
           layout=args.layout, dtype=args.dtype, preprocess=args.preprocess,
           fused=args.fused, int8=args.int8, crop_pct=args.crop_pct,
           calibration_dataset=args.calibration_dataset,
           calibration_split=args.calibration_split,
           calibration_count=args.calibration_images, data_dir=args.data_dir)
  except ImportError as e:
    sys.exit(f"export: {e}; the edge runtimes are an optional extra: "
             "pip install \"riformer-jax[edge]\" (in a clone: pip install -r "
             "requirements-edge.txt)")
  except (ValueError, OSError) as e:  # ExportError is a ValueError; OSError: an
    sys.exit(f"export: {e}")          # unreachable URL or hub, an unreadable file


if __name__ == "__main__":
  main()
