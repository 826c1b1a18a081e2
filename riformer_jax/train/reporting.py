"""What a user watches during a run: the terminal, metrics.jsonl and TensorBoard.

- The terminal: on a TTY a tqdm bar redrawn in place (step/total, epoch, images/s
  global and per device, step time, loss, learning rate, elapsed, ETA); in a file or
  a log, one such line per log interval. Evaluations print as they come.
- workdir/metrics.jsonl: one JSON line per report (what demo.py and roadmap.py read).
- workdir/tensorboard: the same scalars through `tf.summary` (TensorFlow is pinned for
  the input pipeline already; `tensorboard` is pinned beside it), the config as text
  and hparams, and `jax.profiler` traces (`Profiler`).

Timings come from the log steps, where the host waits for the device anyway to read
the metrics: the time between two of them is the real time of the steps in between,
with no extra sync. Only process 0 writes or prints.
"""

import json
import os
import sys
import time

import jax

from riformer_jax.train import faults

TENSORBOARD = "tensorboard"


def _duration(seconds):
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
      f"{rest // 60:02d}:{rest % 60:02d}"


class Reporter:
  """Writes every report of a run (process 0) and shows its progress."""

  def __init__(self, workdir, *, total_steps, start_step, steps_per_epoch,
               global_batch_size, stream=None):
    self.enabled = jax.process_index() == 0
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.batch_size, self.devices = global_batch_size, jax.device_count()
    self.stream = stream or sys.stdout
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.started = time.monotonic()
    self._mark = (start_step, self.started)  # the last synced step and its time
    self._bar = self._summary = None
    if not self.enabled:
      return
    import tensorflow as tf  # noqa: PLC0415 (train.py's input pipeline imports it too)
    self._tf = tf
    self._summary = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD))
    if self.stream.isatty():
      import tqdm  # noqa: PLC0415
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=self.stream,
                            dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}")

  def config(self, config_dict, step):
    """The run's config as text (TensorBoard's Text tab) and hparams (HParams tab),
    at each start."""
    if not self.enabled:
      return
    from tensorboard.plugins.hparams import api as hparams  # noqa: PLC0415
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in faults.flatten(config_dict).items()}
    with self._summary.as_default(step=step):
      self._tf.summary.text("config", f"```\n{text}\n```")
      hparams.hparams(flat)
    self._summary.flush()

  def tick(self):
    """One step dispatched: moves the bar (no device sync)."""
    if self._bar is not None:
      self._bar.update(1)

  def restart_clock(self, step):
    """Throughput restarts from here (after an evaluation, a profile, a compile)."""
    self._mark = (step, time.monotonic())

  def train(self, step, metrics):
    """Metrics of update `step`, fetched at a log step: written with the throughput
    of the steps since the last report."""
    now = time.monotonic()
    last_step, last_time = self._mark
    self._mark = (step, now)
    metrics = {"epoch": step / self.steps_per_epoch,
               **{k: float(v) for k, v in metrics.items()}}
    if step > last_step:
      step_time = (now - last_time) / (step - last_step)
      metrics.update({"perf/step_time_s": step_time,
                      "perf/images_per_s": self.batch_size / step_time,
                      "perf/images_per_s_per_device": self.batch_size / step_time
                                                       / self.devices})
    self._write(step, metrics)
    if not self.enabled:
      return
    status = self._status(step, metrics, now)
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(status, refresh=True)
    else:
      print(f"step {step}/{self.total_steps} {status}", file=self.stream, flush=True)

  def evaluation(self, step, results):
    self._write(step, results)
    if self.enabled:
      shown = ", ".join(f"{k}={float(v):.2f}" for k, v in results.items())
      self._print(f"step {step}: {shown}")

  def message(self, text):
    if self.enabled:
      self._print(text)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._summary is not None:
      self._summary.close()

  def _status(self, step, metrics, now):
    parts = [f"epoch {metrics['epoch']:.2f}"]
    if "perf/step_time_s" in metrics:
      parts += [f"{metrics['perf/images_per_s']:.0f} img/s "
                f"({metrics['perf/images_per_s_per_device']:.0f}/device)",
                f"{metrics['perf/step_time_s'] * 1e3:.0f} ms/step"]
    parts += [f"loss {metrics.get('loss/total', float('nan')):.4g}",
              f"lr {metrics.get('learning_rate', float('nan')):.3g}",
              f"elapsed {_duration(now - self.started)}"]
    if "perf/step_time_s" in metrics:
      parts.append(f"ETA {_duration((self.total_steps - step) * metrics['perf/step_time_s'])}")
    return ", ".join(parts)

  def _write(self, step, metrics):
    if not self.enabled:
      return
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    with self._summary.as_default(step=step):
      for name, value in metrics.items():
        self._tf.summary.scalar(name, value)
    self._summary.flush()

  def _print(self, text):
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)


class Profiler:
  """A `jax.profiler` trace of steps [first, first + count) into workdir/tensorboard
  (TensorBoard's profile plugin or XProf read it); count 0 is off."""

  def __init__(self, workdir, profile_steps):
    first, count = (tuple(profile_steps) + (0, 0))[:2]
    self.first, self.last = int(first), int(first) + int(count)
    self.logdir = os.path.join(workdir, TENSORBOARD)
    self.active = False

  def before_step(self, step):
    if self.last > self.first and step == self.first and jax.process_index() == 0:
      # Without Python tracing: enabling it walks every Python thread's state while
      # orbax's and tf.data's threads come and go, and a thread ending mid-walk
      # crashes the process (a segfault in PyEval_SetProfile, about 1 start in 20
      # here; CPython's gh-137400 is the same race). The steps' XLA events remain.
      options = jax.profiler.ProfileOptions()
      options.python_tracer_level = 0
      jax.profiler.start_trace(self.logdir, profiler_options=options)
      self.active = True

  def after_step(self, step, state):
    """True when a trace was just written (the steps' timing includes its cost)."""
    if self.active and step + 1 >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      return True
    return False
