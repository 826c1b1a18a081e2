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
"""

from configs import demo, roadmap

PAPER_EPOCHS = 120
EPOCHS = 4  # half the demo's: 42 runs in under an hour on 2 cores
LAYERS = {
    4: tuple(f"stages_{i}/blocks_{d - 1}" for i, d in enumerate(demo.DEPTHS)),
    6: ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_1", "stages_2/blocks_2",
        "stages_2/blocks_3", "stages_3/blocks_1"),
}


def get_config(row):
  config = roadmap.get_config(row)
  layers = len(config.distill.mi_blocks)
  demo.embedded_recipe(config, epochs=EPOCHS)
  for term in config.losses.values():
    if term.end_epoch > 0:
      term.end_epoch = term.end_epoch * config.epochs / PAPER_EPOCHS
  config.distill.mi_blocks = LAYERS[layers]
  return config
