"""An ONNX graph of a MetaFormer (RIFormer, IdentityFormer, PoolFormer) from its params.

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
    if token_mixer == "pooling":
      pooled = g.op("AveragePool", [normed], hint + ".pool", kernel_shape=[3, 3],
                    strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)
      mixed = g.op("Sub", [pooled, normed])
    elif token_mixer == "affine":
      mixer = params["token_mixer"]
      affine = g.op("Add", [_scaled(g, normed, mixer["scale"], hint + ".affine.scale"),
                            g.const(_channel(mixer["bias"]), hint + ".affine.bias")])
      mixed = g.op("Sub", [affine, normed])
    else:  # identity
      mixed = normed
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
    x = g.op("LayerNormalization",
             [g.op("ReduceMean", [x], axes=[2, 3], keepdims=0),
              g.const(params["norm"]["scale"], "head.norm.scale"),
              g.const(params["norm"]["bias"], "head.norm.bias")],
             "head.norm", axis=-1, epsilon=1e-6)
  if "fc" not in params:
    return x
  return g.op("Gemm", [x, g.const(params["fc"]["kernel"], "head.fc.weight"),
                       g.const(params["fc"]["bias"], "head.fc.bias")], "head.fc")


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

  x = _conv(g, x, params["stem"], 4, 2, "stem")
  for i in range(len([k for k in params if k.startswith("stages_")])):
    stage = params[f"stages_{i}"]
    if "downsample" in stage:
      x = _conv(g, x, stage["downsample"], 2, 1, f"stages_{i}.downsample")
    for j in range(len([k for k in stage if k.startswith("blocks_")])):
      block, hint = stage[f"blocks_{j}"], f"stages_{i}.blocks_{j}"
      x = (_fused_block(g, x, block, hint) if fused
           else _block(g, x, block, token_mixer, hint))
  x = _head(g, x, params["head"], head)

  output_name = "logits" if "fc" in params["head"] else "features"
  if dtype != "float32":
    x = g.op("Cast", [x], to=TensorProto.FLOAT)
  g.nodes.append(helper.make_node("Identity", [x], [output_name]))
  width = (np.shape(params["head"]["fc"]["bias"])[0] if "fc" in params["head"]
           else np.shape(params["head"]["norm"]["scale"])[0])
  outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                           [batch or "batch", width])]
  graph = helper.make_graph(g.nodes, "metaformer", inputs, outputs, g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            ir_version=IR_VERSION, producer_name="riformer_jax")
  onnx.checker.check_model(model, full_check=True)
  return model
