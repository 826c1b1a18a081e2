"""Train once, reuse afterwards: what demo.py and roadmap.py do with each of their runs.

A finished run leaves WORKDIR/final.json (its final metrics and the seconds it took);
asking for the same run again returns that file's contents without training.
"""

import json
import os
import time

from riformer_jax.train import faults, trainer

FINAL = "final.json"


def train_or_reuse(config, workdir, log=print):
  """The final metrics of the run of `config` in `workdir` (with "seconds"), training
  it (or resuming it) unless it has finished before. A fault or a SIGTERM raises
  `faults.RunError` with a message that names the workdir."""
  path = os.path.join(workdir, FINAL)
  if os.path.isfile(path):
    log(f"      already trained: reusing {workdir} (delete it to train again)")
    with open(path) as f:
      return json.load(f)
  start = time.time()
  try:
    final = trainer.train_and_evaluate(config, workdir)
  except faults.RunError as e:
    raise faults.RunError(f"{workdir}: {e}") from e
  if final is None:  # SIGTERM: the trainer saved a checkpoint
    raise faults.RunError(f"interrupted: {workdir} saved; the same command resumes it")
  final = dict(final, seconds=time.time() - start)
  with open(path + ".tmp", "w") as f:
    json.dump(final, f)
  os.replace(path + ".tmp", path)
  log(f"      {final['seconds']:.0f} s")
  return final
