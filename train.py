"""Trains a RIFormer the paper's way: one jitted, sharded step per global batch.

  python train.py --config=configs/s12.py --workdir=runs/s12 \\
      --config.data.data_dir=$TFDS_DATA \\
      --config.teachers.logit=ckpt/gfnet_h_b --config.teachers.feature=ckpt/poolformer_s12

Restarting with the same workdir resumes from the last checkpoint; SIGTERM saves one
and exits. Multi-host: start one process per host with the same flags plus
--distributed (Cloud TPU, SLURM, Open MPI detect the rest), or elsewhere
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.
Writes: workdir/checkpoints (last N), workdir/best (top-1), workdir/metrics.jsonl,
workdir/deploy and workdir/student (for `riformer_jax.load_pretrained`).
"""

import json
import os
import signal

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from ml_collections import config_flags

import riformer_jax
from riformer_jax import augment, distill, input_pipeline, models, optim, pretrained
from riformer_jax import surgery

config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the final models.")
flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize() with "
                  "the cluster's auto-detection (Cloud TPU, SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes, multi-host.")
flags.DEFINE_integer("process_id", None, "This process, multi-host.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def loss_weights(losses, epoch):
  """Each term's weight at (fractional) `epoch`, 0 outside its window (traced, never
  recompiles)."""
  weights = {}
  for name in distill.TERMS:
    term = losses[name]
    active = term.start_epoch <= epoch and (term.end_epoch < 0 or epoch < term.end_epoch)
    weights[name] = np.float32(term.weight if active else 0.0)
  return weights


def load_teacher(directory, role, dtype, num_classes):
  if not directory:
    return None
  if not os.path.isfile(os.path.join(directory, pretrained.MANIFEST)):
    raise app.UsageError(
        f"config.teachers.{role}={directory!r}: not a converted model. Convert the "
        f"PyTorch weights first, e.g. `python convert.py --arch gfnet_h_b --src "
        f"gfnet-h-b.pth --dst {directory}` (README, 'Importing and exporting weights').")
  module, variables = pretrained.load_pretrained(directory, dtype=dtype)
  if module.num_classes != num_classes:
    raise app.UsageError(
        f"config.teachers.{role}={directory!r} predicts {module.num_classes} classes, "
        f"the student {num_classes}: fine-tune the teacher on this label set first")
  return distill.Teacher(module, variables)


def load_teachers(config):
  """`{"logit": Teacher or None, "feature": ...}`. One directory in both roles (the
  roadmap's set-up) is loaded once and shared: one copy on the devices, one evaluation."""
  dtype = jnp.dtype(config.teachers.compute_dtype)
  loaded, teachers = {}, {}
  for role in ("logit", "feature"):
    directory = config.teachers[role]
    key = directory and os.path.realpath(directory)
    if key not in loaded:
      loaded[key] = load_teacher(directory, role, dtype, config.model.num_classes)
    teachers[role] = loaded[key]
  return teachers


def student_params(config, student, teachers):
  """Fresh init, then (Guideline 5) the feature teacher's weights but the mixer, or a
  student directory given as `config.init_from`."""
  if config.init_from:
    _, variables = pretrained.load_pretrained(config.init_from)
    return jax.tree.map(np.array, variables["params"])  # own buffers (see below)
  images = jnp.zeros((1, config.resolution, config.resolution, 3))
  params = jax.jit(student.init)(jax.random.key(config.seed), images)["params"]
  if config.teachers.init_from_feature and teachers["feature"] is not None:
    params, report = riformer_jax.init_student_from_teacher(
        params, teachers["feature"].variables["params"])
    print(f"student initialised from the feature teacher; its own init kept for "
          f"{len(report.left)} params ({', '.join(report.left[:4])}, ...)", flush=True)
  # Own buffers: the train step donates the state, never the teachers' arrays.
  return jax.tree.map(np.array, params)


def evaluate(eval_fns, state, eval_source, config, mesh):
  """Top-1/top-5 (%) of every function in `eval_fns` over the whole eval split."""
  totals = {name: np.zeros(3) for name in eval_fns}
  batches = input_pipeline.eval_batches(
      eval_source, global_batch_size=config.batch_size, size=config.resolution,
      crop_pct=config.data.crop_pct or None, num_threads=config.data.num_threads or None)
  for batch in input_pipeline.global_batches(batches, mesh):
    for name, fn in eval_fns.items():
      totals[name] += np.asarray(jax.device_get(fn(state, batch)), np.float64)
  return {f"{name}/{k}": 100 * totals[name][i] / totals[name][2]
          for name in eval_fns for i, k in enumerate(("top1", "top5"))}


def save_best(best, step, state, results):
  """Keeps `state` in best/ if its top-1 is among the best; a step saved before an
  interruption is not saved twice (orbax refuses)."""
  if step not in best.all_steps():
    best.save(step, args=ocp.args.StandardSave(state),
              metrics={"top1": results["student/top1"]})


class MetricsWriter:
  """metrics.jsonl (process 0) and the log."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step, metrics):
    metrics = {k: float(v) for k, v in metrics.items()}
    if jax.process_index() == 0:
      shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v or "/" not in k)
      print(f"step {step}: {shown}", flush=True)
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def train_and_evaluate(config, workdir):
  """Trains (or resumes) in `workdir`; returns the final evaluation metrics."""
  os.makedirs(workdir, exist_ok=True)
  mesh = distill.make_mesh()
  if config.batch_size % (jax.device_count() * config.accum_steps * 2):
    raise app.UsageError(
        f"config.batch_size={config.batch_size} must split into "
        f"config.accum_steps={config.accum_steps} micro-batches of even size on each "
        f"of {jax.device_count()} devices")

  # Data and teachers first: a missing one stops here, before anything is compiled.
  try:
    train_source = input_pipeline.get_source(
        config.data.dataset, config.data.train_split,
        data_dir=config.data.data_dir or None, seed=config.data.seed)
    eval_source = input_pipeline.get_source(
        config.data.dataset, config.data.eval_split, data_dir=config.data.data_dir or None,
        seed=config.data.seed, class_names=getattr(train_source, "class_names", None))
  except FileNotFoundError as e:  # the message says how to obtain the data
    raise app.UsageError(f"config.data: {e}") from e
  teachers = load_teachers(config)
  shared_teacher = teachers["logit"] is not None and teachers["logit"] is teachers["feature"]

  dtype = jnp.dtype(config.compute_dtype)
  student = models.create_model(config.model_name, **config.model, dtype=dtype,
                                remat=config.remat)
  deploy = (models.create_model(config.model_name, **config.model, dtype=dtype, deploy=True)
            if getattr(student, "token_mixer", None) == "affine" else None)

  steps_per_epoch = input_pipeline.steps_per_epoch(
      train_source, config.batch_size, jax.process_count())
  total_steps = config.total_steps or config.epochs * steps_per_epoch
  schedule = optim.learning_rate_schedule(
      optim.peak_learning_rate(config.lr, config.batch_size),
      total_steps, min(config.warmup_epochs * steps_per_epoch, total_steps - 1),
      optim.peak_learning_rate(config.min_lr, config.batch_size))
  mix = distill.MixConfig(config.aug.mixup, config.aug.cutmix, config.aug.switch_prob,
                          1.0, config.aug.label_smoothing)
  distiller = distill.Distiller(
      student=student,
      optimizer=optim.make_optimizer(schedule, config.weight_decay,
                                     clip_grad_norm=config.clip_grad_norm or None),
      num_classes=config.model.num_classes, mix=mix,
      temperature=config.distill.temperature, mi_blocks=tuple(config.distill.mi_blocks),
      shared_teacher=shared_teacher, accum_steps=config.accum_steps,
      ema_decay=config.ema_decay, schedule=schedule)

  # State: replicated (data parallel) or FSDP-sharded; teachers likewise.
  shard = (lambda tree: distill.fsdp_shardings(tree, mesh)) if config.fsdp else (
      lambda tree: jax.tree.map(lambda _: distill.replicated(mesh), tree))
  state = distiller.init_state(student_params(config, student, teachers))
  state_shardings = shard(state)
  placed = {id(t): jax.device_put(t, shard(t)) for t in teachers.values() if t is not None}
  teachers = {role: t and placed[id(t)] for role, t in teachers.items()}
  # A shared teacher goes to the step once: its one forward pass serves both roles.
  step_feature_teacher = None if shared_teacher else teachers["feature"]

  checkpoints = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints))
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["top1"]))
  start = checkpoints.latest_step() or 0
  if start:
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                    sharding=sharding),
        state, state_shardings)
    state = checkpoints.restore(start, args=ocp.args.StandardRestore(abstract))
    print(f"resumed from step {start}", flush=True)
  else:
    state = jax.device_put(state, state_shardings)

  rng = jax.random.key(config.seed)
  data = distill.data_sharding(mesh)
  train_step = jax.jit(
      distiller.train_step, donate_argnums=0,
      in_shardings=(state_shardings, data, data, None, None,
                    teachers["logit"] and shard(teachers["logit"]),
                    step_feature_teacher and shard(step_feature_teacher)),
      out_shardings=(state_shardings, None))

  def eval_fn(module, params_of, reparameterize=False):
    @jax.jit
    def counts(state, batch):
      params = params_of(state)
      params = surgery.reparameterize(params) if reparameterize else params
      return jnp.stack(distill.eval_counts(module, {"params": params}, batch["image"],
                                           batch["label"], batch["mask"]))
    return counts

  eval_fns = {"student": eval_fn(student, lambda s: s.params)}
  if deploy is not None:  # must agree with the student: both are reported
    eval_fns["deploy"] = eval_fn(deploy, lambda s: s.params, reparameterize=True)
  if config.ema_decay:
    eval_fns["ema"] = eval_fn(student, lambda s: s.ema_params)

  writer = MetricsWriter(workdir)
  if start == 0:
    for teacher in placed.values():  # each teacher once, under each of its roles
      fn = jax.jit(lambda b, t=teacher: jnp.stack(distill.eval_counts(
          t.module, t.variables, b["image"], b["label"], b["mask"])))
      results = evaluate({"teacher": lambda _, b, fn=fn: fn(b)}, None, eval_source,
                         config, mesh)
      writer.write(0, {f"teacher_{role}/{k.split('/')[1]}": v
                       for role, t in teachers.items() if t is teacher
                       for k, v in results.items()})

  stop = {"requested": False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
  try:
    recipe = augment.TrainAugment(
        size=config.resolution, scale=tuple(config.aug.scale),
        ratio=tuple(config.aug.ratio), hflip=config.aug.hflip,
        auto_augment=config.aug.auto_augment or None, re_prob=config.aug.re_prob)
    batches = input_pipeline.global_batches(input_pipeline.train_batches(
        train_source, global_batch_size=config.batch_size, seed=config.seed, recipe=recipe,
        start_step=start, num_steps=total_steps - start,
        num_threads=config.data.num_threads or None), mesh)
    eval_every = config.eval_every_epochs * steps_per_epoch
    for step in range(start, total_steps):
      batch = next(batches)
      weights = loss_weights(config.losses, step / steps_per_epoch)
      state, metrics = train_step(state, batch["image"], batch["label"], weights, rng,
                                  teachers["logit"], step_feature_teacher)
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps:
        writer.write(done, {"epoch": done / steps_per_epoch, **jax.device_get(metrics)})
      if done % eval_every == 0 and done != total_steps:
        results = evaluate(eval_fns, state, eval_source, config, mesh)
        writer.write(done, results)
        save_best(best, done, state, results)
      requested = stop["requested"]
      if jax.process_count() > 1:  # every host stops at the same step
        requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
      if done % config.checkpoint_every_steps == 0 or done == total_steps or requested:
        checkpoints.save(done, args=ocp.args.StandardSave(state))
      if requested:
        print(f"SIGTERM: saved step {done}, exiting", flush=True)
        checkpoints.wait_until_finished()
        return None

    checkpoints.wait_until_finished()
    results = evaluate(eval_fns, state, eval_source, config, mesh)
    writer.write(total_steps, results)
    save_best(best, total_steps, state, results)
    best.wait_until_finished()
    if jax.process_index() == 0:
      params = jax.device_get(state.params)
      kwargs = dict(config.model)
      pretrained.save_pretrained(os.path.join(workdir, "student"), config.model_name,
                                 kwargs, params, overwrite=True, source=workdir)
      if deploy is not None:
        pretrained.save_pretrained(os.path.join(workdir, "deploy"), config.model_name,
                                   dict(kwargs, deploy=True), surgery.reparameterize(params),
                                   overwrite=True, source=workdir)
      print(f"done: wrote {os.path.join(workdir, 'student')}"
            f"{' and deploy' if deploy is not None else ''}", flush=True)
  finally:  # the next run in this process (demo.py, roadmap.py) installs its own
    signal.signal(signal.SIGTERM, previous_handler)
  if stop["requested"]:  # came after the last step: now that all is written, obey it
    signal.raise_signal(signal.SIGTERM)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed or FLAGS.coordinator_address:
    # CPU processes need gloo for cross-process collectives; accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
