"""Every shipped config builds: its model exists, its MI blocks exist in that model,
every loss term is configured, and the CLI rejects misspelt fields."""

import importlib

import numpy as np
import pytest

import riformer_jax
from riformer_jax import models
from riformer_jax.train import distill, trainer

ROADMAP_ROWS = ["pool_ce", "identity_ce", "identity_label_hard", "identity_hard",
                "identity_label_soft", "identity_soft", "affine_ce", "affine_label_hard",
                "affine_hard", "affine_label_soft", "affine_soft", "mi_f40_r0_l6",
                "mi_f80_r10_l6", "mi_f80_r20_l4", "mi_f80_r20_l4_init",
                # Tables 8 and 9
                "t8_s9_soft", "t8_xs12_soft", "t9_l12_none", "t9_l12_randformer",
                "t9_l12_poolformerv2", "t9_l18_none", "t9_l18_convformer",
                "t9_l18_caformer"]
TEACHER_ROWS = ["teacher_randformer_s12", "teacher_poolformerv2_s12",
                "teacher_convformer_s18", "teacher_caformer_s18"]
CONFIGS = ([(size, None) for size in ("s12", "s24", "s36", "m36", "m48")] +
           [(size, "ft384") for size in ("s12", "m48")] +
           [("riformer", arg) for arg in ("s24", "m36_ft384")] +
           [("roadmap", row) for row in ROADMAP_ROWS] +
           [("roadmap_small", row) for row in ROADMAP_ROWS + TEACHER_ROWS] +
           [("demo", role) for role in ("teacher", "ce", "distilled")] +
           [("tiny", None), ("tiny", "with_teacher")])


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_is_consistent(name, arg):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg) if arg else module.get_config()
  assert set(config.losses) == set(distill.TERMS)
  model = riformer_jax.create_model(config.model_name, **config.model)
  depths = models.model_kwargs(config.model_name, **config.model)["depths"]
  for block in config.distill.mi_blocks:
    stage, index = (int(part.split("_")[1]) for part in block.split("/"))
    assert index < depths[stage], block
  assert config.batch_size % 16 == 0 and model.num_classes == config.model.num_classes


def test_one_riformer_config_file_under_the_old_names_too():
  riformer = importlib.import_module("configs.riformer")
  for size in ("s12", "s24", "s36", "m36", "m48"):
    old = importlib.import_module(f"configs.{size}")
    assert old.get_config() == riformer.get_config(size)
    assert old.get_config("ft384") == riformer.get_config(f"{size}_ft384")
    assert riformer.get_config(size).model_name == f"riformer_{size}"
  assert riformer.get_config("m48_ft384").resolution == 384
  with pytest.raises(ValueError, match=r"unknown argument 's13'; expected one of"):
    riformer.get_config("s13")


def test_roadmap_rows_follow_the_paper():
  roadmap = importlib.import_module("configs.roadmap")
  soft = roadmap.get_config("affine_soft").losses
  assert (soft.ce.weight, soft.soft_kd.weight, soft.mi_in.weight) == (0.0, 1.0, 0.0)
  mi = roadmap.get_config("mi_f80_r20_l4_init")
  assert (mi.losses.mi_in.end_epoch, mi.losses.mi_rel.end_epoch) == (80, 20)
  assert len(mi.distill.mi_blocks) == 4 and mi.teachers.init_from_feature
  assert roadmap.get_config("identity_ce").model_name == "identityformer_s12"
  with pytest.raises(ValueError, match="unknown roadmap row 'affine_medium'"):
    roadmap.get_config("affine_medium")


def test_tables_8_and_9_rows_follow_the_paper():
  roadmap = importlib.import_module("configs.roadmap")
  small = importlib.import_module("configs.roadmap_small")
  for row, (student, teacher) in roadmap.TABLE9.items():
    config = roadmap.get_config(row)
    assert config.model_name == student and config.epochs == 130
    assert roadmap.feature_teacher(row) == teacher
    assert not config.teachers.init_from_feature  # appendix D names no initialisation
    losses = config.losses
    if teacher is None:  # "none": cross-entropy alone
      assert (losses.ce.weight, losses.soft_kd.weight, losses.mi_in.weight) == (1, 0, 0)
    else:  # logit KD plus module imitation, Table 4's windows in proportion
      assert (losses.ce.weight, losses.soft_kd.weight) == (0, 1)
      assert losses.mi_out.end_epoch == pytest.approx(130 * 80 / 120)
      assert losses.mi_rel.end_epoch == pytest.approx(130 * 20 / 120)
    # At small scale: 12 layers as the demo's S12, 18 layers 1.5x each stage.
    depths = small.get_config(row).model.depths
    assert depths == ((2, 2, 4, 2) if "_l12_" in row else (3, 3, 6, 3))
  for row, model in roadmap.TABLE8.items():
    config = roadmap.get_config(row)
    assert (config.model_name, config.epochs, config.losses.soft_kd.weight) == (
        model, 120, 1.0)
    assert roadmap.feature_teacher(row) is None
  assert small.get_config("t8_s9_soft").model.depths == (2, 2, 2, 2)
  assert small.get_config("t8_xs12_soft").model.dims == (13, 27, 40, 53)
  teacher = small.get_config("teacher_randformer_s12")
  assert teacher.model.img_size == teacher.resolution and teacher.losses.ce.weight == 1
  with pytest.raises(ValueError, match="no teacher row for 'convformer_s12'"):
    small.get_config("teacher_convformer_s12")


def test_small_roadmap_keeps_the_paper_s_fractions_of_training():
  small = importlib.import_module("configs.roadmap_small")
  config = small.get_config("mi_f80_r10_l6_init")
  epochs = config.epochs
  assert config.losses.mi_out.end_epoch == pytest.approx(epochs * 80 / 120)
  assert config.losses.mi_rel.end_epoch == pytest.approx(epochs * 10 / 120)
  assert len(config.distill.mi_blocks) == 6 and config.teachers.init_from_feature
  assert config.model.depths == importlib.import_module("configs.demo").DEPTHS
  assert small.get_config("affine_label_soft").losses.ce.weight == 0.5


def test_demo_roles_differ_only_where_the_paper_says():
  demo = importlib.import_module("configs.demo")
  teacher, ce, distilled = (demo.get_config(role) for role in demo.ROLES)
  assert (teacher.model_name, ce.model_name) == ("poolformer_s12", "riformer_s12")
  assert ce.losses.ce.weight == 1.0 and not ce.teachers.init_from_feature
  assert distilled.losses.ce.weight == 0.0 and distilled.losses.soft_kd.weight == 1.0
  assert distilled.teachers.init_from_feature and distilled.losses.mi_rel.weight > 0
  for field in ("model", "batch_size", "epochs", "lr", "data", "aug", "resolution"):
    assert ce[field] == distilled[field], field
  with pytest.raises(ValueError, match="unknown role 'student'"):
    demo.get_config("student")


@pytest.mark.parametrize("size", ["s12", "s24", "m48"])
def test_module_imitation_keeps_table_10_and_names_its_reading(size):
  """The configs hold Table 10's "lambda x batch_size" as printed and read it as the
  weight of our mean-reduced terms (docs/roadmap.md); each other reading is one
  override away, and the trainer applies it to the module-imitation terms only."""
  config = importlib.import_module(f"configs.{size}").get_config()
  table = {"s12": (1e-4, 1e-3, 1.0), "s24": (3e-4, 5e-3, 4.0), "m48": (1e-4, 1e-3, 1.0)}
  mi = ("mi_in", "mi_out", "mi_rel")
  assert tuple(config.losses[n].weight for n in mi) == table[size]
  batch = 512 if size == "m48" else 1024  # the paper's batch for the size
  assert (config.distill.mi_reading, config.distill.mi_batch) == ("value", batch)
  for reading, factor in (("value", 1.0), ("times_batch", batch), ("per_batch", 1 / batch)):
    config.distill.mi_reading = reading
    weights = trainer.loss_weights(config, 0.0)
    np.testing.assert_allclose([weights[n] for n in mi], np.float32(table[size]) * factor,
                               rtol=1e-6)
    assert weights["soft_kd"] == 1.0 and weights["ce"] == 0.0
  # Windows: relations for the first 100 of 600 epochs, features for the first 400.
  late = trainer.loss_weights(config, 200.0)
  assert late["mi_rel"] == 0.0 and late["mi_in"] > 0 and late["mi_out"] > 0
  assert all(trainer.loss_weights(config, 400.0)[n] == 0.0 for n in mi)


def test_the_demo_distils_with_the_configs_reading():
  demo = importlib.import_module("configs.demo")
  distilled, s12 = demo.get_config("distilled"), importlib.import_module(
      "configs.s12").get_config()
  for name in ("mi_in", "mi_out", "mi_rel"):
    assert distilled.losses[name].weight == s12.losses[name].weight
  assert (distilled.distill.mi_reading, distilled.distill.mi_batch) == (
      s12.distill.mi_reading, s12.distill.mi_batch)
