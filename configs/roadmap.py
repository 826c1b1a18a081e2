"""The paper's roadmap (Tables 1-4 and Guideline 5): RIFormer-S12 rows at 120 epochs.

  python train.py --config=configs/roadmap.py:ROW --workdir=runs/ROW \\
      --config.teachers.logit=ckpt/gfnet_h_b --config.teachers.feature=ckpt/poolformer_s12

ROW (paper's accuracy in brackets):
  Table 1  pool_ce (75.01), identity_ce (72.31)
  Table 2  identity_label_hard (73.51), identity_hard, identity_label_soft,
           identity_soft (74.05)                     -- GFNet-H-B logit teacher
  Table 3  affine_ce (72.25), affine_label_hard (73.44), affine_hard (72.77),
           affine_label_soft (72.10), affine_soft (74.07)
  Table 4  mi_f{FEAT}_r{REL}_l{LAYERS}: module imitation with (L_in', L_out) for FEAT
           epochs, L_rel for REL epochs, on LAYERS blocks (4 or 6), on top of
           affine_soft; e.g. mi_f80_r20_l4 (75.13), mi_f80_r10_l6 (75.08)
  Guideline 5  mi_f80_r20_l4_init (75.36): the same, student initialised from the
           feature teacher (all but the affine mixers)
Table 5 (other teachers) is any row with another --config.teachers.logit.
"Label" rows use DeiT's weighting: 0.5 cross-entropy + 0.5 distillation.
"""

import re

from configs import common

# Which blocks module imitation uses (the paper gives only the count): the stage
# outputs, plus two evenly spread blocks of the deep third stage for six.
LAYERS = {
    4: ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_5", "stages_3/blocks_1"),
    6: ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_1", "stages_2/blocks_3",
        "stages_2/blocks_5", "stages_3/blocks_1"),
}
_KD = {"ce": (1.0, 0.0, 0.0), "label_hard": (0.5, 0.5, 0.0), "hard": (0.0, 1.0, 0.0),
       "label_soft": (0.5, 0.0, 0.5), "soft": (0.0, 0.0, 1.0)}


def get_config(row):
  config = common.riformer_config("s12")
  config.epochs = 120
  config.teachers.init_from_feature = False
  for name in ("mi_in", "mi_out", "mi_rel"):
    config.losses[name].weight = 0.0

  mixer_row = re.fullmatch(r"(pool|identity|affine)_(ce|label_hard|hard|label_soft|soft)",
                           row)
  mi_row = re.fullmatch(r"mi_f(\d+)_r(\d+)_l([46])(_init)?", row)
  if mixer_row:
    mixer, kd = mixer_row.groups()
    if mixer == "pool" and kd != "ce":
      raise ValueError(f"roadmap row {row!r}: Table 1 has PoolFormer with CE only")
    config.model_name = {"pool": "poolformer_s12", "identity": "identityformer_s12",
                         "affine": "riformer_s12"}[mixer]
  elif mi_row:
    feat, rel, layers, init = mi_row.groups()
    kd = "soft"
    lambdas = common.riformer_config("s12").losses
    for name, epochs in (("mi_in", feat), ("mi_out", feat), ("mi_rel", rel)):
      config.losses[name] = common.term(lambdas[name].weight, end_epoch=int(epochs))
    config.distill.mi_blocks = LAYERS[int(layers)]
    config.teachers.init_from_feature = bool(init)
  else:
    raise ValueError(f"unknown roadmap row {row!r}; see configs/roadmap.py")
  ce, hard, soft = _KD[kd]
  config.losses.ce.weight, config.losses.hard_kd.weight = ce, hard
  config.losses.soft_kd.weight = soft
  return config
