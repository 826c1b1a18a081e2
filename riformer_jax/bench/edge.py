"""Edge latency: the exported models in every runtime next to the PyTorch originals.

  python -m riformer_jax.bench.edge [--size s12] [--resolution 224] [--threads 1,2]
                                    [--rounds 5] [--json runtimes.json]

Models (random weights: speed does not depend on their values): RIFormer in deploy
form and with the fused deploy block, IdentityFormer and PoolFormer (at S12 also the
paper's Table 8 PoolFormer-S9 and PoolFormer-XS12, in float32 ONNX Runtime and
OpenVINO: the runtimes where the deploy form is fastest), each exported by
`riformer_jax.deploy.export` at batch 1 and 16 and run in XLA (`jax.export`), ONNX Runtime,
OpenVINO and LiteRT (float32 and int8); beside them the originals in PyTorch:
MMPreTrain's deploy RIFormer and timm's PoolFormer, eager NCHW, eager channels_last and
`torch.compile`, plus both exported by `torch.onnx` and run in ONNX Runtime and OpenVINO
(the export route ours is measured against). OpenVINO rows compute in float32 (its CPU
default on bfloat16-capable CPUs is bfloat16, timed separately as "bfloat16 hint").

Every runtime at each thread count runs in a process of its own, pinned to that many
cores (`sched_setaffinity`) and told the same thread count, so that no runtime's
threads slow another's. The processes wait on a pipe while another is timed: the rows
of a batch size and thread count are interleaved in `--rounds` rounds, each timing
every row a few calls in turn, so that a change in the machine's load lands on all
rows alike (each such phase with fresh processes: all rows at once overran 24 GiB).
Batch 1: median (p50) and 90th percentile latency over all calls; batch 16: images
per second at the median.
"""

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from riformer_jax.deploy import runtimes  # numpy only: the runtimes load in the workers
from riformer_jax.weights import store  # numpy only: the runtimes load in the workers

_SPEC_FIELDS = ("model", "runtime", "precision", "batch")


# ----------------------------------------------------------------- worker processes


def _torch_original(family, size):
  """MMPreTrain's deploy RIFormer or timm's PoolFormer, 1000 classes."""
  from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415
  from riformer_jax.models import registry  # noqa: PLC0415

  if family == "riformer":
    kwargs = registry.model_kwargs(f"riformer_{size}")
    return bench_torch.riformer_deploy(kwargs["depths"], kwargs["dims"], 1000,
                                       kwargs["layer_scale_init_value"])
  return bench_torch.timm_poolformer(size, 1000)


def _worker(runtime, cores, connection):
  """Loads and times models of one runtime when the parent asks; idle otherwise."""
  os.sched_setaffinity(0, cores)  # before any runtime starts its threads
  threads = len(cores)
  if runtime == "torch":
    import torch  # noqa: PLC0415
    torch.set_num_threads(threads)
  thunks = {}
  while True:
    message = connection.recv()
    try:
      if message[0] == "stop":
        return
      if message[0] == "load":
        _, key, spec = message
        start = time.perf_counter()
        if runtime == "torch":  # prepare makes the first call (torch.compile compiles)
          from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415
          thunks[key], _, _ = bench_torch.prepare(
              _torch_original(spec["family"], spec["size"]), spec["batch"],
              spec["resolution"], "float32",
              "compile" if spec["mode"] == "compile" else "eager",
              channels_last=spec["mode"] != "eager")
        else:
          run = runtimes.load(spec["path"], runtime, threads, spec.get("precision"))
          images = np.random.default_rng(0).standard_normal(spec["shape"]).astype(
              np.float32)
          thunks[key] = lambda run=run, images=images: run(images)
          thunks[key]()  # compiles (XLA) or plans (the runtimes)
        first = time.perf_counter() - start
        thunks[key]()
        connection.send(("ok", first))
      elif message[0] == "time":
        _, key, calls = message
        times = []
        for _ in range(calls):
          start = time.perf_counter()
          thunks[key]()
          times.append(time.perf_counter() - start)
        connection.send(("ok", times))
      elif message[0] == "torch_onnx":  # the originals through torch.onnx.export
        import torch  # noqa: PLC0415
        _, spec, path = message
        module = _torch_original(spec["family"], spec["size"])
        example = torch.randn(spec["batch"], 3, spec["resolution"], spec["resolution"])
        # The TorchScript exporter: the torch.export one needs onnxscript, which the
        # project does not install.
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["logits"])
        connection.send(("ok", path))
    except Exception as e:  # reported by the parent with the row it belongs to
      connection.send(("error", f"{type(e).__name__}: {e}"))


class Workers:
  """One process per (runtime, threads), started on first use."""

  def __init__(self, cores):
    self.cores, self.processes, self.connections = cores, {}, {}
    self.context = multiprocessing.get_context("spawn")

  def ask(self, runtime, threads, *message):
    key = (runtime, threads)
    if key not in self.connections:
      parent, child = self.context.Pipe()
      process = self.context.Process(
          target=_worker, args=(runtime, set(self.cores[:threads]), child), daemon=True)
      process.start()
      self.processes[key], self.connections[key] = process, parent
    self.connections[key].send(message)
    status, value = self.connections[key].recv()
    if status != "ok":
      raise RuntimeError(f"{runtime} ({threads} threads): {value}")
    return value

  def close(self):
    for key, connection in self.connections.items():
      try:
        connection.send(("stop",))
      except BrokenPipeError:  # the process is gone already
        pass
      self.processes[key].join(timeout=30)
      if self.processes[key].is_alive():
        self.processes[key].kill()


# ----------------------------------------------------------------- artifacts


# Table 8's slimmed PoolFormers (S12 only): label -> registry name.
SLIMMED = {"PoolFormer-S9": "poolformer_s9", "PoolFormer-XS12": "poolformer_xs12"}
_SLIMMED_RUNTIMES = (("onnxruntime", "float32"), ("openvino", "float32"))


def _export_all(workdir, size, resolution, batches, calibration_images, log,
                table8=False):
  """Exports the models at each batch; returns `{(model, batch): prefix}`. `table8`:
  only RIFormer's deploy form, PoolFormer and the slimmed PoolFormers, each as the
  slimmed ones are (ONNX and OpenVINO, float32)."""
  import jax  # noqa: PLC0415

  from riformer_jax.models import registry  # noqa: PLC0415

  models = [("RIFormer (deploy)", f"riformer_{size}", {"deploy": True}),
            ("IdentityFormer", f"identityformer_{size}", {}),
            ("PoolFormer", f"poolformer_{size}", {})]
  if size == "s12":
    models += [(label, name, {}) for label, name in SLIMMED.items()]
  sources = {}
  for label, name, kwargs in models:
    if os.path.exists(os.path.join(workdir, name, store.MANIFEST)):
      sources[label] = os.path.join(workdir, name)
      continue
    module = registry.create_model(name, **kwargs)
    params = module.init(jax.random.key(0), np.zeros((1, resolution, resolution, 3),
                                                     np.float32))["params"]
    sources[label] = store.save_pretrained(
        os.path.join(workdir, name), name, kwargs, params, overwrite=True,
        preprocessing=store.preprocessing_record(resolution))
  prefixes = {}
  exports = [("RIFormer (deploy)", False), ("PoolFormer", False)] if table8 else [
      ("RIFormer (deploy)", False), ("RIFormer (fused)", True), ("IdentityFormer", False),
      ("PoolFormer", False)]
  for label, fused in exports + [(label, False) for label in SLIMMED if label in sources]:
    source = sources["RIFormer (deploy)" if fused else label]
    slim = label in SLIMMED or table8
    for batch in batches:
      prefix = os.path.join(workdir, f"{label.split()[0].lower()}{'_fused' * fused}"
                                     f"{'_table8' * (table8 and label not in SLIMMED)}"
                                     f"_b{batch}")
      prefixes[(label, batch)] = prefix
      if os.path.exists(prefix + ".json"):  # exported by an earlier run (--workdir)
        continue
      start = time.perf_counter()
      # A process per export: what the converters keep (jax2tf and TFLite graphs,
      # compiled programs) adds up to gigabytes over the eight exports.
      command = [sys.executable, "-m", "riformer_jax.deploy.export", "--src", source, "--dst",
                 prefix, "--batch", str(batch)] + (
                     ["--format", "onnx,openvino"] if slim else
                     ["--format", "onnx,openvino,litert,jax", "--int8",
                      "--calibration_images", str(calibration_images)])
      result = subprocess.run(command + ["--fused"] * fused, capture_output=True,
                              text=True)
      if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
      log(f"exported {label} at batch {batch} ({time.perf_counter() - start:.0f} s)")
  return prefixes


def _rows(prefixes, size, resolution, batch, thread_counts, workdir, workers, log,
          table8=False):
  """`[(spec dict, runtime, threads, load message)]`: everything to time at `batch`
  (`table8`: ONNX Runtime and OpenVINO float32 rows of the exported models only)."""
  rows = []
  for (label, prefix_batch), prefix in prefixes.items():
    if prefix_batch != batch:
      continue
    shape = (batch, resolution, resolution, 3)
    # "bfloat16 hint": the float32 file compiled as OpenVINO does by default on CPUs
    # with bfloat16 units (runtimes.load says why float32 rows set the f32 hint).
    for runtime, precision in _SLIMMED_RUNTIMES if label in SLIMMED or table8 else (
        ("xla", "float32"), ("onnxruntime", "float32"), ("onnxruntime", "int8"),
        ("openvino", "float32"), ("openvino", "bfloat16 hint"), ("openvino", "int8"),
        ("litert", "float32"), ("litert", "int8")):
      path = prefix + ("_int8" if precision == "int8" else "") + runtimes.SUFFIX[runtime]
      hint = "bf16" if precision == "bfloat16 hint" else None
      for threads in thread_counts:
        rows.append((dict(model=label, runtime=runtime, precision=precision, batch=batch,
                          threads=threads, source="riformer_jax"),
                     runtime, threads, {"path": path, "shape": shape, "precision": hint}))
  originals = () if table8 else (("RIFormer (deploy)", "riformer", "MMPreTrain"),
                                 ("PoolFormer", "poolformer", "timm"))
  for label, family, library in originals:
    spec = dict(family=family, size=size, resolution=resolution, batch=batch)
    path = os.path.join(workdir, f"torch_{family}_b{batch}.onnx")
    if not os.path.exists(path):
      workers.ask("torch", thread_counts[0], "torch_onnx", spec, path)
      log(f"torch.onnx exported {library} {label} at batch {batch}")
    for threads in thread_counts:
      for mode in ("eager", "channels_last", "compile"):
        rows.append((dict(model=label, runtime=f"PyTorch {mode}", precision="float32",
                          batch=batch, threads=threads, source=library),
                     "torch", threads, dict(spec, mode=mode)))
      for runtime in ("onnxruntime", "openvino"):
        rows.append((dict(model=label, runtime=runtime, precision="float32", batch=batch,
                          threads=threads, source=f"{library} via torch.onnx"),
                     runtime, threads,
                     {"path": path, "shape": (batch, 3, resolution, resolution)}))
  return rows


def measure(size="s12", resolution=224, batches=(1, 16), thread_counts=(1, 2), rounds=5,
            calls=(4, 1), calibration_images=32, workdir=None, log=print, table8=False):
  """Exports, loads and times every row (`table8`: Table 8's rows only, see
  `_export_all`); returns the rows with their statistics."""
  cores = sorted(os.sched_getaffinity(0))
  if max(thread_counts) > len(cores):
    raise ValueError(f"--threads {max(thread_counts)}: this process has {len(cores)} "
                     "cores")
  workdir = workdir or tempfile.mkdtemp(prefix="bench_edge-")
  if table8 and size != "s12":
    raise ValueError(f"--table8 compares S12 with its slimmed PoolFormers, not {size}")
  prefixes = _export_all(workdir, size, resolution, batches, calibration_images, log,
                         table8)
  # One phase per batch size and thread count, its processes stopped before the next:
  # every row at once (compiled PyTorch, OpenVINO's plans for batch 16) overran 24 GiB,
  # and every comparison the report makes is within one phase.
  rows, samples = [], []
  for batch, per_round in zip(batches, calls):
    for threads in thread_counts:
      name = f"batch {batch}, {threads} thread(s)"
      workers = Workers(cores)
      try:
        phase = _rows(prefixes, size, resolution, batch, (threads,), workdir, workers, log,
                      table8)
        for index, (spec, runtime, _, load) in enumerate(phase):
          spec["first_call_s"] = workers.ask(runtime, threads, "load", index, load)
        log(f"{name}: loaded {len(phase)} rows; timing {rounds} rounds")
        phase_samples = [[] for _ in phase]
        for round_index in range(rounds):
          for index, (spec, runtime, _, _) in enumerate(phase):
            phase_samples[index] += workers.ask(runtime, threads, "time", index,
                                                per_round)
          log(f"{name}: round {round_index + 1}/{rounds} done")
      finally:
        workers.close()
      rows += phase
      samples += phase_samples
  results = []
  for (spec, *_), times in zip(rows, samples):
    times = np.asarray(times)
    results.append(dict(spec, calls=len(times), p50_ms=1e3 * np.median(times),
                        p90_ms=1e3 * np.percentile(times, 90),
                        images_per_s=spec["batch"] / np.median(times)))
  return results


# ----------------------------------------------------------------- report


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


# cpuinfo flag -> name, for the instruction sets the runtimes' kernels choose by: int8
# gains most with VNNI or AMX (x86) and the dot-product extensions (ARM).
_ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
              ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX-512 BF16"),
              ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"), ("asimd", "NEON"),
              ("asimddp", "NEON dot product"), ("i8mm", "I8MM"), ("sve", "SVE"))


def isa_from_cpuinfo(text):
  """The instruction sets of `_ISA_FLAGS` that /proc/cpuinfo's flags (x86) or
  Features (ARM) line lists, in that order; "unknown" where it has neither line."""
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      flags = set(value.split())
      found = [name for flag, name in _ISA_FLAGS if flag in flags]
      return ", ".join(found) or "none of " + ", ".join(n for _, n in _ISA_FLAGS)
  return "unknown"


def cpu_isa():
  try:
    with open("/proc/cpuinfo") as f:
      return isa_from_cpuinfo(f.read())
  except OSError:
    return "unknown"


def table(results, batches=(1, 16)):
  """Markdown: one row per (model, runtime, precision, threads), both batches (or the
  first alone)."""
  small, large = batches[0], (batches[1:] or (None,))[0]
  keyed = {}
  for r in results:
    keyed.setdefault((r["model"], r["source"], r["runtime"], r["precision"],
                      r["threads"]), {})[r["batch"]] = r
  # The fastest PyTorch eager/compile at batch 1, per model family and threads.
  torch_best = {}
  for r in results:
    if r["runtime"].startswith("PyTorch") and r["batch"] == small:
      key = (r["model"], r["threads"])
      torch_best[key] = min(torch_best.get(key, np.inf), r["p50_ms"])
  baseline_of = {"RIFormer (deploy)": "RIFormer (deploy)", "RIFormer (fused)":
                 "RIFormer (deploy)", "IdentityFormer": "RIFormer (deploy)",
                 "PoolFormer": "PoolFormer", **{label: "PoolFormer" for label in SLIMMED}}
  lines = [f"| model | from | runtime | precision | threads | batch {small} p50 ms | "
           f"p90 ms | vs best PyTorch |" + (f" batch {large} img/s |" if large else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if large else "")]
  for (model, source, runtime, precision, threads), by_batch in sorted(
      keyed.items(), key=lambda kv: (kv[0][4], kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
    one, many = by_batch.get(small), by_batch.get(large)
    best = torch_best.get((baseline_of[model], threads))
    cells = [f"{one['p50_ms']:.1f}", f"{one['p90_ms']:.1f}",
             f"{best / one['p50_ms']:.2f}x" if best else ""] if one else ["", "", ""]
    if large:
      cells.append(f"{many['images_per_s']:.1f}" if many else "")
    lines.append(f"| {model} | {source} | {runtime} | {precision} | {threads} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def targets(results, batch=1):
  """The issue's three ratios at batch 1 per thread count, as sentences."""
  lines = []
  for threads in sorted({r["threads"] for r in results}):
    rows = [r for r in results if r["threads"] == threads and r["batch"] == batch]
    ours = [r for r in rows if r["source"] == "riformer_jax"]

    def best(predicate):
      chosen = [r for r in rows if predicate(r)]
      return min(chosen, key=lambda r: r["p50_ms"]) if chosen else None
    torch_best = best(lambda r: r["model"] == "RIFormer (deploy)"
                      and r["runtime"].startswith("PyTorch"))
    fp32 = best(lambda r: r in ours and r["model"].startswith("RIFormer")
                and r["precision"] == "float32")
    int8 = best(lambda r: r in ours and r["model"].startswith("RIFormer")
                and r["precision"] == "int8")
    pool = fp32 and best(lambda r: r in ours and r["model"] == "PoolFormer"
                         and r["runtime"] == fp32["runtime"]
                         and r["precision"] == "float32")
    if torch_best and fp32 and int8 and pool:
      lines.append(
          f"{threads} thread(s): fastest PyTorch RIFormer {torch_best['p50_ms']:.1f} ms "
          f"({torch_best['runtime']}); best float32 artifact {fp32['model']} in "
          f"{fp32['runtime']} {fp32['p50_ms']:.1f} ms = "
          f"{torch_best['p50_ms'] / fp32['p50_ms']:.2f}x (target 1.5x); best int8 "
          f"{int8['model']} in {int8['runtime']} {int8['p50_ms']:.1f} ms = "
          f"{torch_best['p50_ms'] / int8['p50_ms']:.2f}x (target 2.5x); PoolFormer in "
          f"{fp32['runtime']} {pool['p50_ms']:.1f} ms, RIFormer "
          f"{pool['p50_ms'] / fp32['p50_ms']:.2f}x faster (goal 1.15x)")
    # Table 8 in the runtime (of those the slimmed PoolFormers run in) where the deploy
    # RIFormer is fastest: the paper's throughputs have S9 2.6% faster, XS12 2.4% slower.
    deploy = best(lambda r: r in ours and r["model"] == "RIFormer (deploy)"
                  and (r["runtime"], r["precision"]) in _SLIMMED_RUNTIMES)
    same = {r["model"]: r for r in ours if deploy and r["runtime"] == deploy["runtime"]
            and r["precision"] == "float32"}
    if deploy and set(SLIMMED) <= set(same) and "PoolFormer" in same:
      lines.append(f"{threads} thread(s), Table 8 in {deploy['runtime']}: " + ", ".join(
          f"{model} {same[model]['p50_ms']:.1f} ms" for model in
          ("RIFormer (deploy)", "PoolFormer-S9", "PoolFormer-XS12", "PoolFormer")))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="s12")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", default="4,1",
                      help="calls per row per round at batch 1 and at batch 16")
  parser.add_argument("--large_batch", type=int, default=16,
                      help="the throughput rows' batch; 0: batch 1 only")
  parser.add_argument("--calibration_images", type=int, default=32)
  parser.add_argument("--workdir", default=None, help="where the artifacts go (a temp "
                      "directory by default); those already there are reused")
  parser.add_argument("--json", default=None)
  parser.add_argument("--table8", action="store_true",
                      help="only Table 8: RIFormer-S12 (deploy), PoolFormer-S12, -S9 "
                           "and -XS12 in ONNX Runtime and OpenVINO, float32")
  args = parser.parse_args(argv)
  threads = tuple(int(t) for t in args.threads.split(","))
  batches = (1, args.large_batch) if args.large_batch else (1,)
  calls = tuple(int(c) for c in args.calls.split(","))
  start = time.perf_counter()
  results = measure(args.size, args.resolution, batches, threads, args.rounds, calls,
                    args.calibration_images, args.workdir,
                    log=lambda m: print(m, flush=True), table8=args.table8)
  print(f"\n{cpu_name()} ({cpu_isa()}), {len(os.sched_getaffinity(0))} cores; {args.size} at "
        f"{args.resolution} px; {args.rounds} rounds, interleaved; "
        f"{time.perf_counter() - start:.0f} s in all")
  print(table(results, batches))
  print()
  print(targets(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cpu": cpu_name(), "isa": cpu_isa(), "cores": len(os.sched_getaffinity(0)),
                 "versions": runtimes.package_versions(
                     ("jax", "onnxruntime", "openvino", "ai-edge-litert",
                      "tensorflow-cpu", "torch", "timm", "mmpretrain")), "args": vars(args), "rows": results}, f,
                indent=2)


if __name__ == "__main__":
  main()
