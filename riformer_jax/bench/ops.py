"""Where the deploy form's time goes: its layers one by one, JAX against PyTorch.

    python -m riformer_jax.bench.ops                    # S12, batch 16, 224, float32
    python -m riformer_jax.bench.ops --size m36 --batch 8 --json ops.json

`riformer_jax.bench.throughput` times whole models; this times the parts of RIFormer's deploy form
alone, each in JAX (our Flax modules, jitted) and in PyTorch (the same layers taken
from MMPreTrain's deploy RIFormer, eager and `torch.compile`d), with the same weights
and inputs: the stem and downsampling convolutions and, per stage, one deploy block
and its parts (GroupNorm, the 1x1 expansion, GELU, the 1x1 projection, the whole
MLP). A sum over the model follows: the convolutions once, each block its depth
times. It also counts the minor page faults of each call: on a CPU, buffers the
kernel maps and zeroes page by page (BENCHMARKS.md).

Timing as in `riformer_jax.bench.throughput` (warm-up, median of repeats, the three rows of a
layer taking turns). A layer timed alone is not the layer inside the compiled model
(no fusion with its neighbours, buffers of its own): compare the sum with the whole
model's time from `riformer_jax.bench.throughput` before reading much into single rows.
"""

import argparse
import functools
import json
import resource

import flax.linen as nn
import jax
import numpy as np
import torch

import riformer_jax
from riformer_jax.bench import throughput
from riformer_jax.bench import torch_models as bench_torch
from riformer_jax.models import metaformer, registry


def _conv(features, kernel, stride, padding):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)))


def deploy_parts(size, batch, resolution):
  """`[(name, times per image, NHWC input shape, jax (module, variables, kwargs),
  torch module)]` for RIFormer-`size` in deploy form, with one set of random weights."""
  full = registry.create_model(f"riformer_{size}", deploy=True)
  one_block = dict(depths=(1,) * len(full.depths))
  params = throughput.param_source(one_block, resolution)(f"riformer_{size}")
  params = riformer_jax.reparameterize(params)
  theirs = bench_torch.load_params(bench_torch.riformer_deploy(
      one_block["depths"], full.dims, full.num_classes), params).backbone
  inference = {"train": False}

  parts = []
  side = resolution // 4
  for i, dim in enumerate(full.dims):
    stage, depth = params[f"stages_{i}"], full.depths[i]
    if i == 0:
      parts.append(("stem conv 7x7/4", 1, (batch, resolution, resolution, 3),
                    (_conv(dim, 7, 4, 2), params["stem"], {}), theirs.patch_embed))
    else:
      parts.append((f"stage {i}: downsample conv 3x3/2", 1,
                    (batch, 2 * side, 2 * side, full.dims[i - 1]),
                    (_conv(dim, 3, 2, 1), stage["downsample"], {}),
                    theirs.network[2 * i - 1]))
    block_params, block = stage["blocks_0"], theirs.network[2 * i][0]
    shape, hidden = (batch, side, side, dim), (batch, side, side, 4 * dim)
    parts += [
        (f"stage {i}: deploy block", depth, shape,
         (metaformer.MetaFormerBlock("affine", deploy=True), block_params, inference),
         block),
        (f"stage {i}: groupnorm", 2 * depth, shape,
         (metaformer.GroupNorm1(), block_params["norm2"], {}), block.norm2),
        (f"stage {i}: mlp", depth, shape,
         (metaformer.Mlp(4 * dim), block_params["mlp"], inference), block.mlp),
        (f"stage {i}: fc1 1x1", depth, shape,
         (nn.Dense(4 * dim), block_params["mlp"]["fc1"], {}), block.mlp.fc1),
        (f"stage {i}: gelu", depth, hidden, (_Gelu(), {}, {}), block.mlp.act),
        (f"stage {i}: fc2 1x1", depth, hidden,
         (nn.Dense(dim), block_params["mlp"]["fc2"], {}), block.mlp.fc2),
    ]
    side //= 2
  return parts


class _Gelu(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.gelu(x, approximate=False)  # as in metaformer.Mlp


def _page_faults(fn, sync, calls=3):
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    sync(fn())
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / calls


def run(args):
  bench_torch.configure(args.torch_threads)
  rng = np.random.default_rng(0)
  rows = []
  for name, count, shape, (module, params, kwargs), theirs in deploy_parts(
      args.size, args.batch, args.resolution):
    x = rng.standard_normal(shape, np.float32)
    forward = jax.jit(functools.partial(module.apply, **kwargs))
    # On the device once, as the PyTorch side below: timed calls move no data.
    variables, x_jax = jax.device_put(({"params": params} if params else {}, x))
    ours = functools.partial(forward.lower(variables, x_jax).compile(), variables, x_jax)
    thunks = {"jax": (ours, jax.block_until_ready)}
    device = bench_torch.device()  # JAX's default device is the accelerator too
    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(
        device, memory_format=torch.channels_last)
    theirs = theirs.to(device, memory_format=torch.channels_last).eval()
    for mode, module_torch in (("eager", theirs), ("compile", torch.compile(theirs))):
      thunks[f"torch {mode}"] = (functools.partial(_torch_call, module_torch, x_torch),
                                 bench_torch.synchronize)
    times = throughput.measure(thunks, args.warmup, args.iters, args.repeats)
    row = dict(layer=name, count=count, shape=list(shape),
               **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in times.items()},
               **{f"{k}_page_faults": _page_faults(*thunk) for k, thunk in thunks.items()})
    rows.append(row)
    print(f"{name}: " + ", ".join(f"{k} {row[f'{k}_ms']:.2f} ms" for k in times),
          flush=True)
  return dict(settings=vars(args), torch_cpu_threads=bench_torch.cpu_threads(),
              device=jax.devices()[0].device_kind, rows=rows)


def _torch_call(module, x):
  with torch.inference_mode():
    return module(x)


_COLUMNS = ("jax", "torch eager", "torch compile")


def table(results):
  lines = ["| layer | input (NHWC) | per image | JAX ms | torch eager ms | "
           "torch compile ms | JAX / compile | page faults per call: JAX, eager, compile |",
           "|---|---|---|---|---|---|---|---|"]
  for row in results["rows"]:
    lines.append(
        f"| {row['layer']} | {'x'.join(map(str, row['shape']))} | {row['count']}x | "
        + " | ".join(f"{row[f'{k}_ms']:.2f}" for k in _COLUMNS)
        + f" | {row['jax_ms'] / row['torch compile_ms']:.2f} | "
        + ", ".join(f"{row[f'{k}_page_faults']:.0f}" for k in _COLUMNS) + " |")
  # The model: convolutions once, blocks depth times (their parts are inside them).
  groups = {"convolutions": lambda r: "conv" in r["layer"],
            "blocks": lambda r: r["layer"].endswith("deploy block")}
  lines += ["", "| sum over the model | JAX ms | torch eager ms | torch compile ms |",
            "|---|---|---|---|"]
  totals = np.zeros(3)
  for group, member in groups.items():
    sums = np.array([sum(r["count"] * r[f"{k}_ms"] for r in results["rows"] if member(r))
                     for k in _COLUMNS])
    totals += sums
    lines.append(f"| {group} | " + " | ".join(f"{s:.1f}" for s in sums) + " |")
  lines.append("| together | " + " | ".join(f"{s:.1f}" for s in totals) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m riformer_jax.bench.ops",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=throughput.SIZES, default="s12")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5, help="calls per timing (5)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch-threads", type=int,
                      help="PyTorch's CPU threads (its default: one per core)")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  results = run(args)
  print(f"\n{results['device']}, PyTorch on {results['torch_cpu_threads']} thread(s), "
        f"batch {args.batch}, {args.resolution} px, float32\n")
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
