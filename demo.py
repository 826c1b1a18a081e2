"""The paper's idea end to end on a CPU, in minutes, with nothing to download.

  python demo.py [--workdir=runs/demo] [--seed=0]      # `make demo`

On the embedded data set (riformer_jax/data/synthetic.py) it trains a small PoolFormer
teacher, a RIFormer of the same shape with cross-entropy only (the baseline), and the
same RIFormer the paper's way (configs/demo.py: teacher initialisation, soft KD
without labels, module imitation); it re-parameterises the distilled student (train.py
writes the deploy form and evaluates it) and prints one table: top-1 of each model,
parameters, and the inference throughput of the mixer-free deploy form against
PoolFormer. Writes WORKDIR/{teacher,ce,distilled} (train.py workdirs),
WORKDIR/curves.png and WORKDIR/results.{json,md}. A finished run is reused, not
retrained; an interrupted one resumes.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import riformer_jax
from configs import demo as demo_configs
from riformer_jax.data import pipeline, sources, synthetic
from riformer_jax.train import faults, runs
from riformer_jax.weights import pretrained, store

TITLES = {
    "teacher": "PoolFormer teacher, cross-entropy",
    "ce": "RIFormer student, cross-entropy only (baseline)",
    "distilled": "RIFormer student, the paper's way (init + soft KD + module imitation)",
}


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_role(role, workdir, seed, teacher_dir, index, count):
  """Runs (or reuses) one of the three trainings; returns its final metrics."""
  run_dir = os.path.join(workdir, role)
  config = demo_configs.get_config(role)
  config.seed = seed
  if role == "distilled":
    config.teachers.logit = config.teachers.feature = teacher_dir
  steps = config.epochs * (synthetic.SPLIT_SIZES["train"] // config.batch_size)
  print(f"\n[{index}/{count}] {TITLES[role]}: {steps} steps of {config.batch_size} images\n"
        f"      python train.py --config=configs/demo.py:{role} --workdir={run_dir} "
        f"--config.seed={seed}"
        + (f" --config.teachers.logit={teacher_dir} --config.teachers.feature="
           f"{teacher_dir}" if role == "distilled" else ""), flush=True)
  return runs.train_or_reuse(config, run_dir)


def plot_curves(workdir, path):
  """Training loss, training accuracy and test top-1 of the three runs against epoch."""
  import matplotlib  # the demo's only use of it; keep the import off the train path
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  steps_per_epoch = None
  for role in demo_configs.ROLES:
    if not os.path.isdir(os.path.join(workdir, role)):  # a teacher from elsewhere
      continue
    records = read_metrics(os.path.join(workdir, role))
    train_records = [m for m in records if "loss/total" in m]
    steps_per_epoch = train_records[-1]["step"] / train_records[-1]["epoch"]
    epochs = [m["epoch"] for m in train_records]
    axes[0].plot(epochs, [m["loss/total"] for m in train_records], label=TITLES[role])
    axes[1].plot(epochs, [100 * m["train_accuracy"] for m in train_records], label=role)
    evals = [m for m in records if "student/top1" in m]
    axes[2].plot([m["step"] / steps_per_epoch for m in evals],
                 [m["student/top1"] for m in evals], marker="o", label=role)
  axes[0].set(title="training loss (each run's own objective)", xlabel="epoch",
              yscale="log")
  axes[1].set(title="training accuracy (%)", xlabel="epoch")
  axes[2].set(title="test top-1 (%)", xlabel="epoch")
  axes[0].legend(fontsize=7)
  for ax in axes[1:]:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def inference_throughput(models, batch, resolution, repeats=30):
  """Images/s of PoolFormer and of the mixer-free deploy RIFormer, timed alternately
  in one loop so that load on the machine hits both alike."""
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(batch, resolution, resolution, 3)), jnp.float32)
  fns = {}
  for name, key in (("poolformer", "teacher"), ("deploy", "deploy")):
    module, variables = models[key]
    fn = jax.jit(lambda x, m=module, v=variables: m.apply(v, x))
    jax.block_until_ready(fn(images))  # compile
    jax.block_until_ready(fn(images))  # warm up
    fns[name] = fn
  seconds = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(images))
      seconds[name].append(time.perf_counter() - start)
  return {name: batch / float(np.median(s)) for name, s in seconds.items()}


def deploy_logit_difference(models, resolution):
  """Max |logit| difference between the training-time and deploy forms on test data."""
  source = sources.get_source("synthetic", "test", num_examples=256)
  batch = next(pipeline.eval_batches(source, global_batch_size=256, size=resolution))
  outputs = []
  for key in ("student", "deploy"):
    module, variables = models[key]
    outputs.append(np.asarray(module.apply(variables, batch["image"])))
  return float(np.max(np.abs(outputs[0] - outputs[1])))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/demo",
                      help="where the three runs and the results go")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of every run (initialisation and batch order); the "
                           "data set is the same for every seed")
  parser.add_argument("--teacher", default="",
                      help="a trained PoolFormer directory of the demo's shape to use "
                           "instead of training one (e.g. another seed's)")
  parser.add_argument("--throughput_batch", type=int, default=64,
                      help="batch of the inference timing")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  workdir = args.workdir
  start = time.time()
  if args.teacher:  # before any run: a wrong path is named at once, not after one
    try:
      store.read_manifest(args.teacher)
    except (OSError, ValueError) as e:
      sys.exit(f"demo.py: --teacher: {e}")
  teacher_dir = args.teacher or os.path.join(workdir, "teacher", "student")
  roles = demo_configs.ROLES[1:] if args.teacher else demo_configs.ROLES
  try:
    final = {role: train_role(role, workdir, args.seed, teacher_dir, index + 1, len(roles))
             for index, role in enumerate(roles)}
  except faults.RunError as e:  # a fault of a run: its message, no traceback
    sys.exit(str(e))
  except KeyboardInterrupt:
    faults.exit_interrupted("demo.py", workdir)
  if args.teacher:  # the distilled run evaluated it before its first step
    final["teacher"] = {"student/top1": next(
        m["teacher_logit/top1"] for m in read_metrics(os.path.join(workdir, "distilled"))
        if "teacher_logit/top1" in m)}

  print("\nmeasuring inference throughput ...", flush=True)
  distilled = os.path.join(workdir, "distilled")
  resolution = demo_configs.get_config().resolution
  models = {key: pretrained.load_pretrained(directory) for key, directory in (
      ("teacher", teacher_dir), ("student", os.path.join(distilled, "student")),
      ("deploy", os.path.join(distilled, "deploy")))}
  speed = inference_throughput(models, args.throughput_batch, resolution)
  max_diff = deploy_logit_difference(models, resolution)
  params = {key: riformer_jax.count_params(variables)
            for key, (_, variables) in models.items()}
  plot_curves(workdir, os.path.join(workdir, "curves.png"))

  top1 = {role: final[role]["student/top1"] for role in demo_configs.ROLES}
  rows = [
      ("PoolFormer teacher", params["teacher"], top1["teacher"], ""),
      ("RIFormer, cross-entropy only", params["student"], top1["ce"], ""),
      ("RIFormer, distilled", params["student"], top1["distilled"], ""),
      ("RIFormer, distilled, deploy form", params["deploy"], final["distilled"]["deploy/top1"],
       f"largest logit difference {max_diff:.1e}"),
  ]
  margin = top1["distilled"] - top1["ce"]
  table = ["| model | params | test top-1 (%) | |", "|---|---:|---:|---|"]
  table += [f"| {name} | {count:,} | {acc:.1f} | {note} |" for name, count, acc, note in rows]
  ratio = speed["deploy"] / speed["poolformer"]
  summary = (
      f"distilled - cross-entropy: {margin:+.1f} points (seed {args.seed})\n"
      f"inference, batch {args.throughput_batch} at {resolution} px on "
      f"{jax.devices()[0].device_kind}: PoolFormer {speed['poolformer']:.0f} images/s, "
      f"RIFormer deploy {speed['deploy']:.0f} images/s ({ratio:.2f}x)\n"
      f"total time {time.time() - start:.0f} s; curves: {workdir}/curves.png")
  print("\n" + "\n".join(table) + "\n\n" + summary, flush=True)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(table) + "\n\n" + summary + "\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(dict(seed=args.seed, top1=top1, deploy_top1=final["distilled"]["deploy/top1"],
                   margin=margin, params=params, images_per_second=speed,
                   deploy_over_poolformer=ratio, deploy_max_logit_diff=max_diff,
                   seconds=time.time() - start), f, indent=1)


if __name__ == "__main__":
  main()
