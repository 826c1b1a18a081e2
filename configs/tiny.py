"""A tiny RIFormer on the embedded data set: smoke tests and first runs on a CPU.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python train.py --config=configs/tiny.py:with_teacher --workdir=/tmp/tiny_kd \\
      --config.teachers.feature=DIR   # a PoolFormer of the same tiny shape

Same recipe structure as configs/s12.py, scaled down: the embedded set's 96x96 images,
depths (1, 1, 2, 1), and no augmentation: its class is the orientation of a pair of
blobs (docs/data.md), which flips, aspect-changing crops and rotations would change.
"""

from configs import common


def get_config(arg=None):
  config = common.riformer_config("s12")
  config.model.depths = (1, 1, 2, 1)
  config.model.dims = (16, 32, 48, 64)
  config.model.num_classes = 10
  config.model.drop_path_rate = 0.0
  config.compute_dtype = "float32"
  config.teachers.compute_dtype = "float32"
  config.resolution = 96
  config.data.dataset = "synthetic"
  config.data.eval_split = "test"
  config.data.crop_pct = 0.0
  config.aug.auto_augment = ""
  config.aug.re_prob = 0.0
  config.aug.hflip = 0.0
  config.aug.scale = (1.0, 1.0)
  config.aug.ratio = (1.0, 1.0)
  config.aug.mixup = 0.0
  config.aug.cutmix = 0.0
  config.batch_size = 64
  config.epochs = 2
  config.warmup_epochs = 1
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
