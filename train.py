"""Trains a RIFormer the paper's way: one jitted, sharded step per global batch.

  python train.py --config=configs/riformer.py:s12 --workdir=runs/s12 \\
      --config.data.data_dir=$TFDS_DATA \\
      --config.teachers.logit=ckpt/gfnet_h_b --config.teachers.feature=ckpt/poolformer_s12

Restarting with the same workdir resumes from the newest checkpoint that restores,
after checking the config against workdir/config.json; SIGTERM saves one and exits; a
non-finite loss or gradient stops the run before anything non-finite is saved.
Multi-host: start one process per host with the same flags plus --distributed (Cloud
TPU, SLURM, Open MPI detect the rest), or elsewhere --coordinator_address=HOST:PORT
--num_processes=N --process_id=I.
What it writes: riformer_jax/train/trainer.py, the library this command line drives.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from riformer_jax.train import faults

config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the final models.")
flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize() with "
                  "the cluster's auto-detection (Cloud TPU, SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes, multi-host.")
flags.DEFINE_integer("process_id", None, "This process, multi-host.")
flags.DEFINE_bool("accept_config_changes", False, "Resume even though the config "
                  "differs from workdir/config.json in fields that change the run "
                  "(e.g. a lower lr after a divergence); the new config is recorded.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl's flag parsing, with every error in the config file or an override on one
  line (ml_collections' own messages carry the config file's traceback as text)."""
  try:
    rest = FLAGS(argv)
    flag = FLAGS["config"]
    defaults = flag.parser.parse(flag.config_filename)
    defaults.to_dict()  # a config file that failed to load raises on first use
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown config field
    sys.exit(f"train.py: {faults.unknown_field_message(e, argv)}")
  except (flags.Error, OSError, SyntaxError, ValueError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not isinstance(e, flags.Error) or "Traceback (most recent call last):" in lines:
      config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
      cause = lines[-1] if ":" in lines[-1] else f"{type(e).__name__}: {lines[-1]}"
      lines = [f"--config={config}: cannot load it ({cause})"]
    sys.exit(f"train.py: {' '.join(lines)}")
  try:
    faults.check_override_types(defaults, config_flags.get_override_values(flag))
  except faults.RunError as e:
    sys.exit(f"train.py: {e}")
  return rest


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
  if FLAGS.config.compilation_cache_dir:  # a restarted run reuses its programs
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(FLAGS.config.compilation_cache_dir))
  # Imported once the flags have parsed: a mistyped override is reported in a second,
  # before TensorFlow and the models load.
  from riformer_jax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.accept_config_changes)
  except faults.RunError as e:
    sys.exit(f"train.py: {e}")
  except KeyboardInterrupt:  # Ctrl-C: during the loop the state was saved first
    faults.exit_interrupted("train.py", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
