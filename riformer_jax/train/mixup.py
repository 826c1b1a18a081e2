"""Mixup, CutMix and label smoothing as pure JAX functions (timm's batch mode).

The recipe (docs/reference.md section 3) mixes each batch with mixup (alpha 0.8) or CutMix
(alpha 1.0), switching between them with probability 0.5, and smooths the labels
by 0.1. Mixing runs inside the jitted train step, after the batch reaches the
devices: the step calls `mix_batch` once and feeds the returned array to both the
teacher and the student, so the two cannot see different images. The draw is a
function of the JAX key only, so a step replays exactly on resume.

Semantics follow timm's `Mixup` with `mode="batch"`: one lambda per batch, the
partner of sample i is sample B-1-i (the batch reversed), the CutMix box is a square
of side `sqrt(1 - lambda)` times the image sides centred at a uniform pixel and
clipped to the image, and lambda is then corrected to the area actually kept.
Targets are `lambda * smooth(y) + (1 - lambda) * smooth(y reversed)` with
`smooth(y) = one_hot(y) * (1 - s) + s / num_classes`.

`num_groups` splits the batch into equal groups that mix independently (own lambda,
own box, partners within the group). timm draws one lambda per process, so
`num_groups` = number of timm processes reproduces a multi-GPU run; groups aligned
with the device shards also keep the partner exchange inside each device.

`finish_batch` is the end of the per-image recipe for uint8 batches
(`pipeline.train_batches(uint8=True)`): normalisation and random erasing, the
two steps timm runs after ToTensor, moved next to the mixing so that the hosts ship
a quarter of the bytes and skip their costliest float work.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixParams(NamedTuple):
  """One group's draw: lambda (after CutMix's correction), and the box if CutMix."""

  lam: jax.Array  # float32 scalar; 1.0 means unmixed
  use_cutmix: jax.Array  # bool scalar
  box: jax.Array  # int32 [4]: top, bottom, left, right (rows/cols [top, bottom))


def smooth_one_hot(labels, num_classes, smoothing=0.0):
  """timm's label smoothing: `1 - s + s/K` on the label, `s/K` elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(lam, center_y, center_x, height, width):
  """timm's `rand_bbox`: box of `int(side * sqrt(1 - lam))` per side around a centre.

  As in timm 1.0 (the pinned version), the box spans `cut // 2` before the centre
  and `(cut + 1) // 2` after it, so an unclipped box has exactly `cut` rows. Returns int32 [top, bottom, left, right], each clipped to the image; the box can
  therefore be smaller than asked near the borders (hence the lambda correction).
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  top = jnp.clip(center_y - cut_h // 2, 0, height)
  bottom = jnp.clip(center_y + (cut_h + 1) // 2, 0, height)
  left = jnp.clip(center_x - cut_w // 2, 0, width)
  right = jnp.clip(center_x + (cut_w + 1) // 2, 0, width)
  return jnp.stack([top, bottom, left, right]).astype(jnp.int32)


def sample_mix_params(rng, height, width, mixup_alpha=0.8, cutmix_alpha=1.0,
                      switch_prob=0.5, prob=1.0, correct_lam=True) -> MixParams:
  """timm's `_params_per_batch` plus the CutMix box, from a JAX key."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError("mixup_alpha or cutmix_alpha must be positive to mix")
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 6)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup).astype(jnp.float32)
  applied = jax.random.uniform(k_apply) < prob
  lam = jnp.where(applied, lam, 1.0)
  use_cutmix = use_cutmix & applied
  box = cutmix_box(lam, jax.random.randint(k_y, (), 0, height),
                   jax.random.randint(k_x, (), 0, width), height, width)
  if correct_lam:
    area = (box[1] - box[0]) * (box[3] - box[2])
    lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam).astype(jnp.float32)
  # timm skips mixing altogether when lambda is exactly 1 (an empty box, say).
  use_cutmix = use_cutmix & (lam < 1.0)
  return MixParams(lam, use_cutmix, box)


def apply_mix(params: MixParams, images, labels, num_classes, label_smoothing=0.1):
  """Mixes one group (NHWC images, int labels) with given parameters."""
  partner = images[::-1]
  height, width = images.shape[1], images.shape[2]
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  top, bottom, left, right = params.box
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cut = jnp.where(in_box[None, :, :, None], partner, images)
  lam = params.lam
  blended = (images.astype(jnp.float32) * lam
             + partner.astype(jnp.float32) * (1.0 - lam)).astype(images.dtype)
  mixed = jnp.where(params.use_cutmix, cut, jnp.where(lam < 1.0, blended, images))
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  targets = targets * lam + targets[::-1] * (1.0 - lam)
  return mixed, targets


def mix_batch(rng, images, labels, num_classes, *, mixup_alpha=0.8, cutmix_alpha=1.0,
              switch_prob=0.5, prob=1.0, label_smoothing=0.1, correct_lam=True,
              num_groups=1):
  """Mixed images and soft targets for one batch; jit-, vmap- and shard-friendly.

  Args:
    rng: JAX key; the draw (mixup or CutMix, lambda, box) is a function of it.
    images: [B, H, W, C] (any float dtype; returned in the same dtype).
    labels: [B] int class indices.
    num_classes: width of the targets.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind.
    switch_prob: probability of CutMix when both are enabled.
    prob: probability of mixing a batch at all (unmixed batches keep smoothing).
    label_smoothing: folded into the targets.
    correct_lam: CutMix lambda = kept area fraction after clipping the box.
    num_groups: independent groups (module docstring); B/num_groups must be even.

  Returns:
    (mixed images [B, H, W, C], targets [B, num_classes] float32 summing to 1).
  """
  batch, height, width = images.shape[:3]
  if batch % num_groups or (batch // num_groups) % 2:
    raise ValueError(f"mix_batch: batch {batch} must split into {num_groups} groups of "
                     "even size (timm pairs sample i with sample B-1-i)")
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing)
  keys = jax.random.split(rng, num_groups)
  params = jax.vmap(lambda k: sample_mix_params(
      k, height, width, mixup_alpha, cutmix_alpha, switch_prob, prob, correct_lam))(keys)
  grouped = images.reshape((num_groups, batch // num_groups) + images.shape[1:])
  grouped_labels = labels.reshape(num_groups, batch // num_groups)
  mixed, targets = jax.vmap(
      lambda p, x, y: apply_mix(p, x, y, num_classes, label_smoothing))(
          params, grouped, grouped_labels)
  return mixed.reshape(images.shape), targets.reshape(batch, num_classes)


def finish_batch(rng, images, erase_boxes, mean, std, mode="pixel"):
  """uint8 [B, H, W, C] -> float32 `(x / 255 - mean) / std`, boxes erased.

  `erase_boxes` is int32 [B, 4] (top, left, height, width), height 0 for none, as
  `augment.random_erasing_box` draws them on the host; the boxes are filled as
  timm's RandomErasing fills them, in normalised units: N(0, 1) per pixel and
  channel (`"pixel"`), one normal colour per image (`"rand"`) or zeros (`"const"`).
  `mode=None`: no erasing (the recipe's probability is 0), normalisation only.
  """
  batch, height, width, channels = images.shape
  x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / \
      jnp.asarray(std, jnp.float32)
  if mode is None:
    return x
  top, left, box_h, box_w = (erase_boxes[:, i, None, None, None] for i in range(4))
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  if mode == "pixel":
    values = jax.random.normal(rng, x.shape, jnp.float32)
  elif mode == "rand":
    values = jax.random.normal(rng, (batch, 1, 1, channels), jnp.float32)
  elif mode == "const":
    values = jnp.zeros((), jnp.float32)
  else:
    raise ValueError(f"random erasing mode={mode!r}: expected pixel, rand or const")
  return jnp.where(inside, values, x)
