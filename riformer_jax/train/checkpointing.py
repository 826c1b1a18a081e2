"""Checkpoint policy of a training run: what a workdir holds and how a run comes back.

    workdir/config.json         the resolved config of the run's first start
    workdir/checkpoints/STEP    the last `keep` train states (orbax)
    workdir/best/STEP           the state with the best top-1 so far
    workdir/corrupt_checkpoints/STEP   checkpoints that no longer restore, set aside

A resumed run restores the newest checkpoint that restores; one that does not (a
corrupt or partial write) is moved aside with a warning, never deleted. Before
anything is compiled, a resumed run compares its config with the recorded one and
refuses differences that change the state or the run's meaning (`faults.HARMLESS`
lists what may change). Saves are refused once the non-finite watch has fired.

Preemption: one process catches SIGTERM itself; with several, orbax's preemption
support (`CheckpointManager.reached_preemption`, JAX's preemption sync manager) lets
every host agree on the step to save at without a collective on every step. Ctrl-C
(SIGINT) in one process is a SIGTERM the user sent: the step finishes, the state is
saved, the run exits; a second Ctrl-C exits at once (orbax writes each checkpoint to
a temporary directory and renames it when complete, so the newest one on disk is
whole either way).
"""

import contextlib
import json
import os
import shutil
import signal
import sys

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from riformer_jax.train import faults

CONFIG = "config.json"


def record_config(workdir, config, resuming, accept_changes=False):
  """Writes `workdir/config.json` at a run's first start. When `resuming`, compares
  `config` with the recorded one first: returns the harmless changes (to be logged)
  and raises `faults.RunError` naming every other changed field with its old and new
  value, unless `accept_changes` (then the new config is recorded)."""
  path = os.path.join(workdir, CONFIG)
  current = json.loads(config.to_json())
  changes = []
  if resuming and os.path.isfile(path):
    try:
      with open(path) as f:
        recorded = json.load(f)
    except (OSError, ValueError) as e:
      raise faults.RunError(f"{path}: not a readable config ({e}); it records how the "
                            "checkpoints were made, so restore it or start a new "
                            "workdir") from e
    refused, changes = faults.compare_configs(recorded, current)
    if refused and not accept_changes:
      raise faults.RunError(
          f"{workdir} was started with another config; resuming it with this one "
          "would change the run. Restore these fields, use a new workdir, or pass "
          "--accept_config_changes:\n  " + "\n  ".join(refused))
    changes = [f"{line} (accepted by --accept_config_changes)" for line in refused] + \
        changes
    if not refused:
      return changes
  if jax.process_index() == 0:  # written whole or not at all
    with open(path + ".tmp", "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  return changes


class Checkpoints:
  """The run's checkpoints and best-model directories under `workdir`."""

  def __init__(self, workdir, keep):
    self.workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep))
    self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["top1"]))
    self.last_saved = None  # the newest step restored or saved by this run

  def any(self):
    return bool(self.latest.all_steps())

  def restore(self, abstract_state):
    """(state, step) from the newest checkpoint that restores into `abstract_state`
    (shapes, dtypes and shardings), or (None, 0) in a new workdir. Newer checkpoints
    that fail are moved to corrupt_checkpoints/ with a warning naming the reason."""
    failed, steps = [], sorted(self.latest.all_steps(), reverse=True)
    if steps:
      faults.quiet_abandoned_reads()
    for step in steps:
      try:
        state = self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # orbax raises many kinds for a damaged directory
        failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        continue
      self._set_aside(failed)
      self.last_saved = step
      return state, step
    if failed:
      raise faults.RunError(
          f"no checkpoint in {self.workdir}/checkpoints restores: "
          + "; ".join(f"step {step} ({reason})" for step, reason in failed)
          + ". Move the directory away to start over.")
    return None, 0

  def _set_aside(self, failed):
    aside = os.path.join(self.workdir, "corrupt_checkpoints")
    for step, reason in failed:
      print(f"WARNING: checkpoint step {step} does not restore ({reason}); resuming "
            f"from an earlier one, the broken one is kept in {aside}/{step}", flush=True)
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        shutil.rmtree(target, ignore_errors=True)  # an older set-aside of this step
        os.replace(os.path.join(self.workdir, "checkpoints", str(step)), target)
    if failed:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoints set aside")
      self.latest.reload()

  @contextlib.contextmanager
  def _writing(self):
    """A failed write (this one, or an earlier asynchronous one surfacing now) as a
    `RunError` naming the directory and its free space: orbax writes each checkpoint
    to a temporary directory first, so every earlier one is whole."""
    try:
      yield
    except Exception as e:  # orbax surfaces TensorStore's errors as ValueError
      kind = faults.write_failure(e)
      if kind is None:
        raise
      whole = self.latest.all_steps()
      raise faults.RunError(
          faults.could_not_write(self.workdir, kind, "a checkpoint ") + ". "
          + (f"The newest whole checkpoint is step {max(whole)}: " if whole else
             "No checkpoint was written yet: ")
          + "make room (or fix the permissions) and run the same command to resume"
      ) from e

  def save(self, step, state):
    with self._writing():
      self.latest.save(step, args=ocp.args.StandardSave(state))
    self.last_saved = step

  def save_best(self, step, state, top1):
    """Keeps `state` in best/ if its top-1 is among the best; a step saved before an
    interruption is not saved twice (orbax refuses)."""
    if step not in self.best.all_steps():
      with self._writing():
        self.best.save(step, args=ocp.args.StandardSave(state), metrics={"top1": top1})

  def wait(self):
    with self._writing():
      self.latest.wait_until_finished()
      self.best.wait_until_finished()

  def close(self):
    """Waits for the saves in flight (also when the run stops on an error)."""
    with self._writing():
      self.latest.close()
      self.best.close()


class Preemption:
  """Whether the run should save and stop now, and which signal asked (`requested`:
  "SIGTERM", "SIGINT" or None).

  A single process catches SIGTERM and SIGINT itself (the handler only sets a flag;
  the loop saves at the end of the step; a second SIGINT exits at once). With
  several processes JAX's preemption service owns SIGTERM: it spreads the notice to
  every host in the background and names one step at which all of them save
  (`reached_preemption`), so no step waits on the others just to ask; Ctrl-C keeps
  Python's default there (a flag in one process would stop it alone).
  """

  def __init__(self, checkpoints):
    self.checkpoints = checkpoints
    self.requested = None

  def _on_signal(self, number, _):
    name = signal.Signals(number).name
    if name == "SIGINT" and self.requested == "SIGINT":
      print("\nCtrl-C again: exiting now, without saving (the newest checkpoint on "
            "disk is whole; the same command resumes from it)", file=sys.stderr,
            flush=True)
      os._exit(128 + signal.SIGINT)  # at once: no cleanup that could wait on a save
    if name == "SIGINT":
      print("\nCtrl-C: finishing this step, saving and exiting (Ctrl-C again: exit "
            "now, without saving)", file=sys.stderr, flush=True)
    self.requested = self.requested or name

  @contextlib.contextmanager
  def handling_signals(self):
    if jax.process_count() > 1:
      yield self
      return
    previous = {number: signal.signal(number, self._on_signal)
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:  # the next run in this process (demo.py, roadmap.py) installs its own
      for number, handler in previous.items():
        signal.signal(number, handler)

  def reached(self, step):
    if jax.process_count() > 1:
      if self.checkpoints.latest.reached_preemption(step):
        self.requested = "SIGTERM"
      return bool(self.requested)
    return bool(self.requested)
