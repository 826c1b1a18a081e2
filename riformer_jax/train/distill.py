"""One fused, sharded train step for the paper's paradigm, and the evaluation step.

The step mixes the batch once (mixup/CutMix), runs the frozen logit teacher and the
frozen feature teacher on that same array (one pass where one teacher plays both
roles), runs the student with its taps captured, and combines the loss terms of
`losses` with per-term weights. The weights are traced arguments, so switching a term
on or off between epochs never recompiles; a teacher whose terms all weigh zero is
skipped at run time by `lax.cond`, so the feature teacher costs nothing once module
imitation has ended. Only the student's params are differentiated. Gradient
accumulation scans over micro-batches inside the step (one optimizer update per call,
the same update as one large batch of the same size).

Randomness (mixing, dropout, drop path, erasing noise) is `fold_in(seed_key, step)`:
a resumed run replays exactly the steps an uninterrupted run takes. A uint8 batch
(`pipeline.train_batches(uint8=True)`) is augmented (RandAugment/AutoAugment,
`device_augment`, where the host left it to the step), normalised and erased here
first (`mixup.finish_batch`), before the mixing, where timm does all three per image.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from riformer_jax.data import device_augment, imagenet, policies
from riformer_jax.train import losses, mixup, optim

TERMS = ("ce", "hard_kd", "soft_kd", "mi_in", "mi_out", "mi_rel")


MI_TERMS = {"mi_in": "in", "mi_out": "out", "mi_rel": "rel"}


# fold_in indices, within a step's key, of the erasing noise and of the augmentation's
# draws
_ERASE_STREAM = 0xE5A
_AUGMENT_STREAM = 0xA06


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


@flax.struct.dataclass
class Teacher:
  """A frozen model: its module (with its own compute dtype) and variables."""

  module: Any = flax.struct.field(pytree_node=False)
  variables: Any


@dataclasses.dataclass(frozen=True)
class MixConfig:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  switch_prob: float = 0.5
  prob: float = 1.0
  label_smoothing: float = 0.1


@dataclasses.dataclass(frozen=True)
class FinishConfig:
  """How a uint8 batch becomes the networks' input: RandAugment/AutoAugment
  (`device_augment`, when the host left it to the step), then normalisation and
  erasing (`mixup.finish_batch`)."""
  mean: Sequence[float] = imagenet.MEAN
  std: Sequence[float] = imagenet.STD
  erase_mode: Optional[str] = "pixel"  # None: the recipe erases nothing
  auto_augment: Optional[device_augment.Plan] = None
  fill: Sequence[int] = policies.FILL
  resize_to: int = 0  # the side windows in canvases are resized to (`window_sizes`)


@dataclasses.dataclass(frozen=True)
class Distiller:
  """Everything static about a training run; `train_step`/`eval_step` are pure.

  Attributes:
    student: the Linen module being trained.
    optimizer: an optax transformation (e.g. `optim.make_optimizer`).
    num_classes: label width.
    mix: mixup/CutMix/label smoothing; None trains on plain smoothed labels.
    temperature: soft-KD temperature.
    mi_blocks: "stages_i/blocks_j" paths of module imitation.
    shared_teacher: one teacher plays both roles; `train_step` takes it as the
      logit teacher, ignores `feature_teacher`, and runs it once for its logits and
      its taps (separate teachers take one forward pass each).
    accum_steps: micro-batches per update.
    ema_decay: 0 disables the parameter EMA.
    schedule: the learning-rate schedule, for logging.
    finish: normalisation and erasing of uint8 batches.
  """

  student: Any
  optimizer: optax.GradientTransformation
  num_classes: int
  mix: Optional[MixConfig] = MixConfig()
  temperature: float = 1.0
  mi_blocks: Sequence[str] = ()
  shared_teacher: bool = False
  accum_steps: int = 1
  ema_decay: float = 0.0
  schedule: Optional[Callable[[Any], Any]] = None
  finish: FinishConfig = FinishConfig()

  def init_state(self, params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params),
                      ema_params=params if self.ema_decay else None)

  def _targets(self, rng, images, labels):
    if self.mix is None:
      return images, mixup.smooth_one_hot(labels, self.num_classes, 0.0)
    return mixup.mix_batch(
        rng, images, labels, self.num_classes, mixup_alpha=self.mix.mixup_alpha,
        cutmix_alpha=self.mix.cutmix_alpha, switch_prob=self.mix.switch_prob,
        prob=self.mix.prob, label_smoothing=self.mix.label_smoothing)

  def _micro_loss(self, params, images, targets, weights, rng, logit_teacher,
                  feature_teacher):
    """Weighted loss and its terms on one micro-batch."""
    zero = jnp.zeros((), jnp.float32)
    logits, state = self.student.apply(
        {"params": params}, images, train=True, rngs={"dropout": rng},
        mutable=["intermediates"])
    terms = dict.fromkeys(TERMS, zero)
    terms["ce"] = losses.cross_entropy(logits, targets)

    def run(teacher):  # its logits and taps, constants for the gradient
      teacher_logits, teacher_state = teacher.module.apply(
          teacher.variables, images, train=False, mutable=["intermediates"])
      return jax.lax.stop_gradient((teacher_logits, teacher_state["intermediates"]))

    def kd_terms(teacher_logits):
      return (losses.hard_distillation(logits, teacher_logits),
              losses.soft_distillation(logits, teacher_logits, self.temperature))

    def mi_terms(teacher_taps):
      return losses.module_imitation(state["intermediates"], teacher_taps, self.mi_blocks)

    no_kd = lambda *_: (zero, zero)  # noqa: E731
    no_mi = lambda *_: {"in": zero, "out": zero, "rel": zero}  # noqa: E731
    kd_used = (weights["hard_kd"] != 0) | (weights["soft_kd"] != 0)
    mi_used = jnp.any(jnp.stack([weights[t] != 0 for t in MI_TERMS]))
    kd, mi = no_kd(), no_mi()
    if self.shared_teacher and logit_teacher is not None and self.mi_blocks:
      def both(_):
        teacher_logits, teacher_taps = run(logit_teacher)
        return (jax.lax.cond(kd_used, kd_terms, no_kd, teacher_logits),
                jax.lax.cond(mi_used, mi_terms, no_mi, teacher_taps))
      kd, mi = jax.lax.cond(kd_used | mi_used, both, lambda _: (no_kd(), no_mi()), None)
    else:
      if logit_teacher is not None:
        kd = jax.lax.cond(kd_used, lambda _: kd_terms(run(logit_teacher)[0]), no_kd, None)
      if feature_teacher is not None and self.mi_blocks:
        mi = jax.lax.cond(mi_used, lambda _: mi_terms(run(feature_teacher)[1]), no_mi,
                          None)
    terms["hard_kd"], terms["soft_kd"] = kd
    for term, name in MI_TERMS.items():
      terms[term] = mi[name]

    total = sum(weights[t] * terms[t] for t in TERMS)
    correct = jnp.sum(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    return total, (terms, correct)

  def train_step(self, state, images, labels, weights, rng, logit_teacher=None,
                 feature_teacher=None, erase_boxes=None, window_sizes=None):
    """One optimizer update on a global batch; returns (new state, metrics).

    `weights` maps every name in TERMS to a float32 scalar (traced: changing them
    does not recompile). `rng` is the run's base key; the step folds its count in.
    uint8 `images` are finished first: with `window_sizes` (int32 [B, 2]) they are
    canvases whose windows are resized to `finish.resize_to` first; then augmented
    where `finish.auto_augment` says, normalised and erased with `erase_boxes`, int32
    [B, 4].
    """
    step_rng = jax.random.fold_in(rng, state.step)
    mix_rng, dropout_rng = jax.random.split(step_rng)
    if images.dtype == jnp.uint8:
      if window_sizes is not None:
        images = device_augment.resize_windows(images, window_sizes, self.finish.resize_to)
      if self.finish.auto_augment is not None:
        images = device_augment.auto_augment(
            jax.random.fold_in(step_rng, _AUGMENT_STREAM), images,
            self.finish.auto_augment, self.finish.fill)
      # A key of its own, so that float batches keep their mixing and dropout draws.
      images = mixup.finish_batch(
          jax.random.fold_in(step_rng, _ERASE_STREAM), images,
          jnp.zeros((images.shape[0], 4), jnp.int32) if erase_boxes is None else erase_boxes,
          self.finish.mean, self.finish.std, self.finish.erase_mode)
    images, targets = self._targets(mix_rng, images, labels)

    # Micro-batch k takes rows k, k + A, k + 2A, ...: every device keeps its share of
    # each micro-batch, so the split moves no data between devices.
    accum = self.accum_steps
    def split(x):
      return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
    grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

    def accumulate(carry, micro):
      grads, loss, terms, correct = carry
      index, micro_images, micro_targets = micro
      (micro_loss, (micro_terms, micro_correct)), micro_grads = grad_fn(
          state.params, micro_images, micro_targets, weights,
          jax.random.fold_in(dropout_rng, index), logit_teacher, feature_teacher)
      add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
      return (add(grads, micro_grads), loss + micro_loss, add(terms, micro_terms),
              correct + micro_correct), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), dict.fromkeys(TERMS, jnp.float32(0)),
            jnp.zeros((), jnp.int32))
    if accum == 1:  # XLA's CPU backend runs a one-trip loop body markedly slower
      (grads, loss, terms, correct), _ = accumulate(init, (0, images, targets))
    else:
      (grads, loss, terms, correct), _ = jax.lax.scan(
          accumulate, init, (jnp.arange(accum), split(images), split(targets)))
    grads = jax.tree.map(lambda g: g / accum, grads)

    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if self.ema_decay:
      ema = optim.ema_update(ema, params, self.ema_decay)
    metrics = {f"loss/{t}": v / accum for t, v in terms.items()}
    metrics.update({"loss/total": loss / accum, "grad_norm": optax.tree.norm(grads),
                    "train_accuracy": correct / labels.shape[0]})
    if self.schedule is not None:
      metrics["learning_rate"] = self.schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics


def eval_counts(module, variables, images, labels, mask):
  """(top-1 correct, top-5 correct, count) over the valid (`mask`) examples; with
  fewer than 5 classes top-5 is trivially every example."""
  logits = module.apply(variables, images, train=False)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels) & mask
  hit5 = jnp.any(top5 == labels[:, None], axis=-1) & mask
  return jnp.sum(hit1), jnp.sum(hit5), jnp.sum(mask)
