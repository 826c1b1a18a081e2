"""int8 recipes (riformer_jax.deploy.int8_trials, riformer_jax.deploy.quantize): real ONNX
Runtime, OpenVINO and NNCF on a tiny PoolFormer at 32 px."""

import collections
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from riformer_jax.deploy import export, int8_trials, quantize, runtimes

from test_export import make_source


def quantised_inputs(path):
  """`{node name: how many of its inputs come from a DequantizeLinear}` of a QDQ file."""
  graph = onnx.load(path).graph
  dequantised = {out for node in graph.node if node.op_type == "DequantizeLinear"
                 for out in node.output}
  return collections.Counter({node.name: sum(i in dequantised for i in node.input)
                              for node in graph.node})


@pytest.fixture(scope="module")
def float32_file(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("trials")
  source, _, _ = make_source(tmp_path, "poolformer_s12")
  prefix = str(tmp_path / "m")
  export.export(source, prefix, ("onnx", "litert"), log=lambda _: None)
  return source, prefix


def calibration(prefix, count):
  manifest = runtimes.read_export_manifest(prefix)
  return export.calibration_images("synthetic", "train", count,
                                   manifest["preprocessing"]["input_size"][-1],
                                   manifest["preprocessing"]["crop_pct"])


@pytest.mark.heavy  # NNCF's quantisation
def test_nncf_quantises_the_residual_stream_too_and_keeps_the_ignored_layers_float(
    float32_file, tmp_path):
  _, prefix = float32_file
  images = calibration(prefix, 8)
  everything, ignoring = str(tmp_path / "all.onnx"), str(tmp_path / "ignored.onnx")
  quantize.quantize_nncf(prefix + ".onnx", everything, images)
  kept_float = quantize.float_convs(prefix + ".onnx")
  quantize.quantize_nncf(prefix + ".onnx", ignoring, images, ignored=kept_float)
  nodes = {n.name: n.op_type for n in onnx.load(prefix + ".onnx").graph.node}
  by_nncf, by_nncf_ignoring = quantised_inputs(everything), quantised_inputs(ignoring)
  # Unlike quantize_onnx (Convs only), NNCF also feeds Adds int8 inputs.
  assert any(by_nncf[name] for name, op in nodes.items() if op == "Add")
  # Weights (and activations but the stem's, whose input is the image) quantised.
  assert all(by_nncf[name] == (1 if name.startswith("stem") else 2) for name in kept_float)
  assert all(by_nncf_ignoring[name] == 0 for name in kept_float)
  mlp_convs = [name for name, op in nodes.items()
               if op == "Conv" and name not in kept_float]
  assert mlp_convs and all(by_nncf_ignoring[name] == 2 for name in mlp_convs)


@pytest.mark.heavy  # ONNX Runtime's calibration, three times
def test_the_export_s_activation_ranges_are_percentiles_inside_the_min_max(
    float32_file, tmp_path, monkeypatch):
  from onnxruntime import quantization  # noqa: PLC0415
  _, prefix = float32_file
  images = calibration(prefix, 16)
  methods, quantize_static = [], quantization.quantize_static

  def spy(*args, **kwargs):
    methods.append(kwargs["calibrate_method"])
    return quantize_static(*args, **kwargs)
  monkeypatch.setattr(quantization, "quantize_static", spy)
  scales = {}
  for name, options in (("default", {}), ("minmax", {"ranges": "MinMax"}),
                        ("p99.9", {"percentile": 99.9})):
    path = str(tmp_path / f"{name}.onnx")
    quantize.quantize_onnx(prefix + ".onnx", path, images, **options)
    scales[name] = {i.name: onnx.numpy_helper.to_array(i)
                    for i in onnx.load(path).graph.initializer
                    if i.name.endswith("_scale") and not i.dims}
  assert methods == [quantization.CalibrationMethod.Percentile,
                     quantization.CalibrationMethod.MinMax,
                     quantization.CalibrationMethod.Percentile]
  minmax = scales["minmax"]
  assert minmax.keys() == scales["default"].keys() == scales["p99.9"].keys()
  assert len(minmax) > 4
  # Percentiles clip the tails: no range wider than min/max; at the 99.9th, most
  # narrower (16 small images are too few for the 99.999th to differ from the max).
  for name in ("default", "p99.9"):
    assert all(scales[name][k] <= minmax[k] * (1 + 1e-6) for k in minmax)
  assert sum(scales["p99.9"][k] < 0.99 * minmax[k] for k in minmax) > len(minmax) // 2


def test_the_accuracy_control_metric_is_agreement_with_the_float32_predictions(
    float32_file):
  _, prefix = float32_file
  images = calibration(prefix, 20)
  model = onnx.load(prefix + ".onnx")
  predictions = runtimes.predict(runtimes.load(prefix + ".onnx", "onnxruntime"), images, 20)
  wrong = predictions.copy()
  wrong[::4] = (wrong[::4] + 1) % 10  # 5 of 20 changed
  metric = quantize._agreement_metric()
  items = [(images[:10], predictions[:10]), (images[10:], predictions[10:])]
  assert metric(model, items) == (1.0, [1.0] * 20)
  value, per_image = metric(model, [(images[:10], wrong[:10]), (images[10:], wrong[10:])])
  assert value == pytest.approx(0.75)
  assert per_image == [0.0 if i % 4 == 0 else 1.0 for i in range(20)]


@pytest.mark.heavy  # every kind of recipe, in ONNX Runtime and OpenVINO
def test_the_trials_score_each_recipe_in_both_runtimes_and_the_first_is_the_export_s(
    float32_file, tmp_path, capsys):
  source, prefix = float32_file
  variants = ("ort", "ort_minmax", "ort_all_convs", "nncf_transformer_accuracy")
  count, float32_top1, rows = int8_trials.measure(
      prefix, variants, calibration_count=8, validation_count=24, limit=64,
      time_calls=2, rounds=1, log=lambda _: None)
  assert count == 64 and [row["variant"] for row in rows] == list(variants)
  for row in rows:
    for runtime in ("onnxruntime", "openvino"):
      result = row[runtime]
      assert result["change"] == pytest.approx(result["top1"]
                                               - float32_top1[runtime])
      assert 0 <= result["agreement"] <= 100 and result["ms"] > 0
  # The "ort" row is the export's own int8 file, in both runtimes.
  exported = str(tmp_path / "e")
  export.export(source, exported, ("onnx", "openvino"), int8=True, calibration_count=8,
                log=lambda _: None)
  for reference in runtimes.int8_accuracy(exported, limit=64)[1]:
    runtime = reference["runtime"]
    assert rows[0][runtime]["top1"] == pytest.approx(reference["int8_top1"])
    assert rows[0][runtime]["agreement"] == pytest.approx(reference["agreement"])
    assert float32_top1[runtime] == pytest.approx(reference["float32_top1"])
  kept = tmp_path / "kept"
  int8_trials.main(["--artifacts", prefix, "--variants", "ort,nncf",
                    "--calibration_images", "8", "--limit", "32", "--keep", str(kept)])
  assert sorted(os.listdir(kept)) == ["nncf.bin", "nncf.onnx", "nncf.xml",
                                      "ort.bin", "ort.onnx", "ort.xml"]
  # Not only the same accuracy (every file agrees on a random tiny model): the "ort"
  # file is the export's, scale for scale, and NNCF's quantises other tensors.
  def scales(path):
    return {i.name: onnx.numpy_helper.to_array(i).tolist()
            for i in onnx.load(str(path)).graph.initializer if i.name.endswith("_scale")}
  assert scales(kept / "ort.onnx") == scales(exported + "_int8.onnx")
  assert scales(kept / "nncf.onnx") != scales(exported + "_int8.onnx")
  out = capsys.readouterr().out
  assert "32 images of synthetic/test" in out and "| NNCF, its defaults |" in out


@pytest.mark.heavy  # LiteRT conversions and ai-edge-quantizer
def test_litert_trials_score_each_recipe_and_the_first_is_the_export_s(float32_file,
                                                                        tmp_path, capsys):
  source, prefix = float32_file
  count, float32_top1, rows = int8_trials.measure_litert(
      prefix, ("litert", "litert_dynamic"), calibration_count=8, limit=48,
      log=lambda _: None)
  assert count == 48 and [row["variant"] for row in rows] == ["litert", "litert_dynamic"]
  exported = str(tmp_path / "e")
  export.export(source, exported, ("litert",), int8=True, calibration_count=8,
                log=lambda _: None)
  (reference,) = runtimes.int8_accuracy(exported, limit=48)[1]
  assert reference["runtime"] == "litert"
  assert rows[0]["litert"]["top1"] == pytest.approx(reference["int8_top1"])
  assert rows[0]["litert"]["agreement"] == pytest.approx(reference["agreement"])
  assert float32_top1 == pytest.approx(reference["float32_top1"])
  int8_trials.main(["--artifacts", prefix, "--litert", "litert_fc2",
                    "--calibration_images", "8", "--limit", "16"])
  out = capsys.readouterr().out
  assert "16 images of synthetic/test" in out and "LiteRT agreement" in out
  assert "| LiteRT, static, fc2 only |" in out


def test_trial_errors_name_the_problem(float32_file, tmp_path):
  _, prefix = float32_file
  with pytest.raises(SystemExit) as failure:
    int8_trials.main(["--artifacts", prefix, "--variants", "ort,gptq"])
  assert "unknown variant(s) ['gptq']" in str(failure.value)
  with pytest.raises(SystemExit) as failure:
    int8_trials.main(["--artifacts", prefix, "--litert", "litert,tanh"])
  assert "unknown LiteRT variant(s) ['tanh']" in str(failure.value)
  with pytest.raises(SystemExit) as failure:
    int8_trials.main(["--artifacts", str(tmp_path / "none")])
  assert "none.onnx: no such file" in str(failure.value)


@pytest.mark.heavy  # a process of its own (the telemetry runs once per process)
def test_nncf_sends_no_telemetry_and_leaves_the_environment_as_it_was(float32_file,
                                                                       tmp_path):
  _, prefix = float32_file
  script = f"""
import os, threading, time
import numpy as np
forks = []
os.register_at_fork(before=lambda: forks.append(1))
from riformer_jax.deploy import quantize
images = np.zeros((2, 32, 32, 3), np.float32)
quantize.quantize_nncf({prefix + ".onnx"!r}, {str(tmp_path / "q.onnx")!r}, images)
time.sleep(1)  # openvino_telemetry sends from a thread
print(len(forks), "CI" in os.environ)
"""
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
  assert result.stdout.split()[-2:] == ["0", "False"]
