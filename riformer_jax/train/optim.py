"""The paper's optimiser (Table 10): AdamW, linear warm-up then cosine, lr scaled with
the global batch, weight decay on kernels only; optional clipping and EMA."""

import jax
import optax


def decay_mask(params):
  """Weight decay on conv/dense kernels only (rank >= 2 here). Norms, biases, layer and
  residual scales and RIFormer's affine mixer are vectors in our layout, so none of
  them decays (in PyTorch the affine weight is a (C,1,1,1) conv kernel; the paper's
  intent, and timm's "no decay for 1-D params" rule applied to our layout, agree).
  RandFormer's random matrix is frozen (PyTorch's requires_grad=False): no decay."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", None) != "random_matrix",
      params)


def peak_learning_rate(base_lr, global_batch_size, reference_batch_size=1024):
  """`lr = base_lr * batch / 1024` (Table 10: 1e-3 at 1024)."""
  return base_lr * global_batch_size / reference_batch_size


def learning_rate_schedule(peak_lr, total_steps, warmup_steps, min_lr=0.0):
  """Linear warm-up from 0 to `peak_lr`, then cosine down to `min_lr`, per step."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warm-up steps ({warmup_steps}) must lie in [0, total steps "
                     f"{total_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def make_optimizer(schedule, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                   clip_grad_norm=None):
  """AdamW with `decay_mask`, after optional global-norm clipping."""
  chain = []
  if clip_grad_norm:
    chain.append(optax.clip_by_global_norm(clip_grad_norm))
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)


def ema_update(ema_params, params, decay):
  """`ema = decay * ema + (1 - decay) * params`. optax's `ema` transforms updates, not
  parameters, so the parameter average is this one line."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
