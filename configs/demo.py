"""The embedded demo (`make demo`, `python -m riformer_jax.demo`): three small runs.

  python train.py --config=configs/demo.py:teacher   --workdir=runs/demo/teacher
  python train.py --config=configs/demo.py:ce        --workdir=runs/demo/ce
  python train.py --config=configs/demo.py:distilled --workdir=runs/demo/distilled \\
      --config.teachers.logit=runs/demo/teacher/student \\
      --config.teachers.feature=runs/demo/teacher/student

ROLE:
  teacher    PoolFormer, cross-entropy
  ce         RIFormer of the same shape, cross-entropy only (the baseline)
  distilled  the same RIFormer trained the paper's way: initialised from the teacher
             (Guideline 5), soft KD without labels (Guideline 1) and module imitation
             (L_in', L_out for the first 2/3 of training, L_rel for the first 1/6,
             Table 10's S12 weights under configs/common.py's reading)

Same recipe as configs/riformer.py:s12, scaled to a 2-core CPU: the 96 px embedded set,
depths (2, 2, 4, 2), no augmentation (flips and rotations change this set's classes,
docs/data.md), batch 64. The teacher plays both roles (logit and feature teacher);
the paper's GFNet-H-B logit teacher has no counterpart trained here.
"""

from configs import common

ROLES = ("teacher", "ce", "distilled")
DEPTHS = (2, 2, 4, 2)


def embedded_recipe(config, epochs=8):
  """Scales a RIFormer-S12 recipe down to the 96 px embedded set on a CPU, in place."""
  config.model.depths = DEPTHS
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
  # The whole 96 px image is the crop: nothing to resize at the native size, and on a
  # CPU the "device" is the same cores, so the step's resize would only add work.
  config.aug.resize_on = "host"
  config.batch_size = 64
  config.epochs = epochs
  config.warmup_epochs = 1
  config.lr = 0.032  # peak 2e-3 at batch 64
  config.distill.mi_blocks = common.last_block_of_each_stage(DEPTHS)
  config.log_every_steps = 26
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 200
  return config


def get_config(role="distilled"):
  if role not in ROLES:
    raise ValueError(f"configs/demo.py: unknown role {role!r}; expected one of {ROLES}")
  config = embedded_recipe(common.riformer_config("s12"))
  config.model_name = "poolformer_s12" if role == "teacher" else "riformer_s12"
  # Module imitation as in Table 10, in proportion: features for 400/600 of the
  # epochs, relations for 100/600.
  for name, paper_epochs in (("mi_in", 400), ("mi_out", 400), ("mi_rel", 100)):
    config.losses[name].end_epoch = config.epochs * paper_epochs / 600
  if role != "distilled":
    config.teachers.init_from_feature = False
    for name in ("soft_kd", "mi_in", "mi_out", "mi_rel"):
      config.losses[name].weight = 0.0
    config.losses.ce.weight = 1.0
  return config
