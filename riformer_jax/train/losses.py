"""The training objectives of the RIFormer paper (Sec. 4), as pure functions.

Every loss is a float32 scalar averaged over the batch, so that the weights in a config
do not depend on the batch size. Table 10's module-imitation weights, printed as
"lambda x batch_size", become weights on these means by one of three readings
(`module_imitation_weight`; docs/roadmap.md measures them).

- `cross_entropy`: against soft targets (label smoothing, mixup/cutmix already folded in).
- `hard_distillation`: cross-entropy against the teacher's argmax (DeiT's hard KD).
- `soft_distillation`: KL(teacher || student) of the temperature-softened
  distributions, times T^2, summed over classes and averaged over the batch. DeiT's
  code divides the summed KL by batch * classes instead; its weights are therefore
  `num_classes` times larger for the same update.
- `module_imitation`: the paper's Eq. 6-8 on the blocks' sown taps: `L_in'` (block
  outputs), `L_out` (token-mixer outputs, each with its own "minus the input") and
  `L_rel` (relation matrices of the block outputs), each the mean over its elements
  (alpha_1 = 1/NCHW, alpha_2 = 1/NH^2W^2) and summed over the chosen blocks.
"""

import jax
import jax.numpy as jnp
import optax

# How Table 10's printed "lambda_i x batch_size" becomes the weight of a mean-reduced
# module-imitation term. The paper does not show its reduction, so each reading is one
# config value away (config.distill.mi_reading, with config.distill.mi_batch):
MI_READINGS = {
    # (a) value x batch: the value taken as a per-example weight of a batch sum.
    "times_batch": lambda value, batch: value * batch,
    # (b) the value itself: the authors' code sums each term over the batch, so
    # lambda x batch_size is the weight the batch mean gets.
    "value": lambda value, batch: value,
    # (c) value / batch: the text literally, lambda = value / batch_size on terms that
    # Eq. 6-8's alpha = 1/NCHW already make means.
    "per_batch": lambda value, batch: value / batch,
}


def module_imitation_weight(value, reading, batch):
  """The weight on a mean-reduced module-imitation term of Table 10's `value`
  ("lambda x batch_size") under `reading` (MI_READINGS) for the table's `batch`."""
  if reading not in MI_READINGS:
    raise ValueError(f"config.distill.mi_reading={reading!r}: expected one of "
                     f"{sorted(MI_READINGS)}")
  if batch <= 0:
    raise ValueError(f"config.distill.mi_batch={batch}: must be > 0")
  return MI_READINGS[reading](value, batch)


def cross_entropy(logits, targets):
  """Mean over the batch of `-sum(targets * log_softmax(logits))`."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def hard_distillation(student_logits, teacher_logits):
  labels = jnp.argmax(teacher_logits, axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      student_logits.astype(jnp.float32), labels))


def soft_distillation(student_logits, teacher_logits, temperature=1.0):
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return jnp.mean(kl) * temperature ** 2


def _mse(a, b):
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def relation_matrix(features):
  """`R(T) = T~ T~^T` with T as (N, HW, C), L2-normalised over C: (N, HW, HW)."""
  tokens = features.reshape(features.shape[0], -1, features.shape[-1]).astype(jnp.float32)
  # The epsilon keeps an all-zero token (zero padding, dead channels) finite.
  tokens = tokens / jnp.sqrt(jnp.sum(jnp.square(tokens), -1, keepdims=True) + 1e-12)
  return jnp.einsum("ntc,nsc->nts", tokens, tokens)


def tap(intermediates, block, name):
  """The tensor block "stages_i/blocks_j" sowed as `name` (sow collects tuples)."""
  node = intermediates
  for part in block.split("/"):
    if part not in node:
      raise KeyError(f"no taps for block {block!r} (missing {part!r}); the model has "
                     f"{sorted(node)}")
    node = node[part]
  return node[name][0]


def module_imitation(student_taps, teacher_taps, blocks):
  """`{"in": L_in', "out": L_out, "rel": L_rel}` summed over `blocks`.

  The taps are the "intermediates" collections of a student and a feature teacher of
  the same block shapes (e.g. RIFormer and PoolFormer of one size); `blocks` are
  paths like "stages_2/blocks_5".
  """
  losses = {"in": 0.0, "out": 0.0, "rel": 0.0}
  for block in blocks:
    student_out = tap(student_taps, block, "block_output")
    teacher_out = tap(teacher_taps, block, "block_output")
    if student_out.shape != teacher_out.shape:
      raise ValueError(f"block {block}: student output {student_out.shape} and teacher "
                       f"output {teacher_out.shape} differ; module imitation needs a "
                       "feature teacher of the student's shape")
    losses["in"] += _mse(student_out, teacher_out)
    losses["out"] += _mse(tap(student_taps, block, "mixer_output"),
                          tap(teacher_taps, block, "mixer_output"))
    losses["rel"] += _mse(relation_matrix(student_out), relation_matrix(teacher_out))
  return {name: jnp.asarray(value, jnp.float32) for name, value in losses.items()}
