"""What stops a run, and how it is said: non-finite training, a changed config, a bad
override. Each fault is a `RunError` whose message names the cause; train.py prints it
on one line (or a short list) and exits non-zero, without a traceback.

The non-finite watch lives on the device: the jitted step folds each update's
finiteness into a small carried record (the first bad step and which terms were
bad), and the host reads it only where it already waits for the device (log steps)
and before every checkpoint. No step pays for a host sync to learn about a NaN.
"""

import contextlib
import errno
import logging
import os
import re
import shutil
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


class RunError(Exception):
  """A run that cannot go on; the message says why and what to do."""


def exit_interrupted(program, workdir):
  """What a command does with Ctrl-C (KeyboardInterrupt): one line, exit status 130.
  Inside the training loop the trainer saved the state first."""
  print(f"{program}: interrupted (Ctrl-C); {workdir} keeps every checkpoint and "
        "finished run written so far, and the same command resumes", file=sys.stderr)
  sys.exit(128 + 2)  # 128 + SIGINT, as shells report it


# --- a full disk -----------------------------------------------------------------

_WRITE_FAILURES = {errno.ENOSPC: "no space left on device",
                   errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                   errno.EROFS: "read-only filesystem"}


def write_failure(error):
  """What kind of write failure `error` is ('no space left on device', ...), or None.
  Orbax reports TensorStore's as a ValueError whose text carries the errno."""
  if isinstance(error, OSError) and error.errno in _WRITE_FAILURES:
    return _WRITE_FAILURES[error.errno]
  match = re.search(r"os_error_code='(\d+)'", str(error))
  if match and int(match.group(1)) in _WRITE_FAILURES:
    return _WRITE_FAILURES[int(match.group(1))]
  return None


def quiet_write_failure_tracebacks():
  """Orbax logs each failed background write with a traceback (absl, ERROR) before the
  failure reaches the run, which then stops with one message naming the directory
  (checkpointing.Checkpoints): keep orbax's one-line records, drop those tracebacks."""
  absl_logger = logging.getLogger("absl")
  if any(getattr(f, "drops_write_tracebacks", False) for f in absl_logger.filters):
    return

  def drop_traceback(record):
    if record.exc_info and write_failure(record.exc_info[1]):
      record.exc_info, record.exc_text = None, None
    return True
  drop_traceback.drops_write_tracebacks = True
  absl_logger.addFilter(drop_traceback)


def could_not_write(directory, kind, what=""):
  """The first words of every write-failure stop: where, why and the room left."""
  return f"could not write {what}under {directory} ({kind}; {free_space(directory)})"


def free_space(path):
  """'1.2 GiB free' on the filesystem holding `path` (or its nearest parent)."""
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    free = shutil.disk_usage(path or ".").free
  except OSError:
    return "free space unknown"
  return f"{free / 2**30:.2f} GiB free" if free >= 2**27 else f"{free / 2**20:.1f} MiB free"


# --- out of memory ----------------------------------------------------------------

@contextlib.contextmanager
def naming_out_of_memory(config, where):
  """XLA's RESOURCE_EXHAUSTED (at compile time or in a step) as a `RunError` that names
  what took the memory and the fields that give some back; other errors pass."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise RunError(out_of_memory_message(config, where, e)) from e


def out_of_memory_message(config, where, error):
  devices = jax.device_count()
  per_device = config.batch_size // max(devices, 1) // max(config.accum_steps, 1)
  detail = str(error).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0][:200]
  detail = detail.rstrip(".")
  # Only what this config has not already done.
  helps = [f"config.accum_steps={2 * config.accum_steps} (the same update in smaller "
           "micro-batches)"]
  if not config.remat:
    helps.append("config.remat=True (recompute each block in the backward pass)")
  if not config.fsdp:
    helps.append("config.fsdp=True (shard params, optimizer state and teachers)")
  if config.compute_dtype != "bfloat16":
    helps.append("config.compute_dtype='bfloat16'")
  return (f"out of device memory {where}: {config.model_name} at {config.resolution} px, "
          f"{per_device} images per device per micro-batch (config.batch_size="
          f"{config.batch_size} over {devices} device(s), config.accum_steps="
          f"{config.accum_steps}); XLA: {detail}. What gives memory back: "
          f"{', '.join(helps)}, or a smaller config.batch_size")


# --- non-finite values ------------------------------------------------------------

@flax.struct.dataclass
class Health:
  """The first update whose watched metrics were non-finite (-1: none yet) and, for
  that update, which of them were."""

  first_bad_step: jax.Array
  bad: jax.Array  # bool, one per watched name


@flax.struct.dataclass
class NonFiniteWatch:
  """Watches `names` (e.g. every loss term and the gradient norm) of each update."""

  names: tuple = flax.struct.field(pytree_node=False)

  def init(self):
    return Health(first_bad_step=jnp.int32(-1), bad=jnp.zeros(len(self.names), bool))

  def update(self, health, metrics, step):
    """Traced: `health` after update number `step` produced `metrics`."""
    bad = jnp.stack([~jnp.all(jnp.isfinite(metrics[name])) for name in self.names])
    first = (health.first_bad_step < 0) & jnp.any(bad)
    return Health(first_bad_step=jnp.where(first, step, health.first_bad_step),
                  bad=jnp.where(first, bad, health.bad))

  def check(self, health, last_saved=None, params_finite=True):
    """Host side: raises `RunError` if any update so far was non-finite, or if the
    parameters about to be saved are not all finite. `last_saved`: the newest
    checkpoint's step, for the message."""
    health = jax.device_get(health)
    kept = (f"checkpoints up to step {last_saved} are kept" if last_saved
            else "no checkpoint was written")
    advice = ("Lower config.lr or set config.clip_grad_norm, then resume with "
              "--accept_config_changes or start a new workdir.")
    step = int(health.first_bad_step)
    if step >= 0:
      terms = [name for name, bad in zip(self.names, np.asarray(health.bad)) if bad]
      raise RunError(f"non-finite {', '.join(terms)} at step {step}: the run is "
                     f"stopped, nothing from that step on is saved, the {kept}. {advice}")
    if not params_finite:
      raise RunError("non-finite parameters although the losses and gradients were "
                     f"finite (the update overflowed): the run is stopped, the {kept}. "
                     f"{advice}")


def all_finite(tree):
  """Traced: whether every leaf of `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def quiet_abandoned_reads():
  """Call before an orbax restore that may fail: a failed one leaves tensorstore
  reads in flight (some finish before the error reaches our handler); each
  later tries to post to the restore's closed event loop (Python prints a traceback
  per array, hundreds, through `sys.unraisablehook`) or is collected with its error
  unread (asyncio logs "... exception was never retrieved" with a traceback). Both
  are harmless once the restore has failed: drop exactly them, pass anything else on."""
  previous = sys.unraisablehook
  if getattr(previous, "quiets_abandoned_reads", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(lambda record: not record.getMessage().startswith(
      ("Future exception was never retrieved", "Task exception was never retrieved")))


# --- a changed config on resume ---------------------------------------------------

# Fields that change what a run reports or how often it saves, not what it computes:
# a resumed run may change them.
HARMLESS = frozenset({
    "log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "profile_steps", "compilation_cache_dir", "data.data_dir",
    "data.num_threads", "data.max_bad_fraction"})


def flatten(tree):
  """`{"a.b": leaf}` of nested dicts; lists become tuples (JSON keeps no tuples)."""
  return {key: _freeze(value)
          for key, value in traverse_util.flatten_dict(tree, sep=".").items()}


def _freeze(value):
  return tuple(map(_freeze, value)) if isinstance(value, (list, tuple)) else value


def compare_configs(recorded, current):
  """(refused, accepted) differences between two config dicts, each a list of
  "field: old -> new" lines. A field only one side has counts as changed."""
  old, new = flatten(recorded), flatten(current)
  refused, accepted = [], []
  for field in sorted(old.keys() | new.keys()):
    before, after = old.get(field, "(absent)"), new.get(field, "(absent)")
    if before != after:
      line = f"{field}: {before!r} -> {after!r}"
      (accepted if field in HARMLESS else refused).append(line)
  return refused, accepted


# --- command-line overrides -------------------------------------------------------

def unknown_field_message(error, argv):
  """One line for ml_collections' error on an override of a field that does not
  exist (an AttributeError wrapping a KeyError whose text holds its suggestion)."""
  cause = error.args[0] if error.args else error
  text = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
  name, _, hint = str(text).partition("\n")
  name = name.strip("'\"")
  flags = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
  flag = next((f for f in flags if f.rsplit(".", 1)[-1] == name), f"--config...{name}")
  match = re.search(r'Did you mean "([^"]+)"', hint)
  suggestion = f"; did you mean {flag.rsplit('.', 1)[0]}.{match.group(1)}?" if match else ""
  return f"{flag}: no such config field{suggestion}"


def check_override_types(defaults, overrides):
  """ml_collections checks the type of scalar overrides but not the elements of a
  tuple: `--config.model.dims=abc` would give ("abc",). Raises `RunError` naming the
  field when an overridden tuple's elements are not of the default's kind."""
  flat_defaults = flatten(defaults.to_dict())
  for field, value in overrides.items():
    default = flat_defaults.get(field)
    if not isinstance(default, tuple) or not default:
      continue
    kinds = {type(x) for x in default}
    allowed = (int, float) if kinds <= {int, float} else tuple(kinds)
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not all(isinstance(x, allowed) and not isinstance(x, bool) for x in items):
      names = "/".join(sorted(k.__name__ for k in kinds))
      raise RunError(f"--config.{field}={value!r}: expected a tuple of {names} like "
                     f"{default!r}")
