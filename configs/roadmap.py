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

Table 8 (slimmed PoolFormers, soft KD as Table 3's affine_soft, 120 epochs) beside
pool_ce and mi_f80_r20_l4_init:
  t8_s9_soft (74.78), t8_xs12_soft (75.11)           -- poolformer_s9, poolformer_xs12
Table 9 (the MetaFormer-baselines student riformerv2, 130 epochs; appendix D):
  t9_l12_none (72.75), t9_l12_randformer (75.62), t9_l12_poolformerv2 (75.87),
  t9_l18_none (75.01), t9_l18_convformer (77.53), t9_l18_caformer (77.26)
  "none" is cross-entropy alone (no teacher); the other rows are soft KD from the
  logit teacher (GFNet-H-B) plus module imitation from --config.teachers.feature, a
  converted checkpoint of the named teacher (RandFormer-S12, PoolFormerV2-S12,
  ConvFormer-S18, CAFormer-S18), with Table 4's windows (80 and 20 of 120 epochs, in
  proportion) on the stage outputs and no teacher initialisation: the appendix names
  the teachers and nothing else.
"""

import re

from configs import common
from riformer_jax.models import registry

# Which blocks module imitation uses (the paper gives only the count): the stage
# outputs, plus two evenly spread blocks of the deep third stage for six.
LAYERS = {
    4: ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_5", "stages_3/blocks_1"),
    6: ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_1", "stages_2/blocks_3",
        "stages_2/blocks_5", "stages_3/blocks_1"),
}
_KD = {"ce": (1.0, 0.0, 0.0), "label_hard": (0.5, 0.5, 0.0), "hard": (0.0, 1.0, 0.0),
       "label_soft": (0.5, 0.0, 0.5), "soft": (0.0, 0.0, 1.0)}


# Table 9: row -> (student, the module-imitation teacher it names, or None).
TABLE9 = {
    "t9_l12_none": ("riformerv2_s12", None),
    "t9_l12_randformer": ("riformerv2_s12", "randformer_s12"),
    "t9_l12_poolformerv2": ("riformerv2_s12", "poolformerv2_s12"),
    "t9_l18_none": ("riformerv2_s18", None),
    "t9_l18_convformer": ("riformerv2_s18", "convformer_s18"),
    "t9_l18_caformer": ("riformerv2_s18", "caformer_s18"),
}
TABLE8 = {"t8_s9_soft": "poolformer_s9", "t8_xs12_soft": "poolformer_xs12"}


def feature_teacher(row):
  """The model the row's feature teacher is: a PoolFormer-S12 for the roadmap's rows
  with module imitation, Table 9's named teacher, or None (no module imitation)."""
  if row in TABLE9:
    return TABLE9[row][1]
  return "poolformer_s12" if row.startswith("mi_") else None


def get_config(row):
  if row in TABLE9:
    return _table9_config(row)
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
  elif row in TABLE8:
    config.model_name, kd = TABLE8[row], "soft"
    config.distill.mi_blocks = common.last_block_of_each_stage(
        registry.model_kwargs(config.model_name)["depths"])
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


def _table9_config(row):
  student, teacher = TABLE9[row]
  config = common.riformer_config("s12")
  config.model_name = student
  config.epochs = 130  # appendix D (with 10 "patient" epochs, left to the schedule)
  config.teachers.init_from_feature = False
  config.distill.mi_blocks = common.last_block_of_each_stage(
      registry.model_kwargs(student)["depths"])
  lambdas = common.riformer_config("s12").losses
  for name in ("ce", "hard_kd", "soft_kd"):
    config.losses[name].weight = 0.0
  if teacher is None:
    config.losses.ce.weight = 1.0
    for name in ("mi_in", "mi_out", "mi_rel"):
      config.losses[name].weight = 0.0
  else:
    config.losses.soft_kd.weight = 1.0
    for name, paper_epochs in (("mi_in", 80), ("mi_out", 80), ("mi_rel", 20)):
      config.losses[name] = common.term(lambdas[name].weight,
                                        end_epoch=config.epochs * paper_epochs / 120)
  return config
