"""The trainer: `train_and_evaluate(config, workdir)` trains (or resumes) one run.

What train.py, demo.py and roadmap.py call. The set-up reads as its steps: check the
config against the devices and the recorded run, open the data, load the teachers,
build the models and the distiller, place the state on the mesh (restoring the newest
checkpoint), compile the step; then the loop. Reporting (`reporting`), fault handling
(`faults`) and checkpoint policy (`checkpointing`) live in modules of their own.

Writes: workdir/config.json, workdir/checkpoints (last N), workdir/best (top-1),
workdir/metrics.jsonl, workdir/tensorboard (scalars, config, profiles), and at the
end workdir/student and workdir/deploy (for `riformer_jax.load_pretrained`).
"""

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from riformer_jax.data import augment, device_augment, imagenet, pipeline, sources
from riformer_jax.models import registry, surgery
from riformer_jax.train import (
  checkpointing,
  distill,
  faults,
  losses,
  mixup,
  optim,
  parallel,
  reporting,
  workdir_lock,
)
from riformer_jax.weights import pretrained, store

# What the non-finite watch checks on every update.
WATCHED = tuple(f"loss/{t}" for t in ("total",) + distill.TERMS) + ("grad_norm",)


def loss_weights(config, epoch):
  """Each term's weight at (fractional) `epoch`, 0 outside its window (traced, never
  recompiles). Module-imitation terms are Table 10's values under
  config.distill.mi_reading."""
  weights = {}
  for name in distill.TERMS:
    term = config.losses[name]
    weight = term.weight
    if name in distill.MI_TERMS:
      weight = losses.module_imitation_weight(weight, config.distill.mi_reading,
                                              config.distill.mi_batch)
    active = term.start_epoch <= epoch and (term.end_epoch < 0 or epoch < term.end_epoch)
    weights[name] = np.float32(weight if active else 0.0)
  return weights


def load_model_dir(directory, field, **overrides):
  """`load_pretrained(directory)`, or a `RunError` naming the config field, the
  directory and what is wrong with it. A hub name or URL is converted once into the
  cache first (riformer_jax.weights.hub)."""
  try:
    directory = pretrained.resolve_directory(directory)
  except (OSError, ValueError, KeyError, ImportError) as e:
    raise faults.RunError(f"{field}={directory!r}: {e}") from e
  if not os.path.isfile(os.path.join(directory, store.MANIFEST)):
    raise faults.RunError(
        f"{field}={directory!r}: not a converted model (no {store.MANIFEST}). "
        f"Convert the PyTorch weights first, e.g. `python convert.py --arch gfnet_h_b "
        f"--src gfnet-h-b.pth --dst {directory}` (README, 'Importing and exporting "
        "weights'), or give a student/ directory that train.py wrote.")
  faults.quiet_abandoned_reads()
  try:
    return pretrained.load_pretrained(directory, **overrides)
  except Exception as e:  # a damaged directory fails in many ways: name it and the cause
    raise faults.RunError(f"{field}={directory!r} is not a readable model: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


def load_teachers(config):
  """`{"logit": Teacher or None, "feature": ...}`. One directory in both roles (the
  roadmap's set-up) is loaded once and shared: one copy on the devices, one evaluation."""
  dtype = jnp.dtype(config.teachers.compute_dtype)
  loaded, teachers = {}, {}
  for role in ("logit", "feature"):
    directory = config.teachers[role]
    key = directory and os.path.realpath(directory)
    if key not in loaded and directory:
      module, variables = load_model_dir(directory, f"config.teachers.{role}", dtype=dtype)
      if module.num_classes != config.model.num_classes:
        raise faults.RunError(
            f"config.teachers.{role}={directory!r} predicts {module.num_classes} "
            f"classes, the student {config.model.num_classes}: fine-tune the teacher "
            "on this label set first")
      loaded[key] = distill.Teacher(module, variables)
    teachers[role] = loaded.get(key)
  return teachers


def student_params(config, student, teachers):
  """Fresh init, then (Guideline 5) the feature teacher's weights but the mixer, or a
  student directory given as `config.init_from`."""
  if config.init_from:
    _, variables = load_model_dir(config.init_from, "config.init_from")
    return jax.tree.map(np.array, variables["params"])  # own buffers (see below)
  images = jnp.zeros((1, config.resolution, config.resolution, 3))
  params = jax.jit(student.init)(jax.random.key(config.seed), images)["params"]
  if config.teachers.init_from_feature and teachers["feature"] is not None:
    params, report = surgery.init_student_from_teacher(
        params, teachers["feature"].variables["params"])
    print(f"student initialised from the feature teacher; its own init kept for "
          f"{len(report.left)} params ({', '.join(report.left[:4])}, ...)", flush=True)
  # Own buffers: the train step donates the state, never the teachers' arrays.
  return jax.tree.map(np.array, params)


def make_distiller(config, student, steps_per_epoch, total_steps, shared_teacher):
  schedule = optim.learning_rate_schedule(
      optim.peak_learning_rate(config.lr, config.batch_size),
      total_steps, min(config.warmup_epochs * steps_per_epoch, total_steps - 1),
      optim.peak_learning_rate(config.min_lr, config.batch_size))
  mix = distill.MixConfig(config.aug.mixup, config.aug.cutmix, config.aug.switch_prob,
                          1.0, config.aug.label_smoothing)
  return distill.Distiller(
      student=student,
      optimizer=optim.make_optimizer(schedule, config.weight_decay,
                                     clip_grad_norm=config.clip_grad_norm or None),
      num_classes=config.model.num_classes, mix=mix,
      temperature=config.distill.temperature, mi_blocks=tuple(config.distill.mi_blocks),
      shared_teacher=shared_teacher, accum_steps=config.accum_steps,
      ema_decay=config.ema_decay, schedule=schedule,
      finish=distill.FinishConfig(erase_mode="pixel" if config.aug.re_prob > 0 else None,
                                  auto_augment=device_augment_plan(config),
                                  resize_to=config.resolution))


def eval_images(config, batch):
  """The networks' input of an evaluation batch: its images, or, where the step
  resizes (a "geometry" key), its windows resized, cropped and normalised."""
  if "geometry" not in batch:
    return batch["image"]
  crops = device_augment.resize_eval_windows(batch["image"], batch["geometry"],
                                             config.resolution)
  return mixup.finish_batch(None, crops, None, imagenet.MEAN, imagenet.STD, mode=None)


def eval_functions(config, student, deploy):
  """Jitted (top-1, top-5, count) of every model the run reports (`eval_images`)."""
  def counts_of(module, params_of, reparameterize=False):
    @jax.jit
    def counts(state, batch):
      params = params_of(state)
      params = surgery.reparameterize(params) if reparameterize else params
      return jnp.stack(distill.eval_counts(module, {"params": params},
                                           eval_images(config, batch), batch["label"],
                                           batch["mask"]))
    return counts

  fns = {"student": counts_of(student, lambda s: s.params)}
  if deploy is not None:  # must agree with the student: both are reported
    fns["deploy"] = counts_of(deploy, lambda s: s.params, reparameterize=True)
  if config.ema_decay:
    fns["ema"] = counts_of(student, lambda s: s.ema_params)
  return fns


def evaluate(eval_fns, state, eval_source, config, mesh):
  """Top-1/top-5 (%) of every function in `eval_fns` over the whole eval split, and
  `eval/unreadable` where images of it could not be read (left out of the top-1)."""
  totals = {name: np.zeros(3) for name in eval_fns}
  unreadable = 0
  canvas = canvas_size(config)
  batches = pipeline.eval_batches(
      eval_source, global_batch_size=config.batch_size, size=config.resolution,
      crop_pct=config.data.crop_pct or None, num_threads=config.data.num_threads or None,
      normalize=not canvas, canvas=canvas)
  for host_batch in _naming_the_eval_split(batches):
    unreadable += int(host_batch.pop("unreadable").sum())
    batch = parallel.to_global(host_batch, mesh)
    for name, fn in eval_fns.items():
      totals[name] += np.asarray(jax.device_get(fn(state, batch)), np.float64)
  results = {f"{name}/{k}": 100 * totals[name][i] / totals[name][2]
             for name in eval_fns for i, k in enumerate(("top1", "top5"))}
  if unreadable:  # left out of the accuracies (masked); this host's count
    results["eval/unreadable"] = unreadable
  return results


def _naming_the_eval_split(batches):
  try:
    yield from batches
  except pipeline.UnreadableData as e:
    raise faults.RunError(f"evaluation: {e}") from e


def evaluate_teachers(teachers, eval_source, config, mesh, reporter):
  """Logs each teacher's top-1/top-5 at step 0: once per teacher, under each role."""
  unique = {id(t): t for t in teachers.values() if t is not None}
  for teacher in unique.values():
    fn = jax.jit(lambda b, t=teacher: jnp.stack(distill.eval_counts(
        t.module, t.variables, eval_images(config, b), b["label"], b["mask"])))
    results = evaluate({"teacher": lambda _, b, fn=fn: fn(b)}, None, eval_source,
                       config, mesh)
    reporter.evaluation(0, {f"teacher_{role}/{k.split('/')[1]}": v
                            for role, t in teachers.items() if t is teacher
                            for k, v in results.items()})


def save_final_models(workdir, config, state, deploy, class_names):
  params = jax.device_get(state.params)
  kwargs = dict(config.model)
  # What the evaluation fed the model and what its outputs mean, for whoever deploys
  # it (export.py's manifest) or classifies with it (riformer_jax.deploy.predict).
  about = {"source": workdir, "preprocessing": store.preprocessing_record(
      config.resolution, config.data.crop_pct or None)}
  if class_names:
    about["class_names"] = list(class_names)
  store.save_pretrained(os.path.join(workdir, "student"), config.model_name,
                             kwargs, params, overwrite=True, **about)
  if deploy is not None:
    store.save_pretrained(os.path.join(workdir, "deploy"), config.model_name,
                               dict(kwargs, deploy=True), surgery.reparameterize(params),
                               overwrite=True, **about)
  print(f"done: wrote {os.path.join(workdir, 'student')}"
        f"{' and deploy' if deploy is not None else ''}", flush=True)




def check_batch_split(config):
  if config.batch_size % (jax.device_count() * config.accum_steps * 2):
    raise faults.RunError(
        f"config.batch_size={config.batch_size} must split into "
        f"config.accum_steps={config.accum_steps} micro-batches of even size on each "
        f"of {jax.device_count()} devices")


def device_augment_plan(config):
  """RandAugment/AutoAugment for the train step (`config.aug.auto_augment_on` =
  "device", the default), or None where the host runs it or the recipe has none; a
  bad spec or placement is a `RunError` naming the field."""
  spec, where = config.aug.auto_augment, config.aug.auto_augment_on
  if where not in ("device", "host"):
    raise faults.RunError(f"config.aug.auto_augment_on={where!r}: expected 'device' "
                          "(in the jitted train step) or 'host' (in tf.data)")
  try:
    plan = device_augment.plan(spec) if spec else None
  except ValueError as e:
    raise faults.RunError(f"config.aug.{e}") from e
  if where == "host" or plan is None:
    return None
  if not config.data.uint8_batches:
    raise faults.RunError("config.aug.auto_augment_on='device' augments uint8 batches: "
                          "set config.data.uint8_batches=True (or auto_augment_on='host')")
  return plan


def canvas_size(config):
  """The canvas the host sends crops in for the step to resize
  (`config.aug.resize_on="device"`), or 0 where the host resizes; a placement that
  cannot work is a `RunError` naming the fields."""
  where = config.aug.resize_on
  if where not in ("device", "host"):
    raise faults.RunError(f"config.aug.resize_on={where!r}: expected 'device' (in the "
                          "jitted train step) or 'host' (in tf.data)")
  if where == "host":
    return 0
  if not config.data.uint8_batches:
    raise faults.RunError("config.aug.resize_on='device' resizes uint8 batches: set "
                          "config.data.uint8_batches=True (or resize_on='host')")
  if config.aug.auto_augment and config.aug.auto_augment_on != "device":
    raise faults.RunError("config.aug.resize_on='device' needs RandAugment/AutoAugment "
                          "after the resize, in the step: set config.aug.auto_augment_on"
                          "='device' (or resize_on='host')")
  if config.aug.canvas < config.resolution:
    raise faults.RunError(f"config.aug.canvas={config.aug.canvas} is smaller than "
                          f"config.resolution={config.resolution}")
  return config.aug.canvas


def open_sources(config):
  """(train source, eval source); a missing data set is a `RunError` saying how to get
  it."""
  data_dir = config.data.data_dir or None
  try:
    train_source = sources.get_source(config.data.dataset, config.data.train_split,
                                      data_dir=data_dir, seed=config.data.seed)
    eval_source = sources.get_source(
        config.data.dataset, config.data.eval_split, data_dir=data_dir,
        seed=config.data.seed, class_names=getattr(train_source, "class_names", None))
  except (FileNotFoundError, ValueError) as e:  # the message names the data and the fix
    raise faults.RunError(f"config.data: {e}") from e
  return train_source, eval_source


def announce_module_imitation(config):
  """Prints the module-imitation weights that Table 10's values give under
  config.distill.mi_reading; a bad reading is a `RunError` naming the field."""
  try:
    weights = {name: losses.module_imitation_weight(
        config.losses[name].weight, config.distill.mi_reading, config.distill.mi_batch)
               for name in distill.MI_TERMS}
  except ValueError as e:
    raise faults.RunError(str(e)) from e
  if any(weights.values()):
    print(f"module imitation: Table 10's values read as {config.distill.mi_reading!r} "
          f"(batch {config.distill.mi_batch}) -> weights "
          + ", ".join(f"{name} {w:.4g}" for name, w in weights.items()), flush=True)


def build_student(config):
  """(student, its deploy form or None): only an affine-mixer student has one."""
  dtype = jnp.dtype(config.compute_dtype)
  student = registry.create_model(config.model_name, **config.model, dtype=dtype,
                                remat=config.remat)
  deploy = (registry.create_model(config.model_name, **config.model, dtype=dtype, deploy=True)
            if registry.has_deploy_form(student) else None)
  return student, deploy


def check_mi_blocks(config, student, feature_teacher):
  """Every block of config.distill.mi_blocks exists in the student and the feature
  teacher (the step traces module imitation even at weight 0); else a `RunError`."""
  models = [(config.model_name, student)]
  if feature_teacher is not None:
    models.append((f"the feature teacher {config.teachers.feature!r}",
                   feature_teacher.module))
  for name, module in models:
    depths = tuple(getattr(module, "depths", ()))
    blocks = {f"stages_{i}/blocks_{j}" for i, d in enumerate(depths) for j in range(d)}
    missing = [b for b in config.distill.mi_blocks if depths and b not in blocks]
    if missing:
      raise faults.RunError(
          f"config.distill.mi_blocks: {missing} are not blocks of {name}, whose depths "
          f"{depths} have stages_0/blocks_0 ... stages_{len(depths) - 1}/blocks_"
          f"{depths[-1] - 1}")


@dataclasses.dataclass
class Placed:
  """The run's arrays on the mesh: the train state (restored from the newest checkpoint
  or fresh), its shardings, the teachers, and the step at which training resumes."""
  state: Any
  state_shardings: Any
  shard: Any  # tree -> its shardings (replicated or FSDP)
  teachers: dict  # role -> placed distill.Teacher or None
  step_feature_teacher: Optional[distill.Teacher]  # None when shared with the logit role
  start: int


def place_and_restore(config, mesh, distiller, student, teachers, shared_teacher,
                      checkpoints):
  # State: replicated (data parallel) or FSDP-sharded; teachers likewise.
  shard = (lambda tree: parallel.fsdp_shardings(tree, mesh)) if config.fsdp else (
      lambda tree: jax.tree.map(lambda _: parallel.replicated(mesh), tree))
  state = distiller.init_state(student_params(config, student, teachers))
  state_shardings = shard(state)
  placed = {id(t): jax.device_put(t, shard(t)) for t in teachers.values() if t is not None}
  teachers = {role: t and placed[id(t)] for role, t in teachers.items()}
  abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=sharding), state, state_shardings)
  restored, start = checkpoints.restore(abstract)
  state = restored if start else jax.device_put(state, state_shardings)
  if start:
    print(f"resumed from step {start}", flush=True)
  # A shared teacher goes to the step once: its one forward pass serves both roles.
  return Placed(state, state_shardings, shard, teachers,
                None if shared_teacher else teachers["feature"], start)


def jit_train_step(config, mesh, distiller, watch, placed):
  """The jitted step `(state, health, images, labels, weights, rng, logit teacher,
  feature teacher, erase boxes) -> (state, health, metrics)`. It carries the
  non-finite watch beside the state (not in checkpoints) and donates both."""
  def step_fn(state, health, images, labels, weights, rng, logit_teacher, feature_teacher,
              erase_boxes, window_sizes):
    new_state, metrics = distiller.train_step(state, images, labels, weights, rng,
                                              logit_teacher, feature_teacher, erase_boxes,
                                              window_sizes)
    return new_state, watch.update(health, metrics, new_state.step), metrics

  data, replicated = parallel.data_sharding(mesh), parallel.replicated(mesh)
  logit, feature = placed.teachers["logit"], placed.step_feature_teacher
  return jax.jit(
      step_fn, donate_argnums=(0, 1),
      in_shardings=(placed.state_shardings, replicated, data, data, None, None,
                    logit and placed.shard(logit), feature and placed.shard(feature),
                    data if config.data.uint8_batches else None,
                    data if canvas_size(config) else None),
      out_shardings=(placed.state_shardings, replicated, None))


def train_batches(config, train_source, mesh, start, total_steps, unreadable):
  """Global batches from step `start` on, exactly those an uninterrupted run sees;
  examples that cannot be read go to `unreadable` (`pipeline.UnreadableExamples`)."""
  recipe = augment.TrainAugment(
      size=config.resolution, scale=tuple(config.aug.scale), ratio=tuple(config.aug.ratio),
      hflip=config.aug.hflip,
      auto_augment=None if device_augment_plan(config) else config.aug.auto_augment or None,
      re_prob=config.aug.re_prob, exact_resize=config.aug.exact_resize,
      reduced_dct=config.aug.reduced_dct, canvas=canvas_size(config))
  return parallel.global_batches(pipeline.train_batches(
      train_source, global_batch_size=config.batch_size, seed=config.seed, recipe=recipe,
      start_step=start, num_steps=total_steps - start,
      num_threads=config.data.num_threads or None, uint8=config.data.uint8_batches,
      unreadable=unreadable), mesh)


def train_and_evaluate(config, workdir, accept_changes=False):
  """Trains (or resumes) in `workdir`; returns the final evaluation metrics, or None
  when stopped by SIGTERM after saving; after Ctrl-C (saved likewise) it raises
  KeyboardInterrupt. Faults raise `faults.RunError`, among them a workdir that
  another live run holds (`workdir_lock`); `accept_changes` resumes despite a
  changed config (`--accept_config_changes`)."""
  os.makedirs(workdir, exist_ok=True)
  faults.quiet_write_failure_tracebacks()
  with workdir_lock.WorkdirLock(workdir):
    try:
      return _train_and_evaluate(config, workdir, accept_changes)
    except (OSError, ValueError) as e:  # metrics, TensorBoard, the final models
      kind = faults.write_failure(e)
      if kind is None:
        raise
      raise faults.RunError(
          f"{faults.could_not_write(workdir, kind)}: "
          f"{str(e).splitlines()[0][:200]}. Checkpoints written before are whole: make "
          "room and run the same command to resume (a finished run writes its final "
          "models again)") from e


def _train_and_evaluate(config, workdir, accept_changes):
  mesh = parallel.make_mesh()
  # Everything that can fault comes first, before any compilation.
  check_batch_split(config)
  device_augment_plan(config)  # a bad spec or placement stops here, before any work
  canvas_size(config)
  checkpoints = checkpointing.Checkpoints(workdir, config.keep_checkpoints)
  for change in checkpointing.record_config(workdir, config, checkpoints.any(),
                                            accept_changes):
    print(f"config changed since the run started: {change}", flush=True)
  train_source, eval_source = open_sources(config)
  announce_module_imitation(config)
  teachers = load_teachers(config)
  shared_teacher = teachers["logit"] is not None and teachers["logit"] is teachers["feature"]

  student, deploy = build_student(config)
  check_mi_blocks(config, student, teachers["feature"])
  try:
    steps_per_epoch = pipeline.steps_per_epoch(train_source, config.batch_size,
                                               jax.process_count())
  except ValueError as e:  # fewer images than one global batch
    raise faults.RunError(f"config.data: {e}: lower config.batch_size") from e
  total_steps = config.total_steps or config.epochs * steps_per_epoch
  distiller = make_distiller(config, student, steps_per_epoch, total_steps, shared_teacher)
  with faults.naming_out_of_memory(config, "placing the state and the teachers"):
    placed = place_and_restore(config, mesh, distiller, student, teachers, shared_teacher,
                               checkpoints)
  state, start = placed.state, placed.start
  watch = faults.NonFiniteWatch(WATCHED)
  train_step = jit_train_step(config, mesh, distiller, watch, placed)
  params_finite = jax.jit(faults.all_finite)
  def check_saveable(state, health):  # before any save: the watch, then the params
    watch.check(health, checkpoints.last_saved,
                params_finite=bool(params_finite(state.params)))
  health = jax.device_put(watch.init(), parallel.replicated(mesh))
  eval_fns = eval_functions(config, student, deploy)

  reporter = reporting.Reporter(workdir, total_steps=total_steps, start_step=start,
                                steps_per_epoch=steps_per_epoch,
                                global_batch_size=config.batch_size)
  reporter.config(config.to_dict(), start)
  if start == 0:
    with faults.naming_out_of_memory(config, "evaluating the teachers"):
      evaluate_teachers(placed.teachers, eval_source, config, mesh, reporter)

  unreadable = pipeline.UnreadableExamples(train_source, config.data.max_bad_fraction,
                                           log=reporter.message)
  batches = train_batches(config, train_source, mesh, start, total_steps, unreadable)
  rng = jax.random.key(config.seed)
  eval_every = config.eval_every_epochs * steps_per_epoch
  profiler = reporting.Profiler(workdir, config.profile_steps)
  preemption = checkpointing.Preemption(checkpoints)
  stop = False
  # Closing waits for the saves in flight.
  with preemption.handling_signals(), contextlib.closing(reporter), \
      contextlib.closing(checkpoints), \
      faults.naming_out_of_memory(config, "compiling or running the train step"):
    for step in range(start, total_steps):
      try:
        batch = next(batches)
      except pipeline.TooManyUnreadable as e:
        raise faults.RunError(f"config.data: {e}") from e
      except pipeline.UnreadableData as e:
        raise faults.RunError(f"step {step}: {e}") from e
      weights = loss_weights(config, step / steps_per_epoch)
      args = (batch["image"], batch["label"], weights, rng, placed.teachers["logit"],
              placed.step_feature_teacher, batch.get("erase"), batch.get("size"))
      if step == start:  # ahead of time, to log how long compiling took
        compile_start = time.perf_counter()
        train_step = train_step.lower(state, health, *args).compile()
        reporter.message(f"compiled the train step in "
                         f"{time.perf_counter() - compile_start:.1f} s")
        reporter.restart_clock(start)
      profiler.before_step(step)
      state, health, metrics = train_step(state, health, *args)
      reporter.tick()
      done = step + 1
      if profiler.after_step(step, state):
        reporter.message(f"profile of steps {profiler.first}-{profiler.last - 1} "
                         f"written to {profiler.logdir}")
      if done % config.log_every_steps == 0 or done == total_steps:
        metrics, host_health = jax.device_get((metrics, health))
        watch.check(host_health, checkpoints.last_saved)
        if unreadable.count:  # this host's count since the run (re)started
          metrics = dict(metrics, **{"data/unreadable": unreadable.count})
        reporter.train(done, metrics)
      stop = preemption.reached(done)
      if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
        check_saveable(state, health)
        checkpoints.save(done, state)
      if done % eval_every == 0 and done != total_steps:
        check_saveable(state, health)  # best/ takes this state
        results = evaluate(eval_fns, state, eval_source, config, mesh)
        reporter.evaluation(done, results)
        checkpoints.save_best(done, state, results["student/top1"])
        reporter.restart_clock(done)
      if stop:
        reporter.message(f"{preemption.requested}: saved step {done}, exiting; the same "
                         "command resumes")
        break
    else:
      checkpoints.wait()
      results = evaluate(eval_fns, state, eval_source, config, mesh)
      reporter.evaluation(total_steps, results)
      checkpoints.save_best(total_steps, state, results["student/top1"])
  if preemption.requested == "SIGINT":  # saved (closing waited for the write): stop
    raise KeyboardInterrupt
  if stop:
    return None
  if jax.process_index() == 0:
    save_final_models(workdir, config, state, deploy, train_source.class_names)
  if preemption.requested:  # came after the last step: now that all is written, obey it
    signal.raise_signal(signal.SIGTERM)
  return results
