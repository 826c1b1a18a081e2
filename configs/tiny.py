"""A tiny RIFormer on the embedded data set: smoke tests and first runs on a CPU.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python train.py --config=configs/tiny.py:with_teacher --workdir=/tmp/tiny_kd \\
      --config.teachers.feature=DIR   # a PoolFormer of the same tiny shape

Same recipe structure as configs/riformer.py:s12, scaled down like configs/demo.py (the
embedded set's 96x96 images, no augmentation: flips, aspect-changing crops and
rotations would change its classes, docs/data.md), with depths (1, 1, 2, 1).
"""

from configs import common, demo


def get_config(arg=None):
  if arg not in (None, "with_teacher"):
    raise ValueError(f"configs/tiny.py: unknown argument {arg!r}; expected none or "
                     "'with_teacher'")
  config = demo.embedded_recipe(common.riformer_config("s12"), epochs=2)
  config.model.depths = (1, 1, 2, 1)
  config.lr = 4e-3
  config.distill.mi_blocks = common.last_block_of_each_stage(config.model.depths)
  if arg != "with_teacher":  # plain cross-entropy
    config.teachers.init_from_feature = False
    for name in ("soft_kd", "mi_in", "mi_out", "mi_rel"):
      config.losses[name].weight = 0.0
    config.losses.ce.weight = 1.0
  config.log_every_steps = 10
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 50
  return config
