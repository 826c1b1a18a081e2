"""Exported artifacts (ONNX, OpenVINO, LiteRT, jax.export, SavedModel) reload in a fresh
process that imports only their runtime, and match the Flax model."""

import collections
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import riformer_jax
from riformer_jax.data import pipeline
from riformer_jax.deploy import export, onnx_graph, runtimes, sensitivity
from riformer_jax.weights import store

from conftest import TINY, random_params, relative_error

RESOLUTION = 32

# Runs in a fresh interpreter from a temporary directory (the project is not
# importable): for each job, the artifact in the named runtime on the saved inputs,
# whole and first row alone. Then checks what the runtime pulled in.
RELOAD = r"""
import json, sys
import numpy as np
runtime, jobs = sys.argv[1], json.loads(sys.argv[2])

def runner(path):
  if runtime == "onnxruntime":
    import onnxruntime as ort
    options = ort.SessionOptions(); options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x})[0]
  if runtime == "openvino":
    import openvino as ov
    # float32 as the manifest says (OpenVINO's CPU default may be bfloat16)
    config = json.load(open(path[:-len(".xml")] + ".json"))["openvino_config"] \
        if not path.endswith("_int8.xml") else {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(path, "CPU", config)
    return lambda x: compiled({"images": x})["logits"]
  if runtime == "litert":
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(path)
    def run(x):
      (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
      interpreter.resize_tensor_input(source["index"], x.shape)
      interpreter.allocate_tensors()
      interpreter.set_tensor(source["index"], x)
      interpreter.invoke()
      return interpreter.get_tensor(target["index"])
    return run
  if runtime == "jax":
    import jax
    exported = jax.export.deserialize(open(path, "rb").read())
    return lambda x: np.asarray(exported.call(x))
  if runtime == "savedmodel":
    import tensorflow as tf
    function = tf.saved_model.load(path).signatures["serving_default"]
    return lambda x: function(images=tf.constant(x))["logits"].numpy()

for path, inputs, output, sizes in jobs:
  images, run = np.load(inputs), runner(path)
  np.save(output, np.concatenate([run(images[:n]) for n in sizes]))
assert "riformer_jax" not in sys.modules
if runtime in ("onnxruntime", "openvino", "litert"):
  leaked = {"jax", "tensorflow", "torch"} & {m.split(".")[0] for m in sys.modules}
  assert not leaked, f"{runtime} pulled in {leaked}"
"""

SUFFIX = {"onnxruntime": ".onnx", "openvino": ".xml", "litert": ".tflite", "jax": ".jax",
          "savedmodel": "_savedmodel"}


def reload_in_fresh_processes(tmp_path, prefix_and_runtimes, inputs, sizes=(1, 3)):
  """`{(prefix, runtime): logits of images[:n] for n in sizes, stacked}`."""
  np.save(tmp_path / "inputs.npy", inputs)
  by_runtime = {}
  for prefix, runtime in prefix_and_runtimes:
    output = f"{prefix}.{runtime}.out.npy"
    by_runtime.setdefault(runtime, []).append(
        (prefix + SUFFIX[runtime], str(tmp_path / "inputs.npy"), output, list(sizes)))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  for runtime, jobs in by_runtime.items():
    result = subprocess.run([sys.executable, "-c", RELOAD, runtime, json.dumps(jobs)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{runtime}: {result.stderr[-3000:]}"
  return {(prefix, runtime): np.load(f"{prefix}.{runtime}.out.npy")
          for prefix, runtime in prefix_and_runtimes}


def make_source(tmp_path, name, seed=1, **kwargs):
  model = riformer_jax.create_model(name, **TINY, **kwargs)
  params = random_params(model, np.zeros((1, RESOLUTION, RESOLUTION, 3), np.float32), seed)
  directory = store.save_pretrained(
      tmp_path / name, name, dict(TINY, **kwargs), params,
      preprocessing=store.preprocessing_record(RESOLUTION, 0.875))
  return directory, model, params


def flax_logits(model, params, images):
  return np.asarray(jax.jit(model.apply)({"params": params}, images))


def stacked(logits, sizes=(1, 3)):
  return np.concatenate([logits[:n] for n in sizes])


def nhwc_images(seed=0, count=3):
  return np.random.default_rng(seed).standard_normal(
      (count, RESOLUTION, RESOLUTION, 3)).astype(np.float32)


# ------------------------------------------------------------------ the ONNX graph


@pytest.mark.parametrize("name,kwargs,fused", [
    ("riformer_s12", {}, False),
    ("riformer_s12", {"deploy": True}, False),
    ("riformer_s12", {"deploy": True}, True),
    ("identityformer_s12", {}, False),
    ("poolformer_s12", {}, False),
    ("poolformer_s12", {"head": "timm"}, False),
    ("poolformer_s12", {"num_classes": 0}, False),
])
def test_the_onnx_graph_computes_what_the_flax_model_does(name, kwargs, fused):
  import onnxruntime as ort  # noqa: PLC0415
  model = riformer_jax.create_model(name, **{**TINY, **kwargs})
  params = jax.device_get(random_params(
      model, np.zeros((1, RESOLUTION, RESOLUTION, 3), np.float32), 2))
  images = nhwc_images()
  expected = flax_logits(model, params, images)
  for layout in ("NHWC", "NCHW"):
    graph = onnx_graph.metaformer_model(params, token_mixer=model.token_mixer,
                                        head=model.head, resolution=RESOLUTION,
                                        layout=layout, fused=fused)
    session = ort.InferenceSession(graph.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = images if layout == "NHWC" else images.transpose(0, 3, 1, 2)
    assert relative_error(session.run(None, {"images": feed})[0], expected) < 1e-5, layout


# ------------------------------------------------------------------ artifacts


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
def test_every_format_of_a_training_time_riformer_reloads_alone_and_matches(tmp_path):
  source, model, params = make_source(tmp_path, "riformer_s12")
  messages = []
  record = export.export(source, str(tmp_path / "out" / "m"), export.FORMATS, int8=True,
                         calibration_count=16, log=messages.append)
  assert any("re-parameterised" in m for m in messages), messages
  assert record["deploy"] and not record["fused"]
  assert record["input"] == {"name": "images", "shape": ["batch", RESOLUTION, RESOLUTION, 3],
                             "layout": "NHWC", "dtype": "float32"}
  assert record["preprocessing"] == dict(store.preprocessing_record(RESOLUTION, 0.875),
                                         baked_in=False)
  assert record["int8"]["calibration_images"] == 16
  assert json.loads((tmp_path / "out" / "m.json").read_text()) == record
  for files in export.artifact_paths(str(tmp_path / "out" / "m"), export.FORMATS,
                                     int8=True).values():
    assert all(os.path.exists(f.rstrip("/")) for f in files), files
  assert sorted(os.listdir(tmp_path / "out")) == sorted(  # no staging left behind
      ["m.json", "m.onnx", "m.xml", "m.bin", "m.tflite", "m.jax", "m_savedmodel",
       "m_int8.onnx", "m_int8.xml", "m_int8.bin", "m_int8.tflite"])

  images = nhwc_images()
  expected = stacked(flax_logits(model, params, images))  # the training-time model
  prefix = str(tmp_path / "out" / "m")
  runtimes = ("onnxruntime", "openvino", "litert", "jax", "savedmodel")
  logits = reload_in_fresh_processes(
      tmp_path, [(prefix, r) for r in runtimes] + [
          (prefix + "_int8", r) for r in ("onnxruntime", "openvino", "litert")], images)
  for runtime in runtimes:
    assert relative_error(logits[prefix, runtime], expected) < 1e-4, runtime
  assert litert_op_counts(prefix + "_int8.tflite")["QUANTIZE"] > 0
  # LiteRT's int8 takes the MLPs' first matmuls only (quantize.quantize_litert).
  from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
  int8_tensors = [t["name"] for t in Interpreter(prefix + "_int8.tflite").get_tensor_details()
                  if t["dtype"] == np.int8]
  assert any("/fc1/" in name for name in int8_tensors), int8_tensors
  assert not any("/fc2/" in name or "/head/" in name for name in int8_tensors)
  for runtime in ("onnxruntime", "openvino", "litert"):
    int8 = logits[prefix + "_int8", runtime]
    error = relative_error(int8, expected)
    # Quantised, so not equal; but the same function to a few percent, not noise.
    assert 1e-5 < error < 0.1, (runtime, error)


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
@pytest.mark.parametrize("name,kwargs,options", [
    ("poolformer_s12", {}, dict(layout="NCHW")),
    ("identityformer_s12", {}, dict(layout="NHWC")),
    ("riformer_s12", {"deploy": True}, dict(layout="NCHW", fused=True)),
    # Table 9's student, trained form: re-parameterised on export.
    ("riformerv2_s12", {}, dict(layout="NHWC")),
])
def test_poolformer_identityformer_and_the_fused_block_in_every_edge_runtime(
    tmp_path, name, kwargs, options):
  source, model, params = make_source(tmp_path, name, **kwargs)
  prefix = str(tmp_path / "m")
  formats = ("onnx", "openvino", "litert")
  record = export.export(source, prefix, formats, log=lambda _: None, **options)
  assert record["fused"] == options.get("fused", False)
  assert record["deploy"] == (name.startswith("riformer") or kwargs.get("deploy", False))
  images = nhwc_images(1)
  feed = images.transpose(0, 3, 1, 2) if options["layout"] == "NCHW" else images
  expected = stacked(flax_logits(model, params, images))
  logits = reload_in_fresh_processes(
      tmp_path, [(prefix, r) for r in ("onnxruntime", "openvino", "litert")], feed)
  for runtime, value in logits.items():
    assert relative_error(value, expected) < 1e-4, runtime


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
def test_preprocessing_in_the_graph_matches_the_evaluation_pipeline(tmp_path):
  """uint8 crops into the artifacts == the pipeline's normalised images into Flax."""
  source, model, params = make_source(tmp_path, "riformer_s12", deploy=True)
  prefix = str(tmp_path / "m")
  record = export.export(source, prefix, ("onnx", "openvino", "litert", "jax"),
                         preprocess=True, log=lambda _: None)
  assert record["input"]["dtype"] == "uint8" and record["preprocessing"]["baked_in"]
  rng = np.random.default_rng(3)
  raw = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in
         ((40, 50), (37, 37), (64, 41))]
  config = record["preprocessing"]
  crops = np.stack([pipeline.eval_preprocess(
      image, RESOLUTION, config["crop_pct"], config["mean"], config["std"],
      normalize=False).numpy() for image in raw])
  normalised = np.stack([pipeline.eval_preprocess(
      image, RESOLUTION, config["crop_pct"]).numpy() for image in raw])
  assert crops.dtype == np.uint8
  expected = stacked(flax_logits(model, params, normalised))
  logits = reload_in_fresh_processes(
      tmp_path, [(prefix, r) for r in ("onnxruntime", "openvino", "litert", "jax")], crops)
  for runtime, value in logits.items():
    assert relative_error(value, expected) < 1e-4, runtime


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
def test_float16_and_a_fixed_batch(tmp_path):
  source, model, params = make_source(tmp_path, "poolformer_s12")
  prefix = str(tmp_path / "m")
  record = export.export(source, prefix, ("onnx", "openvino", "litert", "jax"), batch=3,
                         dtype="float16", log=lambda _: None)
  assert record["input"]["shape"] == [3, RESOLUTION, RESOLUTION, 3]
  assert record["dtype"] == "float16"
  float32_size = len(onnx_graph.metaformer_model(
      params, token_mixer="pooling", head="original", resolution=RESOLUTION)
      .SerializeToString())
  assert os.path.getsize(prefix + ".onnx") < 0.6 * float32_size  # float16 weights
  images = nhwc_images(2)
  expected = flax_logits(model, params, images)
  logits = reload_in_fresh_processes(
      tmp_path, [(prefix, r) for r in ("onnxruntime", "openvino", "litert", "jax")],
      images, sizes=(3,))
  for runtime, value in logits.items():
    error = relative_error(value, expected)
    assert 1e-6 < error < 1e-2, (runtime, error)  # float16, not float32


def litert_op_counts(path):
  from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
  # _get_ops_details is the interpreter's only listing of a graph's ops.
  return collections.Counter(op["op_name"] for op in Interpreter(path)._get_ops_details())


def litert_input_sizes(path, op_name):
  """The element count of the first input of every `op_name` op in a LiteRT file."""
  from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
  interpreter = Interpreter(path)
  shapes = {t["index"]: t["shape"] for t in interpreter.get_tensor_details()}
  return [int(np.prod(shapes[op["inputs"][0]]))
          for op in interpreter._get_ops_details() if op["op_name"] == op_name]


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
def test_litert_at_a_fixed_batch_runs_each_gelu_as_the_builtin_and_matches(tmp_path):
  """At a fixed batch every block's exact GELU is one builtin GELU op (not an erf
  polynomial, not the tanh form: the parity says so) and the file computes what Flax
  does; at a symbolic batch the GELU stays elementwise, with the same parity."""
  source, model, params = make_source(tmp_path, "poolformer_s12")
  fixed, symbolic = str(tmp_path / "fixed"), str(tmp_path / "symbolic")
  export.export(source, fixed, ("litert",), batch=3, log=lambda _: None)
  export.export(source, symbolic, ("litert",), log=lambda _: None)
  blocks = sum(TINY["depths"])
  fixed_ops, symbolic_ops = litert_op_counts(fixed + ".tflite"), litert_op_counts(
      symbolic + ".tflite")
  assert fixed_ops["GELU"] == blocks, fixed_ops
  # Each GroupNorm1 centres once (two per block and the head's), each pooling mixer
  # subtracts its input once; nothing broadcasts the full tensor, and the only
  # reshapes are of the per-sample statistics (batch-sized).
  assert fixed_ops["SUB"] == (2 * blocks + 1) + blocks, fixed_ops
  assert fixed_ops["BROADCAST_TO"] == 0, fixed_ops
  assert set(litert_input_sizes(fixed + ".tflite", "RESHAPE")) == {3}
  assert symbolic_ops["GELU"] == 0 and sum(symbolic_ops.values()) > sum(
      fixed_ops.values()) + 20 * blocks, symbolic_ops
  images = nhwc_images(count=3)
  expected = flax_logits(model, params, images)
  logits = reload_in_fresh_processes(
      tmp_path, [(fixed, "litert"), (symbolic, "litert")], images, sizes=(3,))
  for prefix in (fixed, symbolic):
    assert relative_error(logits[prefix, "litert"], expected) < 1e-5, prefix


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
def test_int8_accuracy_is_measured_on_the_evaluation_split(tmp_path):
  """runtimes.int8_accuracy: float32 top-1 equals Flax's on the same pipeline images."""
  source, model, params = make_source(tmp_path, "riformer_s12", deploy=True)
  prefix = str(tmp_path / "m")
  export.export(source, prefix, ("onnx", "openvino", "litert"), int8=True,
                calibration_count=8, log=lambda _: None)
  manifest, rows = runtimes.int8_accuracy(prefix, "synthetic", "test", limit=40)
  batches = list(runtimes.evaluation_batches(manifest, "synthetic", "test", limit=40))
  images, labels = (np.concatenate(parts) for parts in zip(*batches))
  assert len(labels) == 40
  flax_top1 = 100 * np.mean(np.argmax(flax_logits(model, params, images), -1) == labels)
  assert [r["runtime"] for r in rows] == ["onnxruntime", "openvino", "litert"]
  for row in rows:
    assert row["images"] == 40
    assert row["float32_top1"] == pytest.approx(flax_top1)
    # The int8 file's own predictions, counted here: its top-1 and its agreement with
    # the float32 file's (not with the labels, not with itself).
    suffix, batch = runtimes.SUFFIX[row["runtime"]], manifest["input"]["shape"][0]
    batch = 32 if batch == "batch" else batch
    float32 = runtimes.predict(runtimes.load(prefix + suffix, row["runtime"]), images, batch)
    int8 = runtimes.predict(runtimes.load(prefix + "_int8" + suffix, row["runtime"]),
                            images, batch)
    assert row["int8_top1"] == pytest.approx(100 * np.mean(int8 == labels))
    assert row["agreement"] == pytest.approx(100 * np.mean(int8 == float32))
    assert row["agreement"] >= 75, row  # a working quantisation, even of a tiny model


def test_int8_accuracy_counts_each_file_s_hits_and_their_agreement(tmp_path, monkeypatch):
  """int8_accuracy's bookkeeping with runners whose predictions are set by position:
  float32 wrong on every 5th image, int8 on every 4th, so its three numbers differ."""
  prefix = str(tmp_path / "m")
  for suffix in (".onnx", "_int8.onnx"):
    open(prefix + suffix, "w").close()
  manifest = {"input": {"shape": [8, 32, 32, 3], "layout": "NHWC"},
              "preprocessing": {"input_size": [3, 32, 32], "crop_pct": 0.875,
                                "baked_in": False}}
  with open(prefix + ".json", "w") as f:
    json.dump(manifest, f)
  labels = np.concatenate([b[1] for b in runtimes.evaluation_batches(
      manifest, "synthetic", "test", limit=40)])
  wrong_every = {"m.onnx": 5, "m_int8.onnx": 4}

  def load(path, runtime, threads=None):
    assert runtime == "onnxruntime"
    seen, every = [0], wrong_every[os.path.basename(path)]

    def run(images):
      position = np.arange(seen[0], seen[0] + len(images)) % len(labels)
      seen[0] += len(images)
      predicted = np.where(position % every == 0, (labels[position] + 1) % 10,
                           labels[position])
      return np.eye(10, dtype=np.float32)[predicted]
    return run

  monkeypatch.setattr(runtimes, "load", load)
  _, (row,) = runtimes.int8_accuracy(prefix, "synthetic", "test", limit=40)
  position = np.arange(40)
  float32_hit, int8_hit = position % 5 != 0, position % 4 != 0
  assert row["images"] == 40
  assert row["float32_top1"] == pytest.approx(100 * float32_hit.mean())  # 80
  assert row["int8_top1"] == pytest.approx(100 * int8_hit.mean())  # 75
  assert row["agreement"] == pytest.approx(100 * (float32_hit == int8_hit).mean())  # 65
  # The change's standard error over the same 40 images, paired.
  change = int8_hit.astype(float) - float32_hit
  assert row["change_se"] == pytest.approx(100 * change.std(ddof=1) / np.sqrt(40))


@pytest.mark.heavy  # real quantisation and ONNX Runtime
def test_sensitivity_quantises_each_layer_alone_then_leaves_the_worst_float(
    tmp_path, capsys):
  source, _, _ = make_source(tmp_path, "poolformer_s12")
  prefix = str(tmp_path / "m")
  export.export(source, prefix, ("onnx",), log=lambda _: None)
  layers, stem = sensitivity.quantisable_layers(prefix + ".onnx")
  # TINY's 6 blocks have 2 MLP convs each, and 3 downsampling convs; the stem apart.
  assert len(layers) == 15 and len(stem) == 1 and stem[0].startswith("stem")
  float32_top1, count, alone, kept_float = sensitivity.measure(
      prefix, drop=2, calibration_count=8, limit=64, log=lambda _: None)
  assert count == 64 and sorted(row["layer"] for row in alone) == sorted(layers)
  assert [row["agreement"] for row in alone] == sorted(row["agreement"] for row in alone)
  downsampling = [name for name in layers if ".downsample" in name]
  assert [row["float_layers"] for row in kept_float] == [
      [], [alone[0]["layer"]], [alone[0]["layer"], alone[1]["layer"]], downsampling]
  assert len(downsampling) == 3 and kept_float[-1]["export"]
  # The last row is the export's own int8 file: the same predictions.
  export.export(source, str(tmp_path / "e"), ("onnx",), int8=True, calibration_count=8,
                log=lambda _: None)
  (row,) = [r for r in runtimes.int8_accuracy(str(tmp_path / "e"), limit=64)[1]]
  assert kept_float[-1]["agreement"] == pytest.approx(row["agreement"])
  assert kept_float[-1]["top1"] == pytest.approx(row["int8_top1"])
  assert row["float32_top1"] == pytest.approx(float32_top1)
  sensitivity.main(["--artifacts", prefix, "--drop", "1", "--calibration_images", "8",
                    "--limit", "32"])
  out = capsys.readouterr().out
  assert "| layer quantised alone |" in out and "(the export)" in out


# ------------------------------------------------------------------ errors


def test_export_errors_name_the_problem_and_leave_nothing(tmp_path, monkeypatch, capsys):
  source, _, _ = make_source(tmp_path, "poolformer_s12")
  prefix = str(tmp_path / "out" / "m")
  with pytest.raises(SystemExit) as failure:
    export.main(["--src", source, "--dst", prefix, "--format", "onnx,tensorrt"])
  assert "unknown format(s) ['tensorrt']" in str(failure.value)
  with pytest.raises(SystemExit) as failure:
    export.main(["--src", source, "--dst", prefix, "--fused"])
  assert "--fused needs a RIFormer" in str(failure.value)
  with pytest.raises(SystemExit) as failure:
    export.main(["--src", str(tmp_path / "nowhere"), "--dst", prefix])
  assert "nowhere" in str(failure.value) and "manifest.json" in str(failure.value)
  with pytest.raises(SystemExit) as failure:  # exported at the manifest's size before
    export.main(["--src", source, "--dst", prefix, "--resolution", "0"])
  assert "--resolution=0: expected a positive size" in str(failure.value)
  # A damaged model directory: a truncated weight file, then no weights at all.
  damaged = tmp_path / "damaged"
  shutil.copytree(source, damaged)
  weight = max((p for p in (damaged / "variables").rglob("*")
                if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
  weight.write_bytes(weight.read_bytes()[:100])
  with pytest.raises(SystemExit) as failure:
    export.main(["--src", str(damaged), "--dst", prefix])
  assert f"{damaged}/variables: a weight file is damaged" in str(failure.value)
  shutil.rmtree(damaged / "variables")
  with pytest.raises(SystemExit) as failure:
    export.main(["--src", str(damaged), "--dst", prefix])
  assert "damaged: no variables/ checkpoint next to the manifest" in str(failure.value)

  def broken(*args, **kwargs):
    raise RuntimeError("the converter failed")
  monkeypatch.setattr(export, "litert_model", broken)
  with pytest.raises(RuntimeError, match="the converter failed"):
    export.export(source, prefix, ("onnx", "litert"), log=lambda _: None)
  assert os.listdir(tmp_path / "out") == []  # no ONNX file without its manifest

  # An unreachable URL (an OSError): one line naming it, no traceback.
  monkeypatch.setenv("RIFORMER_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(SystemExit) as failure:
    export.main(["--src", "http://127.0.0.1:9/poolformer_s12.pth", "--dst", prefix])
  assert "http://127.0.0.1:9/poolformer_s12.pth: download failed" in str(failure.value)


@pytest.mark.heavy  # a LiteRT conversion: not in `make check`
def test_a_litert_converter_failure_is_one_line_and_leaves_nothing(tmp_path):
  source, _, _ = make_source(tmp_path, "riformer_s12", deploy=True)
  # A 1x1 last stage at batch 1: the converter's batch_matmul of rank 4.
  with pytest.raises(export.ExportError, match=r"LiteRT's converter failed at 32 px, "
                     r"batch 1: 'tfl.batch_matmul' op found invalid output rank"):
    export.export(source, str(tmp_path / "out" / "m"), ("onnx", "litert"), batch=1,
                  log=lambda _: None)
  assert os.listdir(tmp_path / "out") == []


def test_a_damaged_artifact_is_named_by_its_runtime(tmp_path, capsys):
  """A truncated file in each runtime: `ArtifactError` naming the file, and `edge` says
  it in one line."""
  source, _, _ = make_source(tmp_path, "riformer_s12", deploy=True)
  prefix = str(tmp_path / "m")
  export.export(source, prefix, ("onnx", "openvino"), int8=True, calibration_count=4,
                log=lambda _: None)
  for path in (prefix + "_int8.onnx", prefix + "_int8.xml"):
    with open(path, "r+b") as f:
      f.truncate(100)
  for runtime, suffix in (("onnxruntime", "_int8.onnx"), ("openvino", "_int8.xml")):
    with pytest.raises(runtimes.ArtifactError, match=rf"m{suffix}: {runtime} cannot load"):
      runtimes.load(prefix + suffix, runtime)
  assert runtimes.load(prefix + ".onnx", "onnxruntime")(nhwc_images()).shape == (3, 10)
  with pytest.raises(SystemExit) as failure:
    runtimes.main(["--artifacts", prefix, "--limit", "4"])
  assert f"edge: {prefix}_int8" in str(failure.value)
  assert "cannot load it" in str(failure.value)


def test_onnx_needs_a_metaformer(tmp_path):
  # (That the base package imports no runtime: test_package.)
  source, _, _ = make_source(tmp_path, "convformer_s18")
  with pytest.raises(export.ExportError, match="convformer_s18; litert, jax and"):
    export.export(source, str(tmp_path / "c"), ("onnx",), log=lambda _: None)


# ------------------------------------------------------------------ full size


@pytest.mark.slow
def test_full_riformer_s12_and_poolformer_s12_match_at_224(tmp_path):
  images = np.random.default_rng(0).standard_normal((3, 224, 224, 3)).astype(np.float32)
  jobs, expected = [], {}
  for name, kwargs, fused in (("riformer_s12", {"deploy": True}, True),
                              ("poolformer_s12", {}, False)):
    model = riformer_jax.create_model(name, **kwargs)
    params = random_params(model, images[:1], 4)
    source = store.save_pretrained(tmp_path / name, name, kwargs, params)
    prefix = str(tmp_path / f"{name}_out")
    export.export(source, prefix, ("onnx", "openvino", "litert", "jax"), fused=fused,
                  log=lambda _: None)
    expected[prefix] = stacked(flax_logits(model, params, images))
    jobs += [(prefix, r) for r in ("onnxruntime", "openvino", "litert", "jax")]
  for (prefix, runtime), value in reload_in_fresh_processes(tmp_path, jobs, images).items():
    assert relative_error(value, expected[prefix]) < 1e-4, (prefix, runtime)
