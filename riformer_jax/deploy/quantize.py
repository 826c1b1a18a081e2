"""Post-training int8 of exported files: ONNX Runtime's and NNCF's for the ONNX graph
(ONNX Runtime and OpenVINO run the same QDQ file), ai-edge-quantizer's for LiteRT.

`riformer_jax.deploy.export --int8` calls `quantize_onnx` and `quantize_litert` with
their defaults; `riformer_jax.deploy.sensitivity` and `riformer_jax.deploy.int8_trials`
measure the choices behind them.
"""

import os
import sys

import numpy as np


def float_convs(onnx_path):
  """The Conv nodes `quantize_onnx` keeps float by default: the stem (raw pixels in)
  and the downsampling convolutions."""
  import onnx  # noqa: PLC0415
  return [node.name for node in onnx.load(onnx_path).graph.node if node.op_type == "Conv"
          and (node.name.startswith("stem") or ".downsample" in node.name)]


def quantize_onnx(source_path, destination_path, calibration, batch=None, only=None,
                  float_layers=None, ranges="Percentile", percentile=None):
  """ONNX Runtime's post-training static quantisation: int8 weights (per output
  channel) and uint8 activations of the Convs, as QuantizeLinear / DequantizeLinear
  pairs (QDQ: ONNX Runtime and OpenVINO both run it in int8). By default
  (`float_layers=None`) those of the MLPs only: the stem, the downsampling convolutions
  (`float_convs`) and the classifier stay float, as do the norms and the residual
  stream. The downsampling convolutions were the layers that cost most when quantised
  alone (riformer_jax.deploy.sensitivity); keeping them float took the demo's
  distilled student from -2.2 to +0.0 points and its teacher from -1.7 to -0.1
  (BENCHMARKS.md). Activation ranges are ONNX Runtime's percentile calibration (the
  0.001st to the 99.999th percentile, `percentile` to change it) over the calibration
  images, fed `batch` at a time (the graph's fixed batch, or one by one): against
  min/max ranges it took agreement with float32 from 97.8 to 98.7% (student) and 99.2
  to 99.6% (teacher) in ONNX Runtime (riformer_jax.deploy.int8_trials; BENCHMARKS.md).
  `ranges`: another of its CalibrationMethod (MinMax, Entropy). `only`: these Conv
  nodes alone; `float_layers`: the Conv nodes to keep float instead of the default
  ones."""
  from onnxruntime import quantization  # noqa: PLC0415

  class Reader(quantization.CalibrationDataReader):
    def __init__(self):
      rows = batch or 1
      self.rows = iter(calibration[i:i + rows]
                       for i in range(0, len(calibration) - rows + 1, rows))

    def get_next(self):
      row = next(self.rows, None)
      return None if row is None else {"images": row}

  prepared = destination_path + ".prepared.onnx"
  quantization.quant_pre_process(source_path, prepared, skip_symbolic_shape=True)
  try:
    quantization.quantize_static(
        prepared, destination_path, Reader(), quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=["Conv"], per_channel=True,
        nodes_to_quantize=list(only) if only else None,
        nodes_to_exclude=(float_convs(prepared) if float_layers is None
                          else list(float_layers)),
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod[ranges],
        extra_options={"CalibPercentile": percentile} if percentile else None)
  finally:
    os.remove(prepared)


def quantize_nncf(source_path, destination_path, calibration, batch=None, *, ignored=(),
                  fast_bias_correction=True, transformer=False, validation=None,
                  max_drop=0.01):
  """NNCF's post-training quantisation of the ONNX file (QDQ, as `quantize_onnx`: ONNX
  Runtime and OpenVINO run the same file). NNCF picks what to quantise from its CPU
  hardware config (the Convs, and the Adds and Muls of the residual stream), with
  ranges over the calibration images and its bias correction (`fast_bias_correction`
  False: the full one, block by block). `ignored`: node names kept float;
  `transformer`: NNCF's transformer patterns (mixed preset, residual stream float;
  SmoothQuant left off the convolutions). With `validation=(images, float32
  predictions)`: `nncf.quantize_with_accuracy_control`, its metric the agreement
  of top-1 with those predictions, putting layers back in float32 (those whose
  quantisation costs most first) until agreement is at most `max_drop` below 1."""
  nncf = _import_nncf()
  import onnx  # noqa: PLC0415
  from nncf.quantization import advanced_parameters  # noqa: PLC0415

  rows = batch or 1
  items = [calibration[i:i + rows] for i in range(0, len(calibration) - rows + 1, rows)]
  calibration_set = nncf.Dataset(items, lambda item: {"images": item})
  options = dict(subset_size=len(items), fast_bias_correction=fast_bias_correction,
                 ignored_scope=nncf.IgnoredScope(names=list(ignored)) if ignored else None)
  if transformer:
    options.update(model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=(
        advanced_parameters.AdvancedQuantizationParameters(
            smooth_quant_alphas=advanced_parameters.AdvancedSmoothQuantParameters(
                convolution=-1))))
  model = onnx.load(source_path)
  if validation is None:
    quantised = nncf.quantize(model, calibration_set, **options)
  else:
    images, reference = validation
    if "advanced_parameters" in options:  # the same thing, named otherwise here
      options["advanced_quantization_parameters"] = options.pop("advanced_parameters")
    quantised = nncf.quantize_with_accuracy_control(
        model, calibration_set,
        nncf.Dataset([(images[i:i + rows], reference[i:i + rows])
                      for i in range(0, len(images) - rows + 1, rows)]),
        _agreement_metric(), max_drop=max_drop, **options)
  onnx.save(quantised, destination_path)


def _import_nncf():
  """nncf, its telemetry off. Importing it starts openvino_telemetry, which is on unless
  a consent file says no, and forks a process (under JAX's threads) to send events;
  with CI=true it declines. The variable is set only while nncf is first imported."""
  if "nncf" in sys.modules:
    return sys.modules["nncf"]
  before = os.environ.get("CI")
  os.environ["CI"] = "true"
  try:
    import nncf  # noqa: PLC0415 (the edge extra)
  finally:
    if before is None:
      del os.environ["CI"]
    else:
      os.environ["CI"] = before
  return nncf


def _agreement_metric():
  """`validation_fn` for nncf.quantize_with_accuracy_control: `(model, items) ->
  (agreement of top-1 with the items' predictions, one value per image)`. NNCF calls
  it once per item while ranking layers: one ONNX Runtime session per model."""
  import onnxruntime as ort  # noqa: PLC0415
  last = {"model": None, "session": None}  # holds the model, so `is` stays sound

  def agreement(model, items):
    if last["model"] is not model:
      last.update(model=model, session=ort.InferenceSession(
          model.SerializeToString(), providers=["CPUExecutionProvider"]))
    session = last["session"]
    same = np.concatenate([np.argmax(session.run(None, {"images": images})[0], -1)
                           == reference for images, reference in items])
    return float(same.mean()), same.astype(np.float32).tolist()
  return agreement


# The layers LiteRT's int8 quantises, by tensor name (jax2tf names them by module
# path): the MLPs' first matmuls.
LITERT_INT8_LAYERS = r".*/fc1/.*"


def quantize_litert(float_model, calibration, batch=None, layers=LITERT_INT8_LAYERS,
                    dynamic=False):
  """ai-edge-quantizer's static int8 of a LiteRT float32 file: int8 weights (per output
  channel) and int8 activations (asymmetric) of the MLPs' first matmuls
  (FULLY_CONNECTED `fc1`), half of the MLPs' multiply-adds. The second matmuls stay
  float: their input is the GELU's output, skewed (nothing below -0.17, a long
  positive tail), likely why one int8 range per tensor serves it badly; with them the demo's student lost 2.4 points (agreement 92.4%),
  without them 0.5 (96.6%), and the teacher 0.7 (97.5%) against 0.4 (99.0%; 1000
  test images, BENCHMARKS.md). The convolutions stay float too: quantising LiteRT's
  CONV_2D cost the teacher 9 points. The norms, the GELU and the residual stream stay
  float (the file takes and returns float32). Ranges are the min/max over the
  calibration images, `batch` at a time (the file's fixed batch, or one by one).
  `layers`: a regex of the FULLY_CONNECTED ops to quantise instead; `dynamic`: int8
  weights with activations quantised at run time, each call its own range (no
  calibration)."""
  from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
  from ai_edge_quantizer import quantizer  # noqa: PLC0415

  ((signature, names),) = Interpreter(model_content=float_model).get_signature_list(
      ).items()
  (input_name,) = names["inputs"]
  rows = batch or 1
  samples = [{input_name: calibration[i:i + rows]}
             for i in range(0, len(calibration) - rows + 1, rows)]
  quantise = quantizer.Quantizer(float_model)
  if dynamic:
    quantise.add_dynamic_config(layers, "FULLY_CONNECTED", num_bits=8)
    ranges = None
  else:
    quantise.add_static_config(layers, "FULLY_CONNECTED", activation_num_bits=8,
                               weight_num_bits=8)
    ranges = quantise.calibrate({signature: samples}, num_threads=os.cpu_count() or 1)
  result = quantise.quantize(ranges, enable_progress_bar=False,
                             enable_progress_report=False)
  return bytes(result.quantized_model)
