"""The paper's roadmap (Tables 1-4, Guideline 5) and its Tables 8 and 9 at small
scale, several seeds per row.

  python roadmap.py --workdir=runs/roadmap --seeds=0,1,2            # embedded set
  python roadmap.py --workdir=runs/roadmap --rows=table9            # Table 9's rows
  python roadmap.py --workdir=runs/roadmap --rows=table8            # Table 8's rows
  python roadmap.py --workdir=runs/roadmap_folder --dataset=folder \\
      --data_dir=/data/my_images --num_classes=37 --resolution=96   # any image folder
  python roadmap.py --workdir=runs/mi_reading/per_batch --rows=mi_f80_r20_l4_init \\
      --teacher=runs/roadmap/teacher/student --set distill.mi_reading=per_batch

Trains the PoolFormer teacher once (configs/demo.py:teacher, seed 0, the demo's
teacher) unless --teacher names one; it is every row's logit teacher (the paper's
GFNet-H-B has no counterpart here) and the feature teacher of the roadmap's rows.
Table 9's rows name their own feature teacher (RandFormer, PoolFormerV2, ConvFormer,
CAFormer), trained once each in WORKDIR/teacher_MODEL the same way
(configs/roadmap_small.py:teacher_MODEL). Then every row of configs/roadmap_small.py,
with --set's overrides, for every seed, each in WORKDIR/ROW/seed_S (a train.py
workdir: finished runs are reused, interrupted ones resume). Writes
WORKDIR/results.json and WORKDIR/results.md: test top-1 per seed, mean and sample
standard deviation, the paper's ImageNet figure, the training time, and for rows
with module imitation each weighted term against L_soft at the start and the end of
its window.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
from absl import logging

from configs import demo as demo_configs
from configs import roadmap as roadmap_configs
from configs import roadmap_small
from riformer_jax.train import distill, faults, runs, trainer
from riformer_jax.weights import store

# (row, what it tests, the paper's ImageNet top-1 for RIFormer-S12 at 120 epochs).
ROWS = (
    ("pool_ce", "Table 1: PoolFormer, CE", 75.01),
    ("identity_ce", "Table 1: IdentityFormer, CE", 72.31),
    ("identity_label_hard", "Table 2: identity, 0.5 CE + 0.5 hard KD", 73.51),
    ("identity_hard", "Table 2: identity, hard KD", 72.86),
    ("identity_label_soft", "Table 2: identity, 0.5 CE + 0.5 soft KD", 73.64),
    ("identity_soft", "Table 2: identity, soft KD (Guideline 1)", 74.05),
    ("affine_ce", "Table 3: affine, CE", 72.25),
    ("affine_label_hard", "Table 3: affine, 0.5 CE + 0.5 hard KD", 73.44),
    ("affine_hard", "Table 3: affine, hard KD", 72.77),
    ("affine_label_soft", "Table 3: affine, 0.5 CE + 0.5 soft KD", 72.10),
    ("affine_soft", "Table 3: affine, soft KD", 74.07),
    ("mi_f80_r20_l4", "Table 4: + module imitation, 4 layers", 75.13),
    ("mi_f80_r10_l6", "Table 4: + module imitation, 6 layers, shorter L_rel", 75.08),
    ("mi_f80_r20_l4_init", "Guideline 5: + teacher initialisation", 75.36),
    ("t8_s9_soft", "Table 8: PoolFormer-S9 (depth), soft KD", 74.78),
    ("t8_xs12_soft", "Table 8: PoolFormer-XS12 (width), soft KD", 75.11),
    ("t9_l12_none", "Table 9: 12 layers, no teacher", 72.75),
    ("t9_l12_randformer", "Table 9: 12 layers, RandFormer-S12 teacher", 75.62),
    ("t9_l12_poolformerv2", "Table 9: 12 layers, PoolFormerV2-S12 teacher", 75.87),
    ("t9_l18_none", "Table 9: 18 layers, no teacher", 75.01),
    ("t9_l18_convformer", "Table 9: 18 layers, ConvFormer-S18 teacher", 77.53),
    ("t9_l18_caformer", "Table 9: 18 layers, CAFormer-S18 teacher", 77.26),
)
# --rows presets: the roadmap proper (the default), and the papers' Tables 8 and 9
# (Table 8 compares its slimmed PoolFormers with PoolFormer-S12 and the final RIFormer).
PRESETS = {
    "roadmap": tuple(row for row, _, _ in ROWS if not row.startswith(("t8_", "t9_"))),
    "table8": ("pool_ce", "t8_s9_soft", "t8_xs12_soft", "mi_f80_r20_l4_init"),
    "table9": tuple(roadmap_configs.TABLE9),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/roadmap",
                      help="where the runs and the results go")
  parser.add_argument("--seeds", default="0,1,2", help="seeds of every row")
  parser.add_argument("--rows", default="roadmap",
                      help="rows to run (configs/roadmap.py), or presets among "
                           f"{', '.join(PRESETS)}")
  parser.add_argument("--teacher", default="",
                      help="a PoolFormer directory to use as both teachers (default: "
                           "train one with configs/demo.py:teacher in WORKDIR/teacher)")
  parser.add_argument("--dataset", default="synthetic", help="config.data.dataset")
  parser.add_argument("--data_dir", default="", help="config.data.data_dir")
  parser.add_argument("--train_split", default="train", help="config.data.train_split")
  parser.add_argument("--eval_split", default="test", help="config.data.eval_split")
  parser.add_argument("--num_classes", type=int, default=10, help="classes of the data")
  parser.add_argument("--resolution", type=int, default=96, help="input size")
  parser.add_argument("--epochs", type=int, default=roadmap_small.EPOCHS,
                      help="epochs of every row's run (loss windows scale with it); "
                           "the teacher trains for the demo's 8")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config override for every row, as train.py's "
                           "--config.FIELD=VALUE (e.g. distill.mi_reading=value); "
                           "repeatable")
  args = parser.parse_args(argv)
  args.seeds = [int(seed) for seed in args.seeds.split(",")]
  args.rows = list(dict.fromkeys(
      row for name in args.rows.split(",") for row in PRESETS.get(name, (name,))))
  unknown = set(args.rows) - {row for row, _, _ in ROWS}
  if unknown:
    parser.error(f"--rows: unknown {sorted(unknown)}; see configs/roadmap.py")
  fields = roadmap_small.get_config("affine_soft")  # every row has the same fields
  args.set = [parse_override(parser, fields, setting) for setting in args.set]
  return args


def parse_override(parser, fields, setting):
  """`FIELD=VALUE` -> (path, value), the value of the type the field has in `fields`."""
  path, sep, text = setting.partition("=")
  node = fields
  *parents, field = path.split(".")
  try:
    for parent in parents:
      node = node[parent]
    current = node[field]
  except (KeyError, AttributeError, TypeError):
    parser.error(f"--set {setting!r}: no config field {path!r}")
  if not sep or isinstance(current, (tuple, list, dict)) or current is None:
    parser.error(f"--set {setting!r}: expected FIELD=VALUE for a scalar field")
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError(text)
      return path, text.lower() == "true"
    return path, type(current)(text)
  except ValueError:
    parser.error(f"--set {setting!r}: expected {type(current).__name__}, got {text!r}")


def with_data(config, args, epochs, settings=()):
  """The command line's data set and size, `epochs` and `settings` (--set), in place;
  returns the train.py overrides that make the same config."""
  changes = {"data.dataset": args.dataset, "data.data_dir": args.data_dir,
             "data.train_split": args.train_split, "data.eval_split": args.eval_split,
             "model.num_classes": args.num_classes, "resolution": args.resolution,
             "epochs": epochs}
  if "img_size" in config.model:  # RandFormer's random matrices fix its input size
    changes["model.img_size"] = args.resolution
  for name, term in config.losses.items():
    if term.weight and term.end_epoch > 0:
      changes[f"losses.{name}.end_epoch"] = term.end_epoch * epochs / config.epochs
  changes.update(settings)
  overrides = []
  for path, value in changes.items():
    *parents, field = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if node[field] != value:
      node[field] = value
      overrides.append(f"--config.{path}={value!r}" if isinstance(value, float)
                       else f"--config.{path}={value}")
  return overrides


def train_teacher(name, args):
  """(directory, test top-1) of Table 9's feature teacher `name`, trained once in
  WORKDIR/teacher_NAME as the demo trains its PoolFormer."""
  row = roadmap_small.TEACHER_PREFIX + name
  config = roadmap_small.get_config(row)
  workdir = os.path.join(args.workdir, row)
  overrides = with_data(config, args, config.epochs)
  command = (f"python train.py --config=configs/roadmap_small.py:{row} "
             f"--workdir={workdir} " + " ".join(overrides))
  return os.path.join(workdir, "student"), run(config, workdir, command)["student/top1"]


def run(config, workdir, command):
  """Final metrics of a run, training it unless it has finished before."""
  print(f"\n== {command}", flush=True)
  return runs.train_or_reuse(config, workdir)


def term_sizes(config, workdir):
  """Each module-imitation term's weighted size against L_soft at the first and the
  last logged step of its window: {term: (weight, start ratio, end ratio)}."""
  sizes = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for record in records:
    if "loss/soft_kd" not in record or not record["loss/soft_kd"]:
      continue
    weights = trainer.loss_weights(config, record["epoch"])
    for name in distill.MI_TERMS:
      if weights[name]:
        ratio = float(weights[name]) * record[f"loss/{name}"] / record["loss/soft_kd"]
        start = sizes[name][1] if name in sizes else ratio
        sizes[name] = (float(weights[name]), start, ratio)
  return sizes


def markdown(results, teachers, args):
  minutes = sum(r["seconds"] for runs in results.values() for r in runs) / 60
  others = "; ".join(f"{name} {top1:.1f}" for name, (_, top1) in teachers.items()
                     if name != "poolformer_s12")
  lines = [
      f"Test top-1 (%) after {args.epochs} epochs, seeds "
      f"{', '.join(map(str, args.seeds))}: mean ± sample std, each seed, and the "
      f"paper's ImageNet top-1 (S12 at 120 epochs; Table 9 at 130). Teacher (logit "
      f"role, and feature role unless the row names one): "
      f"{teachers['poolformer_s12'][1]:.1f}"
      + (f". Feature teachers: {others}" if others else "")
      + f". Training time of these runs: {minutes:.0f} min.",
      "",
      "| row | what | top-1 | seeds | paper | min/run |",
      "|---|---|---:|---|---:|---:|"]
  for row, what, paper in ROWS:
    if row not in results:
      continue
    top1 = np.array([r["student/top1"] for r in results[row]])
    minutes = np.mean([r["seconds"] for r in results[row]]) / 60
    spread = f" ± {top1.std(ddof=1):.1f}" if len(top1) > 1 else ""
    lines.append(f"| `{row}` | {what} | {top1.mean():.1f}{spread} | "
                 f"{', '.join(f'{t:.1f}' for t in top1)} | "
                 f"{paper} | {minutes:.1f} |")
  terms = [(row, name) for row, _, _ in ROWS if row in results
           for name in distill.MI_TERMS if name in results[row][0]["terms"]]
  if terms:
    lines += [
        "",
        "Module-imitation terms, weighted, against L_soft at the first and the last "
        "logged step of each term's window (mean over seeds, min-max):",
        "",
        "| row | term | weight | start | end |",
        "|---|---|---:|---:|---:|"]
    for row, name in terms:
      sizes = np.array([r["terms"][name][1:] for r in results[row]])
      start, end = (f"{col.mean():.3g} ({col.min():.3g}-{col.max():.3g})"
                    for col in sizes.T)
      lines.append(f"| `{row}` | {name} | {results[row][0]['terms'][name][0]:.4g} | "
                   f"{start} | {end} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  try:
    run_rows(args, argv)
  except faults.RunError as e:  # a fault of a run: its message, no traceback
    sys.exit(str(e))
  except KeyboardInterrupt:
    faults.exit_interrupted("roadmap.py", args.workdir)
  except (OSError, ValueError) as e:  # --teacher is not a model directory
    sys.exit(f"roadmap.py: {e}")


def run_rows(args, argv):
  logging.set_verbosity(logging.WARNING)
  # Rows differ in traced loss weights only, so most of their programs are the same:
  # the persistent cache compiles each once instead of once per run.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.abspath(args.workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  teacher = args.teacher
  if teacher:
    store.read_manifest(teacher)  # fails early, naming the directory
    teacher_top1 = float("nan")
    finished = os.path.join(os.path.dirname(os.path.normpath(teacher)), runs.FINAL)
    if os.path.isfile(finished):  # a train.py workdir's student/
      with open(finished) as f:
        teacher_top1 = json.load(f)["student/top1"]
  else:
    config = demo_configs.get_config("teacher")
    workdir = os.path.join(args.workdir, "teacher")
    overrides = with_data(config, args, config.epochs)
    command = (f"python train.py --config=configs/demo.py:teacher --workdir={workdir} "
               + " ".join(overrides))
    teacher_top1 = run(config, workdir, command)["student/top1"]
    teacher = os.path.join(workdir, "student")
  # Feature teachers by model: {name: (directory, test top-1)}.
  teachers = {"poolformer_s12": (teacher, teacher_top1)}
  for row in args.rows:
    name = roadmap_configs.feature_teacher(row)
    if name and name not in teachers:
      teachers[name] = train_teacher(name, args)

  results = {}
  for row in args.rows:
    # The roadmap's rows keep the PoolFormer in both roles (it is also their students'
    # shape); Tables 8 and 9's rows without a feature teacher have none at all (their
    # students' shapes differ from the PoolFormer's).
    name = roadmap_configs.feature_teacher(row)
    own_shape = row in roadmap_configs.TABLE9 or row in roadmap_configs.TABLE8
    feature = teachers[name][0] if name else ("" if own_shape else teacher)
    for seed in args.seeds:
      config = roadmap_small.get_config(row)
      overrides = with_data(config, args, args.epochs, args.set)
      config.seed = seed
      config.teachers.logit, config.teachers.feature = teacher, feature
      workdir = os.path.join(args.workdir, row, f"seed_{seed}")
      command = (f"python train.py --config=configs/roadmap_small.py:{row} "
                 f"--workdir={workdir} --config.seed={seed} "
                 f"--config.teachers.logit={teacher} --config.teachers.feature={feature} "
                 + " ".join(overrides))
      final = dict(run(config, workdir, command), terms=term_sizes(config, workdir))
      results.setdefault(row, []).append(final)

  table = markdown(results, teachers, args)
  print("\n" + table, flush=True)
  command = "python roadmap.py " + " ".join(argv if argv is not None else sys.argv[1:])
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(f"{command}\n\n{table}")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(dict(command=command, teacher=teacher, teacher_top1=teacher_top1,
                   feature_teachers={name: dict(directory=d, top1=t)
                                     for name, (d, t) in teachers.items()},
                   seeds=args.seeds, epochs=args.epochs, rows=results),
              f, indent=1)


if __name__ == "__main__":
  main()
