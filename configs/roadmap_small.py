"""The roadmap rows of configs/roadmap.py at the demo's scale, on the embedded set.

  python train.py --config=configs/roadmap_small.py:ROW --workdir=runs/roadmap/ROW \\
      --config.teachers.logit=runs/demo/teacher/student \\
      --config.teachers.feature=runs/demo/teacher/student

ROW as in configs/roadmap.py (pool_ce, identity_soft, affine_label_hard,
mi_f80_r20_l4_init, ...): the same losses, with the model, data and schedule of
configs/demo.py, for 4 epochs. Epoch windows are the paper's fractions of its 120 epochs
(mi_f80_r20: feature terms for 80/120 of training, relations for 20/120). Six
module-imitation layers are the stage outputs plus the two other blocks of the
third stage. Module imitation keeps Table 10's S12 values under the configs'
reading (config.distill.mi_reading; docs/roadmap.md). The logit and the feature
teacher are the demo's PoolFormer.

Tables 8 and 9 at this scale, with the demo's shape for S12 (depths 2-2-4-2, widths
16-32-48-64) and the papers' changes made in proportion:
  t8_s9_soft     depths 2-2-2-2: half the third stage, as S9 halves S12's
  t8_xs12_soft   widths 13-27-40-53: 5/6 of the demo's
  t9_l12_*       riformerv2 at the demo's shape
  t9_l18_*       riformerv2 at depths 3-3-6-3: 1.5x each stage, as 18 layers is 12's
Table 9's feature teachers train first, as the demo trains its PoolFormer (cross-
entropy, 8 epochs), at their student's shape:
  python train.py --config=configs/roadmap_small.py:teacher_randformer_s12 \
      --workdir=runs/roadmap/teacher_randformer_s12
(teacher_poolformerv2_s12, teacher_convformer_s18, teacher_caformer_s18 alike).
"""

from configs import common, demo, roadmap

EPOCHS = 4  # half the demo's: 42 runs in under an hour on 2 cores
LAYERS = {
    4: tuple(f"stages_{i}/blocks_{d - 1}" for i, d in enumerate(demo.DEPTHS)),
    6: ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_1", "stages_2/blocks_2",
        "stages_2/blocks_3", "stages_3/blocks_1"),
}


# The demo's depths for a paper model's 12 or 18 layers.
DEPTHS = {"s12": demo.DEPTHS, "s18": (3, 3, 6, 3)}
TEACHER_PREFIX = "teacher_"


def get_config(row):
  if row.startswith(TEACHER_PREFIX):
    return teacher_config(row[len(TEACHER_PREFIX):])
  config = roadmap.get_config(row)
  layers = len(config.distill.mi_blocks)
  paper_epochs = config.epochs
  demo.embedded_recipe(config, epochs=EPOCHS)
  for term in config.losses.values():
    if term.end_epoch > 0:
      term.end_epoch = term.end_epoch * config.epochs / paper_epochs
  config.distill.mi_blocks = LAYERS[layers]
  if row in roadmap.TABLE9:
    config.model.depths = DEPTHS[config.model_name.split("_")[1]]
  elif row == "t8_s9_soft":
    config.model.depths = (2, 2, 2, 2)
  elif row == "t8_xs12_soft":
    config.model.dims = (13, 27, 40, 53)
  if row in roadmap.TABLE9 or row in roadmap.TABLE8:
    config.distill.mi_blocks = common.last_block_of_each_stage(config.model.depths)
  return config


def teacher_config(model_name):
  """Table 9's feature teacher `model_name` (randformer_s12, poolformerv2_s12,
  convformer_s18, caformer_s18) trained as the demo trains its PoolFormer."""
  teachers = {teacher for _, teacher in roadmap.TABLE9.values() if teacher}
  if model_name not in teachers:
    raise ValueError(f"configs/roadmap_small.py: no teacher row for {model_name!r}; "
                     f"expected teacher_ and one of {sorted(teachers)}")
  config = demo.get_config("teacher")
  config.model_name = model_name
  config.model.depths = DEPTHS[model_name.split("_")[1]]
  if model_name.startswith("randformer"):
    config.model.img_size = config.resolution  # its random matrices fix the input size
  return config
