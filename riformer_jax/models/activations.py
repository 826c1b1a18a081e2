"""The exact GELU, and the spelling of it that LiteRT's converter turns into its builtin.

TensorFlow's StableHLO-to-LiteRT legalisation fuses `(x * 0.5) * (erf(x * 1/sqrt 2) + 1)`
into one `GELU(approximate=false)` op (which XNNPACK runs natively) only when erf
reaches it as the `mhlo.erf` custom call and each constant is a dense tensor of x's
shape, as second operand. `jax.nn.gelu` lowers through erfc, and `lax.erf` is
serialised as a composite that TensorFlow 2.21's StableHLO cannot read back, or
decomposed into a polynomial of about 30 elementwise ops. So the LiteRT export traces
the model inside `builtin_gelu_for_litert()`, which makes `gelu` emit that spelling;
everywhere else `gelu` is `jax.nn.gelu(approximate=False)`.
"""

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import ad, mlir

# The custom call's name in StableHLO; an export must allow it
# (jax.export.DisabledSafetyCheck.custom_call(ERF_CUSTOM_CALL)).
ERF_CUSTOM_CALL = "mhlo.erf"

_builtin_gelu = contextvars.ContextVar("builtin_gelu_for_litert", default=False)

# erf as `mhlo.erf`: a primitive of its own because JAX has no way to emit an
# arbitrary custom call with the attributes TensorFlow's importer expects.
_mhlo_erf_p = jax_core.Primitive("mhlo_erf")
_mhlo_erf_p.def_impl(jax.lax.erf)
_mhlo_erf_p.def_abstract_eval(lambda x: x.update(weak_type=False))
ad.defjvp(_mhlo_erf_p, lambda g, x: g * (2 / math.sqrt(math.pi)) * jnp.exp(-x * x))


def _lower_mhlo_erf(ctx, x):
  result_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
  op = stablehlo.CustomCallOp([result_type], [x],
                              call_target_name=ir.StringAttr.get(ERF_CUSTOM_CALL))
  # The form TensorFlow's StableHLO importer reads as mhlo.erf (version 1).
  op.attributes["mhlo.attributes"] = ir.DictAttr.get({})
  op.attributes["mhlo.version"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), 1)
  return op.results


mlir.register_lowering(_mhlo_erf_p, _lower_mhlo_erf)


def gelu(x):
  """The exact GELU, `x * Phi(x)`."""
  if _builtin_gelu.get() and all(isinstance(d, int) for d in x.shape):
    return _gelu_for_litert(x)
  return jax.nn.gelu(x, approximate=False)


# A function of its own in the lowered module: inlined, every GELU of one shape would
# share its three constants, and the converter fuses only single-use ones.
@jax.jit
def _gelu_for_litert(x):
  def full(value):
    return np.full(x.shape, value, dtype=x.dtype)
  return (x * full(0.5)) * (_mhlo_erf_p.bind(x * full(1 / math.sqrt(2))) + full(1.0))


@contextlib.contextmanager
def builtin_gelu_for_litert():
  """Within this block, tracing `gelu` at a fixed shape gives the graph that LiteRT's
  converter fuses into its builtin GELU; meant for that converter only."""
  token = _builtin_gelu.set(True)
  try:
    yield
  finally:
    _builtin_gelu.reset(token)
