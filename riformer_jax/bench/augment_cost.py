"""What RandAugment/AutoAugment in the jitted train step costs the accelerator.

    python -m riformer_jax.bench.augment_cost                  # S12, batch 64, 224
    python -m riformer_jax.bench.augment_cost --size s36 --batch 32 --json cost.json

XLA's cost analysis (FLOPs and bytes accessed) of the paper's distillation step for
RIFormer-`size` (GFNet-H-B logit teacher, PoolFormer feature teacher, module
imitation, mixing, erasing) on a uint8 batch, with the augmentation in the step
(`device_augment`, the default recipe) and without it (the host path), and of the
augmentation alone; the difference is the share of the step it adds. Analysed from the
compiled programs of this machine's backend, on abstract params (nothing is run for
these rows). Then the wall time of the augmentation alone per image, jitted on this
machine: on a CPU it runs on the cores that also feed the pipeline, so that row says
what a CPU-only run pays, not what an accelerator pays.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from riformer_jax.data import device_augment
from riformer_jax.models import registry
from riformer_jax.train import distill, optim

SPECS = ("rand-m9-mstd0.5-inc1", "original")
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
               dtype="bfloat16", overrides=None):
  """[{spec, step_flops, step_bytes, augment_flops, augment_bytes, ...}] per spec, with
  the plain step (no augmentation in it) as spec None. `overrides`: model fields for
  the student and both teachers (tests: tiny models)."""
  dtype, overrides = jnp.dtype(dtype), overrides or {}
  student = registry.create_model(f"riformer_{size}", dtype=dtype, drop_path_rate=0.1,
                                  **overrides)
  teachers = [registry.create_model(name, dtype=dtype, **overrides)
              for name in (logit_teacher, f"poolformer_{size}")]
  teachers = [distill.Teacher(t, _abstract(t, resolution)) for t in teachers]
  mi_blocks = tuple(f"stages_{i}/blocks_{d - 1}" for i, d in enumerate(student.depths))
  params = _abstract(student, resolution)["params"]
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  boxes = jax.ShapeDtypeStruct((batch, 4), jnp.int32)
  weights = {t: jnp.float32(_MI_WEIGHTS.get(t, 0.0)) for t in distill.TERMS}
  rows = []
  for spec in (None,) + SPECS:
    plan = spec and device_augment.plan(spec)
    distiller = distill.Distiller(
        student=student, optimizer=optim.make_optimizer(1e-3),
        num_classes=student.num_classes, mi_blocks=mi_blocks,
        finish=distill.FinishConfig(auto_augment=plan))
    state = jax.eval_shape(distiller.init_state, params)
    flops, bytes_ = _cost(jax.jit(distiller.train_step), state, images, labels, weights,
                          jax.random.key(0), *teachers, boxes)
    row = dict(spec=spec, size=size, batch=batch, resolution=resolution,
               step_flops=flops, step_bytes=bytes_)
    if plan:
      row["augment_flops"], row["augment_bytes"] = _cost(
          jax.jit(device_augment.auto_augment, static_argnums=2), jax.random.key(0),
          images, plan)
    rows.append(row)
  plain = rows[0]
  for row in rows[1:]:
    row["added_flops_fraction"] = row["step_flops"] / plain["step_flops"] - 1
    row["added_bytes_fraction"] = row["step_bytes"] / plain["step_bytes"] - 1
    row["augment_flops_fraction"] = row["augment_flops"] / plain["step_flops"]
    row["augment_bytes_fraction"] = row["augment_bytes"] / plain["step_bytes"]
  return rows


def wall_times(batch=32, resolution=224, repeats=5):
  """{spec: ms per image} of the augmentation alone, jitted, on this machine."""
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, resolution, resolution, 3),
                                       dtype=np.uint8))
  out = {}
  for spec in SPECS:
    run = jax.jit(device_augment.auto_augment, static_argnums=2)
    plan = device_augment.plan(spec)
    jax.block_until_ready(run(jax.random.key(0), images, plan))
    times = []
    for i in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(run(jax.random.key(i + 1), images, plan))
      times.append(time.perf_counter() - start)
    out[spec] = float(np.median(times)) / batch * 1e3
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
  print("| augmentation in the step | step GFLOPs | step GB accessed | added FLOPs | "
        "added bytes | augmentation alone: FLOPs, bytes (share of the plain step) |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    if row["spec"] is None:
      print(f"| none (host path) | {row['step_flops'] / 1e9:.1f} | "
            f"{row['step_bytes'] / 1e9:.2f} | - | - | - |")
      continue
    print(f"| {row['spec']} | {row['step_flops'] / 1e9:.1f} | {row['step_bytes'] / 1e9:.2f}"
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
