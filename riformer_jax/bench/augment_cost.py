"""What RandAugment/AutoAugment in the jitted train step costs the accelerator.

    python -m riformer_jax.bench.augment_cost                  # S12, batch 64, 224
    python -m riformer_jax.bench.augment_cost --size s36 --batch 32 --json cost.json

XLA's cost analysis (FLOPs and bytes accessed) of the paper's distillation step for
RIFormer-`size` (GFNet-H-B logit teacher, PoolFormer feature teacher, module
imitation, mixing, erasing) on a uint8 batch: without augmentation in the step (the
host path), with RandAugment or AutoAugment in it, and with the crop's resize from a
512 canvas and RandAugment in it (the default recipe); and of that added work alone.
The differences are the share of the step it adds. Analysed from the
compiled programs of this machine's backend, on abstract params (nothing is run for
these rows). Then the wall time of the augmentation alone per image, jitted on this
machine: on a CPU it runs on the cores that also feed the pipeline, so that row says
what a CPU-only run pays, not what an accelerator pays.
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from riformer_jax.data import device_augment
from riformer_jax.models import registry
from riformer_jax.train import distill, optim

SPECS = ("rand-m9-mstd0.5-inc1", "original")
CANVAS = 512  # configs/common.py's config.aug.canvas
_MI_WEIGHTS = dict(soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0)


def _abstract(module, resolution):
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), images)


def _cost(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis() or {}
  if isinstance(cost, list):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def step_costs(size="s12", batch=64, resolution=224, logit_teacher="gfnet_h_b",
               dtype="bfloat16", overrides=None, canvas=CANVAS, specs=SPECS):
  """[{spec, step_flops, step_bytes, augment_flops, augment_bytes, ...}] per spec, with
  the plain step (no augmentation in it) as spec None, and the first of `specs` once
  more after the resize from `canvas`. `overrides`: model fields for the student and
  both teachers (tests: tiny models)."""
  dtype, overrides = jnp.dtype(dtype), overrides or {}
  student = registry.create_model(f"riformer_{size}", dtype=dtype, drop_path_rate=0.1,
                                  **overrides)
  teachers = [registry.create_model(name, dtype=dtype, **overrides)
              for name in (logit_teacher, f"poolformer_{size}")]
  teachers = [distill.Teacher(t, _abstract(t, resolution)) for t in teachers]
  mi_blocks = tuple(f"stages_{i}/blocks_{d - 1}" for i, d in enumerate(student.depths))
  params = _abstract(student, resolution)["params"]
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8)
  canvases = jax.ShapeDtypeStruct((batch, canvas, canvas, 3), jnp.uint8)
  sizes = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  boxes = jax.ShapeDtypeStruct((batch, 4), jnp.int32)
  weights = {t: jnp.float32(_MI_WEIGHTS.get(t, 0.0)) for t in distill.TERMS}

  def device_work(key, x, window_sizes, plan):  # what the step adds, alone
    if window_sizes is not None:
      x = device_augment.resize_windows(x, window_sizes, resolution)
    return device_augment.auto_augment(key, x, plan)

  rows = []
  variants = [(None, False)] + [(spec, False) for spec in specs] + [(specs[0], True)]
  for spec, resize in variants:
    plan = spec and device_augment.plan(spec)
    distiller = distill.Distiller(
        student=student, optimizer=optim.make_optimizer(1e-3),
        num_classes=student.num_classes, mi_blocks=mi_blocks,
        finish=distill.FinishConfig(auto_augment=plan, resize_to=resolution))
    state = jax.eval_shape(distiller.init_state, params)
    inputs, window_sizes = (canvases, sizes) if resize else (images, None)
    flops, bytes_ = _cost(jax.jit(distiller.train_step), state, inputs, labels, weights,
                          jax.random.key(0), *teachers, boxes, window_sizes)
    row = dict(spec=spec, resize=resize, size=size, batch=batch, resolution=resolution,
               canvas=canvas if resize else None, step_flops=flops, step_bytes=bytes_,
               input_bytes_per_image=int(np.prod(inputs.shape[1:])))
    if plan:
      row["augment_flops"], row["augment_bytes"] = _cost(
          jax.jit(device_work, static_argnums=3), jax.random.key(0), inputs,
          window_sizes, plan)
    rows.append(row)
  plain = rows[0]
  for row in rows[1:]:
    row["added_flops_fraction"] = row["step_flops"] / plain["step_flops"] - 1
    row["added_bytes_fraction"] = row["step_bytes"] / plain["step_bytes"] - 1
    row["augment_flops_fraction"] = row["augment_flops"] / plain["step_flops"]
    row["augment_bytes_fraction"] = row["augment_bytes"] / plain["step_bytes"]
  return rows


def wall_times(batch=32, resolution=224, repeats=5, canvas=CANVAS):
  """{work: ms per image} of each piece of the step's added work alone, jitted, on this
  machine (the resize: 300x400 windows, a typical crop of a 500x375 image)."""
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, resolution, resolution, 3),
                                       dtype=np.uint8))
  canvases = jax.device_put(rng.integers(0, 256, (batch, canvas, canvas, 3),
                                         dtype=np.uint8))
  sizes = jax.device_put(np.tile(np.array([[min(300, canvas), min(400, canvas)]],
                                          np.int32), (batch, 1)))
  calls = {spec: functools.partial(
      jax.jit(device_augment.auto_augment, static_argnums=2), images=images,
      spec=device_augment.plan(spec)) for spec in SPECS}
  resize = jax.jit(device_augment.resize_windows, static_argnums=2)
  calls[f"resize a 300x400 window from a {canvas} canvas to {resolution}"] = (
      lambda key: resize(canvases, sizes, resolution))
  out = {}
  for name, call in calls.items():
    jax.block_until_ready(call(key=jax.random.key(0)))
    times = []
    for i in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(call(key=jax.random.key(i + 1)))
      times.append(time.perf_counter() - start)
    out[name] = float(np.median(times)) / batch * 1e3
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="s12")
  parser.add_argument("--batch", type=int, default=64, help="global batch analysed")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the step")
  parser.add_argument("--wall-batch", type=int, default=32,
                      help="batch of the wall-time rows (0: skip them)")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args(argv)
  rows = step_costs(args.size, args.batch, args.resolution, dtype=args.dtype)
  device = jax.devices()[0]
  print(f"RIFormer-{args.size.upper()} distillation step (GFNet-H-B + PoolFormer "
        f"teachers, module imitation), batch {args.batch} at {args.resolution}, "
        f"{args.dtype}; XLA cost analysis on {device.platform} ({device.device_kind})")
  print("| in the step | step GFLOPs | step GB accessed | added FLOPs | "
        "added bytes | that work alone: FLOPs, bytes (share of the plain step) |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    if row["spec"] is None:
      print(f"| none (host path) | {row['step_flops'] / 1e9:.1f} | "
            f"{row['step_bytes'] / 1e9:.2f} | - | - | - |")
      continue
    name = (f"resize from a {row['canvas']} canvas + {row['spec']}" if row["resize"]
            else row["spec"])
    print(f"| {name} | {row['step_flops'] / 1e9:.1f} | {row['step_bytes'] / 1e9:.2f}"
          f" | {100 * row['added_flops_fraction']:+.3f}% | "
          f"{100 * row['added_bytes_fraction']:+.3f}% | "
          f"{100 * row['augment_flops_fraction']:.3f}%, "
          f"{100 * row['augment_bytes_fraction']:.3f}% |")
  times = None
  if args.wall_batch:
    times = wall_times(args.wall_batch, args.resolution)
    print(f"\nthe augmentation alone, jitted, batch {args.wall_batch} at "
          f"{args.resolution} on {device.platform} ({device.device_kind}, "
          f"{jax.local_device_count()} device(s)): ms per image")
    for spec, ms in times.items():
      print(f"| {spec} | {ms:.2f} ms |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "wall_ms_per_image": times}, f, indent=1)


if __name__ == "__main__":
  main()
