"""Pure functions on parameter pytrees: re-parameterisation and teacher initialisation.

Both take and return nested dicts of arrays (`variables["params"]`, or the whole
`variables`), hold no state, can run under `jax.jit`, and work on sharded arrays.
"""

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
from flax import traverse_util


def _is_affine_block(node):
  mixer = node.get("token_mixer")
  return ("norm1" in node and isinstance(mixer, Mapping)
          and set(mixer) == {"scale", "bias"})


def _fuse_affine(block):
  """Paper Eq. 4: `gamma' = gamma * (s - 1)`, `beta' = beta * (s - 1) + t`. The
  MetaFormer-baselines norm has no bias (beta = 0): its fused norm gains one, t."""
  norm, mixer = block["norm1"], block["token_mixer"]
  s, t = mixer["scale"], mixer["bias"]
  bias = norm["bias"] * (s - 1) + t if "bias" in norm else t
  fused = {k: v for k, v in block.items() if k not in ("norm1", "token_mixer")}
  fused["norm_reparam"] = {"scale": norm["scale"] * (s - 1), "bias": bias}
  return fused


def reparameterize(params):
  """Training-time RIFormer params -> deploy params (norm1 and the affine mixer fused).

  Both designs: RIFormer (`riformer_*`, GroupNorm with bias, layer scales) and the
  MetaFormer-baselines student (`riformerv2_*`, norms without bias, residual scales).

  Every block holding `norm1` and an affine `token_mixer` becomes a block holding
  `norm_reparam` (paper Eq. 4); every other entry is returned as the same object.
  The deploy model computes the same function up to float rounding::

    train_model = riformer_jax.create_model("riformer_s12")
    deploy_model = riformer_jax.create_model("riformer_s12", deploy=True)
    variables = train_model.init(jax.random.key(0), images)
    deploy_vars = {"params": riformer_jax.reparameterize(variables["params"])}
    deploy_model.apply(deploy_vars, images)   # == train_model.apply(variables, images)

  `jax.jit(riformer_jax.reparameterize)(params)` works too, also on sharded params.

  Raises:
    ValueError: if the tree holds no affine block (e.g. PoolFormer or deploy params).
  """
  found = 0

  def walk(node):
    nonlocal found
    if not isinstance(node, Mapping):
      return node
    if _is_affine_block(node):
      found += 1
      return _fuse_affine(node)
    return {k: walk(v) for k, v in node.items()}

  fused = walk(params)
  if not found:
    raise ValueError(
        "reparameterize: no block with `norm1` and an affine `token_mixer` "
        "({scale, bias}) found; expected training-time RIFormer params "
        f"(top-level keys: {sorted(params) if isinstance(params, Mapping) else type(params)})")
  return fused


@dataclasses.dataclass(frozen=True)
class TransferReport:
  """What `init_student_from_teacher` did, as "/"-joined parameter paths.

  copied: student entries overwritten by the teacher's tensor of the same path.
  left: student entries kept at their initialisation (skipped, or absent in the teacher).
  unused: teacher entries with no counterpart in the student.
  """

  copied: tuple
  left: tuple
  unused: tuple


def init_student_from_teacher(student_params, teacher_params, skip=("token_mixer",)):
  """Copies every teacher tensor into the student except the token mixer (Guideline 5).

  Tensors are matched by path (PoolFormer and RIFormer of the same size share all
  paths but the mixer's); any path with a component in `skip` is left alone. Copied
  tensors take the student's dtype. For a new label set, add `"head"` to `skip`::

    student = riformer_jax.create_model("riformer_s12").init(key, images)["params"]
    teacher = pretrained_poolformer_s12_variables["params"]
    student, report = riformer_jax.init_student_from_teacher(student, teacher)
    print(len(report.copied), report.left)   # the affine mixers are left

  Returns:
    `(new_student_params, TransferReport)`.

  Raises:
    ValueError: naming every path whose student and teacher shapes differ.
  """
  student = traverse_util.flatten_dict(student_params, sep="/")
  teacher = traverse_util.flatten_dict(teacher_params, sep="/")
  skipped = lambda path: any(part in skip for part in path.split("/"))

  copied = [p for p in student if p in teacher and not skipped(p)]
  mismatched = [
      f"{p}: student {tuple(jnp.shape(student[p]))}, teacher {tuple(jnp.shape(teacher[p]))}"
      for p in copied if jnp.shape(student[p]) != jnp.shape(teacher[p])]
  if mismatched:
    raise ValueError("init_student_from_teacher: shape mismatch at "
                     + "; ".join(mismatched))

  merged = dict(student)
  for path in copied:
    merged[path] = jnp.asarray(teacher[path], dtype=jnp.result_type(student[path]))
  copied_set = set(copied)
  report = TransferReport(
      copied=tuple(copied),
      left=tuple(p for p in student if p not in copied_set),
      unused=tuple(p for p in teacher if p not in student or skipped(p)))
  return traverse_util.unflatten_dict(merged, sep="/"), report
