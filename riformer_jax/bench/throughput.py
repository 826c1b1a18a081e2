"""Inference and training throughput of RIFormer and its relatives, against the roofline.

    python -m riformer_jax.bench.throughput                    # 2-core CPU: S12, batch 16, minutes
    python -m riformer_jax.bench.throughput --sizes s12,s24,s36,m36,m48 --batch 2048 \\
        --dtype bfloat16 --warmup 5 --iters 30 --repeats 3 --train-batch 256 \\
        --max-batch 65536 --json bench.json         # the paper's setting, on one GPU

One run measures, side by side on one machine:

- inference images/s of PoolFormer, IdentityFormer, RIFormer at training time, RIFormer
  in deploy form (`reparameterize`) and with the fused deploy block, for each size, and
  the ratios deploy/PoolFormer and fused/deploy; at S12 also Table 8's slimmed
  PoolFormers (S9: depth 9; XS12: 5/6 of the width), the paper's other ways to a
  faster S12, against the deploy form;
- the same architectures in PyTorch where torch is importable (`torch_models`): timm's
  PoolFormer v1 and MMPreTrain's deploy RIFormer on our deploy weights, eager and
  `torch.compile`d, in float32 and the accelerator's half precision;
- training images/s of `distill.Distiller.train_step` with CE only, with soft KD from
  a logit teacher, and with soft KD plus module imitation against a PoolFormer of the
  student's size (the paper's full step), with compile time and memory;
- FLOPs from XLA's cost analysis against the analytic count, and the fractions of the
  device's peak FLOP/s (MFU) and memory bandwidth that each row reaches.

Method (the paper's, docs/reference.md section 3): warm-up calls, then `--repeats`
timings of `--iters` calls each, synchronised (`jax.block_until_ready`,
`torch.cuda.synchronize`); images/s is the batch over the median seconds per call. The
rows of a phase take turns repeat by repeat, so a change of load on a shared machine
hits them all alike and the ratios within one run stay comparable even where absolute
numbers drift.
"""

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import time
import timeit

import jax
import jax.numpy as jnp
import numpy as np

import riformer_jax
from riformer_jax.models import counting, registry
from riformer_jax.train import distill, losses, optim

SIZES = ("s12", "s24", "s36", "m36", "m48")
FORMS = ("poolformer", "identityformer", "riformer", "deploy", "fused", "poolformer_s9",
         "poolformer_xs12")
# Table 8's slimmed PoolFormers: registry names of their own, rows at size s12 only.
SLIMMED = ("poolformer_s9", "poolformer_xs12")
TRAIN_STEPS = ("ce", "soft_kd", "mi")
# Any non-zero weight runs its term (a zero one is skipped by `lax.cond`); the values
# do not change the work.
STEP_WEIGHTS = {
    "ce": {"ce": 1.0},
    "soft_kd": {"soft_kd": 1.0},
    "mi": {"soft_kd": 1.0, "mi_in": 1.0, "mi_out": 1.0, "mi_rel": 1.0},
}

# Dense peak TFLOP/s (bfloat16 and TF32 tensor cores, float32 without them) and memory
# GB/s, by `device_kind`. Sources: NVIDIA's H100 Tensor Core GPU datasheet (SXM5), H200
# datasheet (SXM) and A100 datasheet (SXM4 and PCIe, 40 and 80 GB); the datasheets give
# tensor-core figures with 2:4 sparsity, halved here.
PEAKS = {
    "NVIDIA H100 80GB HBM3": dict(bfloat16=989.5, tf32=494.5, float32=67.0, gbps=3350),
    "NVIDIA H200": dict(bfloat16=989.5, tf32=494.5, float32=67.0, gbps=4800),
    "NVIDIA A100-SXM4-80GB": dict(bfloat16=312.0, tf32=156.0, float32=19.5, gbps=2039),
    "NVIDIA A100-SXM4-40GB": dict(bfloat16=312.0, tf32=156.0, float32=19.5, gbps=1555),
    "NVIDIA A100 80GB PCIe": dict(bfloat16=312.0, tf32=156.0, float32=19.5, gbps=1935),
    "NVIDIA A100-PCIE-40GB": dict(bfloat16=312.0, tf32=156.0, float32=19.5, gbps=1555),
}


def peaks(device_kind, dtype, peak_tflops=None, peak_gbps=None):
  """(FLOP/s, bytes/s) the device peaks at for `dtype`; None where not known.

  float32 reads the TF32 peak: at JAX's default precision on these GPUs (and with
  `bench_torch.configure`) float32 convolutions and matmuls run on TF32 tensor cores.
  """
  known = PEAKS.get(device_kind, {})
  tflops = peak_tflops or known.get({"float32": "tf32", "float16": "bfloat16"}.get(
      dtype, dtype))
  gbps = peak_gbps or known.get("gbps")
  return tflops and tflops * 1e12, gbps and gbps * 1e9


def _calls(fn, sync, iters):
  sync([fn() for _ in range(iters)])


def measure(thunks, warmup, iters, repeats):
  """Seconds per call of each `name: (fn, sync)`: `repeats` timings of `iters` calls.

  A timing makes `iters` calls and then passes all their results to `sync`, so that
  work still queued (JAX and CUDA dispatch asynchronously) is inside the timing. Rows
  take turns repeat by repeat (module docstring). `timeit` supplies the clock and
  keeps the garbage collector out of the timings.
  """
  for fn, sync in thunks.values():
    for _ in range(warmup):
      sync([fn()])
  timers = {name: timeit.Timer(functools.partial(_calls, fn, sync, iters))
            for name, (fn, sync) in thunks.items()}
  times = {name: [] for name in thunks}
  for _ in range(repeats):
    for name, timer in timers.items():
      times[name].append(timer.timeit(number=1) / iters)
  return times


def compile_and_analyse(jitted, *args):
  """(executable, row fields): lower+compile seconds, XLA's FLOPs and bytes accessed,
  and its memory estimate (arguments + outputs + temporaries - donated aliases)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  fields = {"compile_s": time.perf_counter() - start}
  cost = compiled.cost_analysis() or {}
  fields.update(xla_flops=cost.get("flops"), xla_bytes=cost.get("bytes accessed"))
  memory = compiled.memory_analysis()
  if memory is not None:
    fields["xla_memory_bytes"] = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return compiled, fields


def relation_macs(model, resolution, blocks):
  """MACs of the relation matrices `T T^T` of `blocks`' outputs, one image."""
  variables = counting.abstract_variables(model, resolution)
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, images)
  total = 0
  for block in blocks:
    _, height, width, channels = losses.tap(state["intermediates"], block,
                                            "block_output").shape
    total += (height * width) ** 2 * channels
  return total


def _overrides_for(name, overrides, resolution):
  """`overrides`, plus `img_size` for the GFNets (their filters fit one resolution);
  for a slimmed PoolFormer under a shape override, the override slimmed as S9 and
  XS12 slim S12 (half the third stage; 5/6 of each width)."""
  if hasattr(registry.registry_class(name), "img_size"):
    return dict(overrides, img_size=resolution)
  if name == "poolformer_s9" and "depths" in overrides:
    depths = list(overrides["depths"])
    depths[2] = max(1, depths[2] // 2)
    return dict(overrides, depths=depths)
  if name == "poolformer_xs12" and "dims" in overrides:
    return dict(overrides, dims=[max(1, round(d * 5 / 6)) for d in overrides["dims"]])
  return overrides


def param_source(overrides, resolution):
  """`name -> params` of registry models, each initialised once: params are float32
  whatever the compute dtype, so our forms, the PyTorch rows, the students and the
  teachers share them. The models' own initialisers draw from the RBG generator:
  XLA compiles it in a third of threefry's time on a CPU, the values do not matter."""
  @functools.cache
  def params(name):
    model = registry.create_model(name, **_overrides_for(name, overrides, resolution))
    images = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.key(0, impl="rbg"), images)["params"]
  return params


def _forward(model, params, images):
  return model.apply({"params": params}, images, train=False)


def _form_name(form, size):
  if form in SLIMMED:
    return form
  return f"{'riformer' if form in ('deploy', 'fused') else form}_{size}"


def _form_model(form, size, overrides, dtype, resolution=224):
  extra = {"deploy": dict(deploy=True), "fused": dict(deploy=True, fused=True)}
  name = _form_name(form, size)
  return registry.create_model(name, dtype=dtype,
                               **_overrides_for(name, overrides, resolution),
                               **extra.get(form, {}))


@functools.cache
def _form_params(form, size, params):
  """The deploy forms run RIFormer's params, re-parameterised (paper Eq. 4)."""
  if form in ("deploy", "fused"):
    return riformer_jax.reparameterize(params(f"riformer_{size}"))
  return params(_form_name(form, size))


_LABELS = {
    "jax": {"riformer": "riformer (train form)", "deploy": "riformer deploy",
            "fused": "riformer fused deploy", "poolformer_s9": "poolformer-s9 (Table 8)",
            "poolformer_xs12": "poolformer-xs12 (Table 8)", "ce": "CE", "soft_kd": "soft KD",
            "mi": "soft KD + module imitation"},
    "torch": {"poolformer": "timm poolformer", "deploy": "mmpretrain riformer deploy"},
}


def _row_id(framework, mode, dtype, form, size):
  return f"{framework}/{mode}/{dtype}/{form}/{size}"


def _row(framework, form, size, mode, dtype, batch, resolution, **fields):
  label = _LABELS[framework].get(form, form)
  return dict(id=_row_id(framework, mode, dtype, form, size), framework=framework,
              model=label, form=form, size=size, mode=mode, dtype=dtype, batch=batch,
              resolution=resolution, **fields)


def jax_inference(args, overrides, params, images):
  """Rows and thunks of our forms: compiled, analysed, ready to time."""
  rows, thunks = [], {}
  for size in args.sizes:
    for form in args.forms:
      if form in SLIMMED and size != "s12":
        continue
      model = _form_model(form, size, overrides, jnp.dtype(args.dtype), args.resolution)
      form_params = _form_params(form, size, params)
      compiled, fields = compile_and_analyse(
          jax.jit(functools.partial(_forward, model)), form_params, images)
      row = _row("jax", form, size, "jit", args.dtype, args.batch, args.resolution,
                 analytic_flops=2 * args.batch * counting.count_macs(
                     model, args.resolution), **fields)
      rows.append(row)
      thunks[row["id"]] = (functools.partial(compiled, form_params, images),
                           jax.block_until_ready)
  return rows, thunks


def torch_inference(args, overrides, params):
  """Rows and thunks of timm's PoolFormer and MMPreTrain's deploy RIFormer, each
  architecture's FLOPs counted on our model of it. A row that fails (a model library
  missing, torch.compile unable to build) records the error and the run goes on."""
  from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415 (torch is a dev dependency)
  bench_torch.configure(args.torch_threads)
  rows, thunks = [], {}
  for size in args.sizes:
    ours = registry.create_model(f"riformer_{size}", **overrides)
    shape = ({"depths": ours.depths, "dims": ours.dims}
             if {"depths", "dims"} & set(overrides) else {})
    factories = {
        "poolformer": lambda: bench_torch.timm_poolformer(
            size, ours.num_classes, **shape),
        "deploy": lambda: bench_torch.load_params(bench_torch.riformer_deploy(
            ours.depths, ours.dims, ours.num_classes, ours.layer_scale_init_value),
            _form_params("deploy", size, params)),
    }
    for form, factory in factories.items():
      flops = 2 * args.batch * counting.count_macs(
          _form_model(form, size, overrides, jnp.float32), args.resolution)
      for mode in args.torch_modes:
        for dtype in args.torch_dtypes:
          row = _row("torch", form, size, mode, dtype, args.batch, args.resolution,
                     analytic_flops=flops)
          try:
            forward, row["compile_s"], row["torch_peak_bytes"] = bench_torch.prepare(
                factory(), args.batch, args.resolution, dtype, mode)
          except Exception as e:  # noqa: BLE001 (recorded, shown in the table)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{row['id']}: {row['error']}", flush=True)
          else:
            thunks[row["id"]] = (forward, bench_torch.synchronize)
          rows.append(row)
  return rows, thunks


def training(args, overrides, params):
  """Rows and thunks of the train steps: CE, soft KD, soft KD + module imitation,
  with randomly initialised teachers in the student's compute dtype."""
  dtype = jnp.dtype(args.dtype)
  batch, resolution = args.train_batch, args.resolution

  def teacher(name):
    module = registry.create_model(name, dtype=dtype,
                                 **_overrides_for(name, overrides, resolution))
    return distill.Teacher(module, {"params": params(name)})

  rows, thunks = [], {}
  for size in args.sizes:
    student = registry.create_model(f"riformer_{size}", dtype=dtype, drop_path_rate=0.1,
                                  **overrides)
    student_macs = counting.count_macs(student, resolution)
    # configs/common.py's default: module imitation on the last block of each stage.
    mi_blocks = tuple(f"stages_{i}/blocks_{d - 1}" for i, d in enumerate(student.depths))
    logit, feature = teacher(args.logit_teacher), teacher(f"poolformer_{size}")
    keys = jax.random.split(jax.random.key(4), 2)
    images = jax.random.normal(keys[0], (batch, resolution, resolution, 3), dtype)
    labels = jax.random.randint(keys[1], (batch,), 0, student.num_classes)
    for step in args.train_steps:
      teachers = {"ce": (None, None), "soft_kd": (logit, None), "mi": (logit, feature)}[step]
      distiller = distill.Distiller(
          student=student, optimizer=optim.make_optimizer(1e-3),
          num_classes=student.num_classes, mi_blocks=mi_blocks if step == "mi" else ())
      weights = {t: jnp.float32(STEP_WEIGHTS[step].get(t, 0.0)) for t in distill.TERMS}
      step_args = (images, labels, weights, jax.random.key(5), *teachers)
      # Forward and backward of the student (about 3 forwards), a forward of each
      # teacher, and for module imitation the relation matrices: the student's
      # forward and backward (about 3x) and the teacher's forward.
      macs = 3 * student_macs + sum(counting.count_macs(t.module, resolution)
                                    for t in teachers if t is not None)
      if step == "mi":
        macs += 4 * relation_macs(student, resolution, mi_blocks)
      # Own buffers (host copies): the step donates its state, and the steps start
      # alike. One jitted init rather than one dispatch per leaf.
      holder = {"state": jax.jit(distiller.init_state)(
          jax.tree.map(np.array, params(f"riformer_{size}")))}
      compiled, fields = compile_and_analyse(
          jax.jit(distiller.train_step, donate_argnums=0), holder["state"], *step_args)

      def run(compiled=compiled, holder=holder, step_args=step_args):
        holder["state"], metrics = compiled(holder["state"], *step_args)
        return metrics

      row = _row("jax", step, size, "train", args.dtype, batch, resolution,
                 analytic_flops=2 * batch * macs, teachers=[
                     name for name, t in zip((args.logit_teacher, f"poolformer_{size}"),
                                             teachers) if t is not None], **fields)
      rows.append(row)
      thunks[row["id"]] = (run, jax.block_until_ready)
  return rows, thunks


def summarise(rows, times, peak_of):
  """Adds the timings and what follows from them; `peak_of(dtype)` gives the peaks."""
  for row in rows:
    if row["id"] not in times:
      continue
    median = statistics.median(times[row["id"]])
    peak_flops, peak_bytes = peak_of(row["dtype"])
    achieved = row["analytic_flops"] / median
    row.update(times_s=times[row["id"]], median_s=median,
               images_per_s=row["batch"] / median, tflops=achieved / 1e12,
               mfu=peak_flops and achieved / peak_flops,
               bandwidth_fraction=peak_bytes and row.get("xla_bytes") and
               row["xla_bytes"] / median / peak_bytes)


def ratios(rows, args):
  """Speed ratios of rows measured in this run, each from the two rows' medians."""
  rate = {row["id"]: row["images_per_s"] for row in rows if "images_per_s" in row}
  out = []

  def add(name, size, numerator, denominator):
    if numerator in rate and denominator in rate:
      out.append(dict(name=name, size=size, numerator=numerator, denominator=denominator,
                      value=rate[numerator] / rate[denominator]))

  for size in args.sizes:
    ours = {form: _row_id("jax", "jit", args.dtype, form, size) for form in FORMS}
    add("deploy / poolformer", size, ours["deploy"], ours["poolformer"])
    add("fused / deploy", size, ours["fused"], ours["deploy"])
    add("deploy / riformer train form", size, ours["deploy"], ours["riformer"])
    # The same computation under two names: how far apart equal rows come out.
    add("identityformer / deploy", size, ours["identityformer"], ours["deploy"])
    for slim in SLIMMED:  # Table 8: the paper has 0.97x (S9) and 1.02x (XS12) on an A100
      add(f"deploy / {slim}", size, ours["deploy"], ours[slim])
      add(f"{slim} / poolformer", size, ours[slim], ours["poolformer"])
    for mode in args.torch_modes:
      for dtype in args.torch_dtypes:
        add(f"torch {mode} {dtype}: deploy / poolformer", size,
            _row_id("torch", mode, dtype, "deploy", size),
            _row_id("torch", mode, dtype, "poolformer", size))
    for form in ("deploy", "poolformer"):
      theirs = [_row_id("torch", mode, args.dtype, form, size) for mode in args.torch_modes]
      theirs = [i for i in theirs if i in rate]
      if theirs:
        add(f"jax {form} / fastest torch {form}", size, ours[form],
            max(theirs, key=rate.get))
  return out


def max_batches(args, overrides, params, inference_rows):
  """The largest batch at which PoolFormer and the deploy form run (the paper's pair),
  doubling from --batch (timed already) to --max-batch, with one timing there."""
  dtype = jnp.dtype(args.dtype)
  rate = {row["id"]: row.get("images_per_s") for row in inference_rows}
  out = []
  for size in args.sizes:
    for form in [f for f in args.forms if f in ("poolformer", "deploy")]:
      model = _form_model(form, size, overrides, dtype)
      forward = jax.jit(functools.partial(_forward, model))
      form_params = _form_params(form, size, params)
      found = dict(size=size, form=form, max_batch=args.batch,
                   images_per_s=rate[_row_id("jax", "jit", args.dtype, form, size)],
                   stopped=f"reached --max-batch {args.max_batch}")
      batch = 2 * args.batch
      while batch <= args.max_batch:
        try:
          images = jax.random.normal(
              jax.random.key(1), (batch, args.resolution, args.resolution, 3), dtype)
          compiled = forward.lower(form_params, images).compile()
          thunk = (functools.partial(compiled, form_params, images),
                   jax.block_until_ready)
          seconds = measure({"run": thunk}, args.warmup, args.iters, 1)["run"][0]
        except jax.errors.JaxRuntimeError as e:  # out of memory, mostly
          found["stopped"] = f"batch {batch}: {str(e).splitlines()[0][:160]}"
          break
        finally:
          images = thunk = None  # free this batch's buffers before the next
        found.update(max_batch=batch, images_per_s=batch / seconds)
        batch *= 2
      print(f"max batch {size} {form}: {found['max_batch']} ({found['stopped']})",
            flush=True)
      out.append(found)
  return out


def _device_peak_bytes():
  stats = jax.devices()[0].memory_stats()
  return stats and stats.get("peak_bytes_in_use")


def _versions():
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm", "mmpretrain"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return versions


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _torch_available():
  try:
    import torch  # noqa: F401,PLC0415
  except ImportError as e:
    print(f"PyTorch not importable ({e}): PyTorch rows skipped", flush=True)
    return False
  return True


def run(args):
  """Every phase; returns the results (what --json writes)."""
  overrides = json.loads(args.model_overrides)
  device = jax.devices()[0]
  if args.torch_modes and not _torch_available():
    args.torch_modes = ()
  if args.torch_modes and args.torch_dtypes is None:
    from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415
    args.torch_dtypes = bench_torch.default_dtypes()
  args.torch_dtypes = args.torch_dtypes or ()
  results = dict(
      device=dict(platform=device.platform, device_kind=device.device_kind,
                  device_count=jax.device_count(), cpu=_cpu_model(),
                  # The cores this process may run on (`taskset` narrows them): XLA's
                  # CPU backend uses them all; PyTorch's threads are stated per run.
                  cpu_count=len(os.sched_getaffinity(0))),
      versions=_versions(), settings=vars(args), load_average_start=os.getloadavg())
  peak_of = functools.partial(peaks, device.device_kind, peak_tflops=args.peak_tflops,
                              peak_gbps=args.peak_gbps)
  results["peaks"] = {dtype: dict(zip(("flops", "bytes_per_s"), peak_of(dtype)))
                      for dtype in dict.fromkeys((args.dtype, *args.torch_dtypes))}

  params = param_source(overrides, args.resolution)
  images = jax.random.normal(jax.random.key(1),
                             (args.batch, args.resolution, args.resolution, 3),
                             jnp.dtype(args.dtype))
  rows, thunks = jax_inference(args, overrides, params, images)
  if args.torch_modes:
    torch_rows, torch_thunks = torch_inference(args, overrides, params)
    rows, thunks = rows + torch_rows, {**thunks, **torch_thunks}
    from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415
    results["torch_cpu_threads"] = bench_torch.cpu_threads()
  print(f"timing {len(thunks)} inference rows", flush=True)
  summarise(rows, measure(thunks, args.warmup, args.iters, args.repeats), peak_of)
  results.update(inference=rows, inference_device_peak_bytes=_device_peak_bytes())
  del thunks, images
  if args.torch_modes:
    from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415
    bench_torch.release()  # PyTorch's cached blocks, before JAX needs the memory

  rows, thunks = training(args, overrides, params) if args.train_steps else ([], {})
  print(f"timing {len(thunks)} training rows", flush=True)
  summarise(rows, measure(thunks, args.warmup, args.iters, args.repeats), peak_of)
  results.update(training=rows, training_device_peak_bytes=_device_peak_bytes())
  del thunks

  results["max_batch"] = (max_batches(args, overrides, params, results["inference"])
                          if args.max_batch else [])
  results["ratios"] = ratios(results["inference"], args)
  results["load_average_end"] = os.getloadavg()
  return results


def _fmt(value, spec=".2f", scale=1.0):
  return "n/a" if value is None else format(value * scale, spec)


def _table(header, lines):
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])


def _speed_cells(row):
  times = row.get("times_s")
  if not times:
    return [row.get("error", "not timed")] + [""] * (len(_SPEED_HEADER) - 1)
  per_image = row["analytic_flops"] / row["batch"]
  return [f"{row['images_per_s']:.1f}",
          f"{row['batch'] / max(times):.1f}-{row['batch'] / min(times):.1f}",
          _fmt(row.get("compile_s"), ".1f"), f"{per_image / 1e9:.2f}",
          _fmt(row.get("xla_flops") and row["xla_flops"] / row["analytic_flops"], ".3f"),
          f"{row['tflops']:.3f}", _fmt(row["mfu"], ".1%"),
          _fmt(row.get("xla_bytes") and row["xla_bytes"] / row["batch"], ".1f", 1e-6),
          _fmt(row["bandwidth_fraction"], ".1%"),
          _fmt(row.get("xla_memory_bytes") or row.get("torch_peak_bytes"), ".0f",
               2 ** -20)]


_SPEED_HEADER = ["img/s (median)", "img/s range", "compile s", "GFLOP/img (analytic)",
                 "XLA/analytic FLOPs", "TFLOP/s", "MFU", "MB/img (XLA)", "of peak BW",
                 "memory MiB"]


def tables(results):
  """The results as Markdown tables (what BENCHMARKS.md shows)."""
  device, settings = results["device"], results["settings"]
  out = [f"device: {device['device_kind']} ({device['platform']}, "
         f"{device['device_count']} device(s)); CPU: {device['cpu']}, "
         f"{device['cpu_count']} cores for this process"
         + (f", PyTorch on {results['torch_cpu_threads']} thread(s)"
            if results.get("torch_cpu_threads") else "") + "; load average "
         f"{' '.join(f'{x:.2f}' for x in results['load_average_start'])} at the start, "
         f"{' '.join(f'{x:.2f}' for x in results['load_average_end'])} at the end",
         "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v),
         "peaks: " + ", ".join(
             f"{dtype} {_fmt(p['flops'], '.1f', 1e-12)} TFLOP/s, "
             f"{_fmt(p['bytes_per_s'], '.0f', 1e-9)} GB/s"
             for dtype, p in results["peaks"].items()),
         f"method: {settings['warmup']} warm-up call(s), median of {settings['repeats']} "
         f"timings of {settings['iters']} call(s), rows interleaved",
         "columns: GFLOP/img is 2 x MACs (`count_macs`; training: 3x the student, one "
         "forward per teacher, the relation matrices); MFU is that over the time and "
         "the peak; of peak BW is XLA's bytes accessed over the time and the peak; "
         "memory is XLA's estimate (arguments + outputs + temporaries) for JAX rows, "
         "torch.cuda.max_memory_allocated for PyTorch rows on a GPU", ""]
  out += ["### Inference", "", _table(
      ["model", "size", "framework", "mode", "dtype", "batch"] + _SPEED_HEADER,
      [[r["model"], r["size"], r["framework"], r["mode"], r["dtype"], r["batch"]]
       + _speed_cells(r) for r in results["inference"]]), ""]
  if results["ratios"]:
    rate = {r["id"]: r.get("images_per_s") for r in results["inference"]}
    out += ["### Ratios (same run)", "", _table(
        ["size", "ratio", "value", "numerator img/s", "denominator img/s"],
        [[r["size"], r["name"], f"{r['value']:.3f}", f"{rate[r['numerator']]:.1f}",
          f"{rate[r['denominator']]:.1f}"] for r in results["ratios"]]), ""]
  if results["training"]:
    out += ["### Training step", "", _table(
        ["step", "size", "teachers", "dtype", "batch"] + _SPEED_HEADER,
        [[r["model"], r["size"], ", ".join(r["teachers"]) or "none", r["dtype"],
          r["batch"]] + _speed_cells(r) for r in results["training"]]),
        f"device peak bytes in use (process high-water): inference "
        f"{_fmt(results['inference_device_peak_bytes'], '.0f', 2 ** -20)} MiB, "
        f"after training {_fmt(results['training_device_peak_bytes'], '.0f', 2 ** -20)}"
        " MiB", ""]
  if results["max_batch"]:
    out += ["### Largest batch", "", _table(
        ["size", "form", "max batch", "img/s at it", "stopped"],
        [[r["size"], r["form"], r["max_batch"], _fmt(r["images_per_s"], ".1f"),
          r["stopped"]] for r in results["max_batch"]]), ""]
  return "\n".join(out)


def _names(choices):
  def parse(text):
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if choices and n not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {unknown}; expected some of {choices}")
    return names
  return parse


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="python -m riformer_jax.bench.throughput",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=_names(SIZES), default=("s12",),
                      help=f"comma-separated, of {','.join(SIZES)} (default: s12)")
  parser.add_argument("--batch", type=int, default=16, help="inference batch (16)")
  parser.add_argument("--train-batch", type=int, help="training batch (--batch)")
  parser.add_argument("--resolution", type=int, default=224, help="(224)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="our compute dtype; params and the residual stream stay "
                           "float32 (float32)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row (1)")
  parser.add_argument("--iters", type=int, default=1,
                      help="calls per timing (1; paper: 30)")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timings per row, of which the median counts (5; paper: 3)")
  parser.add_argument("--forms", type=_names(FORMS), default=FORMS,
                      help=f"our inference rows (all: {','.join(FORMS)})")
  parser.add_argument("--train-steps", type=_names(TRAIN_STEPS), default=TRAIN_STEPS,
                      help=f"training rows (all: {','.join(TRAIN_STEPS)}; '' for none)")
  parser.add_argument("--logit-teacher", default="gfnet_h_b",
                      help="registry name of the soft-KD teacher (gfnet_h_b, the paper's)")
  parser.add_argument("--torch-modes", type=_names(("eager", "compile")),
                      default=("eager", "compile"),
                      help="PyTorch rows (eager,compile; '' for none)")
  parser.add_argument("--torch-dtypes", type=_names(("float32", "bfloat16", "float16")),
                      help="(float32,bfloat16 on CUDA, float32 on CPU)")
  parser.add_argument("--torch-threads", type=int,
                      help="PyTorch's CPU threads (its default: one per core); on a CPU "
                           "shared with other jobs 1 can be faster than 2")
  parser.add_argument("--max-batch", type=int, default=0,
                      help="double the batch up to this while it fits (0: off). On a "
                           "CPU host an allocation failure is the kernel's OOM killer, "
                           "not an error: keep this to what its memory holds")
  parser.add_argument("--peak-tflops", type=float,
                      help="the device's peak TFLOP/s (default: from a table of GPUs)")
  parser.add_argument("--peak-gbps", type=float,
                      help="the device's peak memory GB/s (default: likewise)")
  parser.add_argument("--model-overrides", default="{}",
                      help="create_model arguments for every model, as JSON, e.g. "
                           "'{\"depths\": [1, 1, 1, 1], \"dims\": [8, 16, 24, 32]}'")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  args.train_batch = args.train_batch or args.batch
  return args


def main(argv=None):
  args = parse_args(argv)
  # Before the backend starts: allocate on demand rather than take 75% of the GPU up
  # front, so that PyTorch's rows in the same process can allocate too and
  # --max-batch finds what fits, not what the preallocation leaves.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  results = run(args)
  print(tables(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
