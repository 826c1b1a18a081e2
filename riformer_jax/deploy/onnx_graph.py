"""An ONNX graph of a MetaFormer (RIFormer, IdentityFormer, PoolFormer; and the
MetaFormer-baselines RIFormer student and PoolFormerV2) from its params.

Why this is written here rather than traced by a converter (measured 2026-12-02,
issue 17): `jax2onnx` 0.17 pins orbax-checkpoint < 0.11.37 (we pin 0.12.8) and cannot
express PoolFormer's pooling (padding excluded from the count); it also traces the NHWC
program, putting transposes around every convolution, which ran 20% slower in OpenVINO
than an NCHW graph of the same model. The PyTorch route (`torch.onnx` on MMPreTrain's
modules) needs torch at export time and has no fused deploy block or IdentityFormer.
A MetaFormer is a dozen kinds of op, each a native ONNX operator, so the graph is
built directly: NCHW inside (what ONNX's Conv and both runtimes' kernels expect), one
transpose at the input when the caller feeds NHWC, and every block exactly as
`riformer_jax.models.metaformer` computes it (the parity tests compare the two).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization; ReduceMean still takes axes as an attribute
IR_VERSION = 8  # what opset 17 needs; onnx 1.23 would write 14, which runtimes refuse

_DTYPES = {"float32": (np.float32, TensorProto.FLOAT),
           "float16": (np.float16, TensorProto.FLOAT16)}


class _Graph:
  """Nodes and initialisers with generated names."""

  def __init__(self, dtype):
    self.np_dtype, self.onnx_dtype = _DTYPES[dtype]
    self.nodes, self.initializers, self._count = [], [], 0

  def name(self, hint):
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value, hint, dtype=None):
    name = self.name(hint)
    array = np.asarray(value, dtype or self.np_dtype)
    self.initializers.append(numpy_helper.from_array(array, name))
    return name

  def op(self, op_type, inputs, hint=None, **attributes):
    output = self.name(hint or op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [output],
                                       name=output, **attributes))
    return output


def _channel(vector):
  """(C,) -> (C, 1, 1), broadcasting over an NCHW activation."""
  return np.asarray(vector)[:, None, None]


def _conv(g, x, params, stride, pad, hint):
  kernel = np.transpose(np.asarray(params["kernel"]), (3, 2, 0, 1))  # HWIO -> OIHW
  return g.op("Conv", [x, g.const(kernel, hint + ".weight"),
                       g.const(params["bias"], hint + ".bias")], hint,
              strides=[stride, stride], pads=[pad] * 4,
              kernel_shape=list(kernel.shape[2:]))


def _group_norm(g, x, params, hint, epsilon=1e-5):
  """GroupNorm(1): statistics over (C, H, W) per sample, then a per-channel affine map.

  InstanceNormalization over x viewed as (N, 1, C*H*W) is that normalisation in one
  op with a two-pass variance; both runtimes have fast kernels for it.
  """
  flat = g.op("Reshape", [x, g.const([0, 1, -1], hint + ".flat", np.int64)])
  normed = g.op("InstanceNormalization",
                [flat, g.const([1.0], hint + ".one"), g.const([0.0], hint + ".zero")],
                hint, epsilon=epsilon)
  normed = g.op("Reshape", [normed, g.op("Shape", [x])])
  scaled = g.op("Mul", [normed, g.const(_channel(params["scale"]), hint + ".scale")])
  if "bias" not in params:  # the MetaFormer baselines' norms have none
    return scaled
  return g.op("Add", [scaled, g.const(_channel(params["bias"]), hint + ".bias")])


def _gelu(g, x):
  """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2 (opset 17 has no Gelu op; ONNX Runtime
  and OpenVINO fuse this pattern into theirs)."""
  erf = g.op("Erf", [g.op("Div", [x, g.const(np.sqrt(2.0), "sqrt2")])])
  return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, g.const(1.0, "one")])]),
                      g.const(0.5, "half")])


def _mlp(g, x, params, hint):
  def pointwise(y, dense, name):  # a Dense on NHWC is a 1x1 conv on NCHW
    kernel = np.asarray(dense["kernel"]).T[:, :, None, None]
    return g.op("Conv", [y, g.const(kernel, f"{hint}.{name}.weight"),
                         g.const(dense["bias"], f"{hint}.{name}.bias")], f"{hint}.{name}")
  return pointwise(_gelu(g, pointwise(x, params["fc1"], "fc1")), params["fc2"], "fc2")


def _scaled(g, x, vector, hint):
  return g.op("Mul", [x, g.const(_channel(vector), hint)])


def _block(g, x, params, token_mixer, hint):
  """`x + ls1 * mixer(norm1(x))`, then `x + ls2 * mlp(norm2(x))` (deploy: norm_reparam)."""
  if "norm_reparam" in params:
    mixed = _group_norm(g, x, params["norm_reparam"], hint + ".norm_reparam")
  else:
    normed = _group_norm(g, x, params["norm1"], hint + ".norm1")
    mixed = _mixer(g, normed, params.get("token_mixer"), token_mixer, hint)
  x = g.op("Add", [x, _scaled(g, mixed, params["layer_scale1"], hint + ".ls1")])
  hidden = _mlp(g, _group_norm(g, x, params["norm2"], hint + ".norm2"), params["mlp"],
                hint + ".mlp")
  return g.op("Add", [x, _scaled(g, hidden, params["layer_scale2"], hint + ".ls2")])


def _fused_block(g, x, params, hint, epsilon=1e-5):
  """`metaformer.FusedDeployBlock`: both norms as per-sample affine maps of x."""
  def mean(y, axes):
    return g.op("ReduceMean", [y], axes=axes, keepdims=1)

  def square(y):
    return g.op("Mul", [y, y])

  def group_stats(m, v):  # GroupNorm(1) statistics from per-channel ones
    mu = mean(m, [1])
    var = mean(g.op("Add", [v, square(g.op("Sub", [m, mu]))]), [1])
    eps = g.const(epsilon, "eps")
    return mu, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, eps])])])

  def const(vector, name):
    return g.const(_channel(vector), f"{hint}.{name}")

  gamma1, beta1 = (const(params["norm_reparam"][k], "norm_reparam." + k)
                   for k in ("scale", "bias"))
  gamma2, beta2 = (const(params["norm2"][k], "norm2." + k) for k in ("scale", "bias"))
  ls1, ls2 = const(params["layer_scale1"], "ls1"), const(params["layer_scale2"], "ls2")

  means = mean(x, [2, 3])  # (N, C, 1, 1)
  variances = mean(square(g.op("Sub", [x, means])), [2, 3])
  mu1, inv1 = group_stats(means, variances)
  ls1_gamma1 = g.op("Mul", [ls1, gamma1])
  a = g.op("Add", [g.const(1.0, "one"), g.op("Mul", [ls1_gamma1, inv1])])
  b = g.op("Mul", [ls1, g.op("Sub", [beta1, g.op("Mul", [g.op("Mul", [gamma1, mu1]),
                                                         inv1])])])
  mu2, inv2 = group_stats(g.op("Add", [g.op("Mul", [a, means]), b]),
                          g.op("Mul", [square(a), variances]))
  big_a = g.op("Mul", [g.op("Mul", [gamma2, a]), inv2])
  big_b = g.op("Add", [g.op("Mul", [g.op("Mul", [gamma2, g.op("Sub", [b, mu2])]), inv2]),
                       beta2])
  residual = g.op("Add", [g.op("Mul", [a, x]), b])
  normed2 = g.op("Add", [g.op("Mul", [big_a, x]), big_b])
  hidden = _mlp(g, normed2, params["mlp"], hint + ".mlp")
  return g.op("Add", [residual, g.op("Mul", [ls2, hidden])])


def _head(g, x, params, variant):
  if variant == "original":
    x = g.op("ReduceMean", [_group_norm(g, x, params["norm"], "head.norm")],
             axes=[2, 3], keepdims=0)
  else:  # timm: pool, then LayerNorm over C (eps 1e-6)
    x = _pool_and_layer_norm(g, x, params["norm"])
  if "fc" not in params:
    return x
  return _linear(g, x, params["fc"], "head.fc")


def _pool_and_layer_norm(g, x, params):
  """Global average pool, then LayerNorm over C (eps 1e-6): timm's head and the
  baselines'."""
  return g.op("LayerNormalization",
              [g.op("ReduceMean", [x], axes=[2, 3], keepdims=0),
               g.const(params["scale"], "head.norm.scale"),
               g.const(params["bias"], "head.norm.bias")],
              "head.norm", axis=-1, epsilon=1e-6)


def _linear(g, x, dense, hint):
  return g.op("Gemm", [x, g.const(dense["kernel"], hint + ".weight"),
                       g.const(dense["bias"], hint + ".bias")], hint)


def metaformer_model(params, *, token_mixer, head, resolution, batch=None,
                     layout="NHWC", dtype="float32", preprocess=None, fused=False):
  """An `onnx.ModelProto` computing `MetaFormer.apply({"params": params}, images)`.

  Args:
    params: the Flax params of a `metaformer.MetaFormer` (deploy form or not).
    token_mixer, head: the module's fields.
    resolution: input height and width.
    batch: a fixed batch size, or None for a symbolic one ("batch").
    layout: "NHWC" (as the Flax model) or "NCHW" (as PyTorch).
    dtype: "float32" or "float16" (weights and arithmetic; inputs and logits stay
      float32, or uint8 inputs with `preprocess`).
    preprocess: None, or `(mean, std)`: the input is then uint8 RGB and the graph
      computes `(x / 255 - mean) / std` first, as the evaluation pipeline does.
    fused: deploy blocks as `metaformer.FusedDeployBlock`.
  """
  def body(g, x):
    x = _conv(g, x, params["stem"], 4, 2, "stem")
    for i, stage in _numbered(params, "stages_"):
      if "downsample" in stage:
        x = _conv(g, x, stage["downsample"], 2, 1, f"stages_{i}.downsample")
      for j, block in _numbered(stage, "blocks_"):
        hint = f"stages_{i}.blocks_{j}"
        x = (_fused_block(g, x, block, hint) if fused
             else _block(g, x, block, token_mixer, hint))
    return _head(g, x, params["head"], head)
  return _model(body, params["head"], resolution=resolution, batch=batch, layout=layout,
                dtype=dtype, preprocess=preprocess)


# The MetaFormer-baselines models (`baselines.MetaFormerBaseline`) whose mixers are a
# few native ops: the riformerv2 student (training and deploy form), PoolFormerV2 and
# IdentityFormer-like stages. The other mixers (separable convolution, attention,
# random mixing) run in the litert, jax and savedmodel routes.
BASELINE_MIXERS = ("affine", "pooling", "identity")


def baseline_model(params, *, token_mixers, norm, resolution, batch=None,
                   layout="NHWC", dtype="float32", preprocess=None):
  """An `onnx.ModelProto` computing `MetaFormerBaseline.apply({"params": params}, ...)`
  for `token_mixers` among `BASELINE_MIXERS`; the other arguments as `metaformer_model`'s.
  """
  unsupported = sorted(set(token_mixers) - set(BASELINE_MIXERS))
  if unsupported:
    raise ValueError(f"the ONNX graph covers the token mixers {BASELINE_MIXERS}, not "
                     f"{unsupported}")
  block_norm = _group_norm if norm == "groupnorm" else _channel_norm

  def body(g, x):
    x = _conv(g, x, params["stem"]["conv"], 4, 2, "stem.conv")
    x = _channel_norm(g, x, params["stem"]["norm"], "stem.norm")
    for i, stage in _numbered(params, "stages_"):
      if "downsample" in stage:
        hint = f"stages_{i}.downsample"
        x = _channel_norm(g, x, stage["downsample"]["norm"], hint + ".norm")
        x = _conv(g, x, stage["downsample"]["conv"], 2, 1, hint + ".conv")
      for j, block in _numbered(stage, "blocks_"):
        x = _baseline_block(g, x, block, token_mixers[i], block_norm,
                            f"stages_{i}.blocks_{j}")
    return _baseline_head(g, x, params["head"])
  return _model(body, params["head"], resolution=resolution, batch=batch, layout=layout,
                dtype=dtype, preprocess=preprocess)


def _numbered(tree, prefix):
  """`(i, tree[prefix + str(i)])` for i = 0, 1, ... while present."""
  count = len([k for k in tree if k.startswith(prefix)])
  return [(i, tree[f"{prefix}{i}"]) for i in range(count)]


def _channel_norm(g, x, params, hint, epsilon=1e-6):
  """LayerNorm over C of an NCHW activation, two-pass (LayerNormalization would
  normalise over C, H and W together)."""
  centred = g.op("Sub", [x, g.op("ReduceMean", [x], axes=[1], keepdims=1)])
  variance = g.op("ReduceMean", [g.op("Mul", [centred, centred])], axes=[1], keepdims=1)
  inverse = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [variance,
                                                           g.const(epsilon, "eps")])])])
  normed = _scaled(g, g.op("Mul", [centred, inverse]), params["scale"], hint + ".scale")
  if "bias" in params:
    normed = g.op("Add", [normed, g.const(_channel(params["bias"]), hint + ".bias")])
  return normed


def _star_relu(g, x, params, hint):
  """`scale * relu(x)**2 + bias` with scalar scale and bias."""
  relu = g.op("Relu", [x])
  squared = g.op("Mul", [relu, relu])
  return g.op("Add", [g.op("Mul", [squared, g.const(np.reshape(params["scale"], ()),
                                                    hint + ".scale")]),
                      g.const(np.reshape(params["bias"], ()), hint + ".bias")])


def _baseline_block(g, x, params, token_mixer, norm, hint):
  """`rs1 * x + mixer(norm1(x))`, then `rs2 * x + mlp(norm2(x))`; the deploy form's
  mixer branch is `norm_reparam(x)`."""
  def pointwise(y, kernel, name):  # a bias-free Dense on NHWC: a 1x1 conv on NCHW
    return g.op("Conv", [y, g.const(np.asarray(kernel).T[:, :, None, None],
                                    f"{hint}.{name}.weight")], f"{hint}.{name}")

  def skip(name):
    return _scaled(g, x, params[name], f"{hint}.{name}") if name in params else x

  if "norm_reparam" in params:
    mixed = norm(g, x, params["norm_reparam"], hint + ".norm_reparam", epsilon=1e-6)
  else:
    normed = norm(g, x, params["norm1"], hint + ".norm1", epsilon=1e-6)
    mixed = _mixer(g, normed, params.get("token_mixer"), token_mixer, hint)
  x = g.op("Add", [skip("res_scale1"), mixed])
  mlp = params["mlp"]
  hidden = pointwise(norm(g, x, params["norm2"], hint + ".norm2", epsilon=1e-6),
                     mlp["fc1"]["kernel"], "mlp.fc1")
  hidden = pointwise(_star_relu(g, hidden, mlp["act"], hint + ".mlp.act"),
                     mlp["fc2"]["kernel"], "mlp.fc2")
  return g.op("Add", [skip("res_scale2"), hidden])


def _mixer(g, normed, params, token_mixer, hint):
  """PoolFormer's pooling, RIFormer's affine, or the identity, on norm1's output."""
  if token_mixer == "pooling":
    pooled = g.op("AveragePool", [normed], hint + ".pool", kernel_shape=[3, 3],
                  strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)
    return g.op("Sub", [pooled, normed])
  if token_mixer == "affine":
    affine = g.op("Add", [_scaled(g, normed, params["scale"], hint + ".affine.scale"),
                          g.const(_channel(params["bias"]), hint + ".affine.bias")])
    return g.op("Sub", [affine, normed])
  return normed


def _baseline_head(g, x, params):
  """Pool, LayerNorm over C, then a linear classifier or the MLP head."""
  x = _pool_and_layer_norm(g, x, params["norm"])
  if "fc" not in params:
    return x
  fc = params["fc"]
  if "kernel" in fc:
    return _linear(g, x, fc, "head.fc")
  hidden = g.op("Relu", [_linear(g, x, fc["fc1"], "head.fc.fc1")])
  hidden = g.op("LayerNormalization",
                [g.op("Mul", [hidden, hidden]),
                 g.const(fc["norm"]["scale"], "head.fc.norm.scale"),
                 g.const(fc["norm"]["bias"], "head.fc.norm.bias")],
                "head.fc.norm", axis=-1, epsilon=1e-6)
  return _linear(g, hidden, fc["fc2"], "head.fc.fc2")


def _model(body, head_params, *, resolution, batch, layout, dtype, preprocess):
  """The graph around `body(g, nchw_input) -> output`: the input's preprocessing,
  layout and dtype, the output's name and shape, and the checks."""
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout={layout!r}: expected 'NHWC' or 'NCHW'")
  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
  g = _Graph(dtype)
  dims = [batch or "batch"] + ([resolution, resolution, 3] if layout == "NHWC"
                               else [3, resolution, resolution])
  input_type = TensorProto.UINT8 if preprocess else TensorProto.FLOAT
  inputs = [helper.make_tensor_value_info("images", input_type, dims)]

  x = "images"
  if preprocess:
    mean, std = preprocess
    shape = (1, 1, 1, 3) if layout == "NHWC" else (1, 3, 1, 1)
    x = g.op("Div", [g.op("Cast", [x], to=TensorProto.FLOAT),
                     g.const(255.0, "255", np.float32)])
    x = g.op("Sub", [x, g.const(np.reshape(mean, shape), "mean", np.float32)])
    x = g.op("Div", [x, g.const(np.reshape(std, shape), "std", np.float32)], "normalized")
  if layout == "NHWC":
    x = g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
  if dtype != "float32":
    x = g.op("Cast", [x], to=g.onnx_dtype)

  x = body(g, x)

  output_name = "logits" if "fc" in head_params else "features"
  if dtype != "float32":
    x = g.op("Cast", [x], to=TensorProto.FLOAT)
  g.nodes.append(helper.make_node("Identity", [x], [output_name]))
  fc = head_params.get("fc", {})
  width = np.shape((fc.get("fc2", fc).get("bias")) if fc else
                   head_params["norm"]["scale"])[0]
  outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                           [batch or "batch", width])]
  graph = helper.make_graph(g.nodes, "metaformer", inputs, outputs, g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            ir_version=IR_VERSION, producer_name="riformer_jax")
  onnx.checker.check_model(model, full_check=True)
  return model
