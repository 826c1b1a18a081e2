"""PoolFormerV2, ConvFormer and CAFormer (the teachers) against timm on the same weights;
RandFormer, which timm lacks, in test_randformer.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import riformer_jax
from conftest import random_params, relative_error
from riformer_jax.models import baselines, counting
from riformer_jax.train import losses
from riformer_jax.weights import torch_keys
import torch_reference as ref

FAMILIES = ("poolformerv2", "convformer", "caformer")
# Two heads of width 32 in CAFormer's attention stages.
TINY_BASELINE = dict(depths=(1, 2, 1, 2), dims=(16, 32, 64, 96))


class Jitted:
  """`model` whose `apply` is jitted (one compilation per resolution, where eagerly
  each operation compiles), for `ref.assert_same_logits`."""

  def __init__(self, model):
    self.apply = jax.jit(model.apply)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_match_timm_and_round_trip(family):
  torch_model = ref.randomize_(ref.timm_baseline(family, **TINY_BASELINE), seed=0)
  size = "s12" if family == "poolformerv2" else "s18"
  model, params = ref.load_into_flax(torch_model, f"{family}_{size}", "timm",
                                     **TINY_BASELINE, num_classes=10)
  ref.assert_same_logits(torch_model, Jitted(model), params, [(64, 64), (97, 131)])

  back = torch_keys.state_dict_from_params(params, "timm")
  original = ref.numpy_state_dict(torch_model)
  assert back.keys() == original.keys()
  for key, value in original.items():
    assert back[key].shape == value.shape and np.array_equal(back[key], value), key


def test_full_size_caformer_matches_timm_at_224():
  # SepConv stages, attention stages and the MLP head at the published shape.
  torch_model = ref.randomize_(
      ref.timm.create_model("caformer_s18", num_classes=1000).eval(), seed=1)
  model, params = ref.load_into_flax(torch_model, "caformer_s18", "timm")
  ref.assert_same_logits(torch_model, Jitted(model), params, [(224, 224)])


@pytest.mark.parametrize("name", [
    f"{family}_{size}" for family, sizes in [
        ("poolformerv2", ("s12", "s24", "s36", "m36", "m48")),
        ("convformer", ("s18", "s36", "m36", "b36")),
        ("caformer", ("s18", "s36", "m36", "b36"))]
    for size in sizes])
def test_every_size_has_timms_keys_and_shapes(name):
  with torch.device("meta"):  # shapes only: nothing allocated or initialised
    torch_model = ref.timm.create_model(name)
  expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  abstract = counting.abstract_variables(riformer_jax.create_model(name), 64)["params"]
  zeros = jax.tree.map(lambda spec: np.zeros(spec.shape, np.float32), abstract)
  ours = {k: v.shape for k, v in torch_keys.state_dict_from_params(zeros, "timm").items()}
  assert ours == expected


@pytest.mark.parametrize("family", FAMILIES + ("randformer",))
def test_teacher_taps_pair_with_a_riformer_student_of_the_same_shape(family):
  size = "s18" if family in ("convformer", "caformer") else "s12"
  shape = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=10)

  def taps(name):  # shapes only: traced, not run
    extra = {"img_size": 32} if name.startswith("randformer") else {}
    model = riformer_jax.create_model(name, **shape, **extra)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    init = functools.partial(model.init, mutable=True)  # keep the sown taps
    abstract = jax.eval_shape(init, jax.random.key(0), images)
    return jax.tree.map(lambda spec: spec.shape, abstract["intermediates"])

  assert taps(f"{family}_{size}")["stages_2"] == taps("riformer_s12")["stages_2"]


def test_bad_configurations_name_the_field():
  with pytest.raises(ValueError, match="token_mixers.*one entry per stage"):
    riformer_jax.create_model("caformer_s18", token_mixers=("sepconv",) * 3)
  with pytest.raises(ValueError, match=r"token_mixers: unknown \['conv'\]"):
    riformer_jax.create_model("convformer_s18", token_mixers=("conv",) * 4)
  with pytest.raises(ValueError, match="norm='batchnorm'"):
    riformer_jax.create_model("convformer_s18", norm="batchnorm")
  with pytest.raises(TypeError, match=r"unknown argument\(s\) \['token_mixer'\]"):
    riformer_jax.create_model("convformer_s18", token_mixer="sepconv")


@pytest.mark.parametrize("family,mixer_stage", [
    ("randformer", 2), ("poolformerv2", 2), ("convformer", 1), ("caformer", 2)])
def test_the_taps_are_the_mixers_input_and_output(family, mixer_stage):
  """Per teacher family, in a stage with its token mixer (random mixing, pooling,
  separable convolution, attention): `mixer_output` is that mixer applied to
  norm1(`block_input`), recomputed here from the block's own params; blocks chain; and
  module imitation against a RIFormer student of the same shape runs on these taps."""
  size = "s18" if family in ("convformer", "caformer") else "s12"
  shape = dict(depths=(1, 2, 2, 1), dims=(16, 32, 64, 96), num_classes=10)
  extra = {"img_size": 64} if family == "randformer" else {}
  model = riformer_jax.create_model(f"{family}_{size}", **shape, **extra)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  params = random_params(model, images[:1], 11)
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, images)
  taps = state["intermediates"][f"stages_{mixer_stage}"]
  block = params[f"stages_{mixer_stage}"]["blocks_0"]
  normed = baselines._norm(model.norm, jnp.float32, "norm1").apply(
      {"params": block["norm1"]}, taps["blocks_0"]["block_input"][0])
  mixer = {"randformer": baselines.RandomMixing(normed.shape[1] * normed.shape[2]),
           "poolformerv2": baselines.Pooling(), "convformer": baselines.SepConv(),
           "caformer": baselines.Attention()}[family]
  expected = mixer.apply({"params": block.get("token_mixer", {})}, normed)
  assert relative_error(taps["blocks_0"]["mixer_output"][0], expected) < 1e-5
  np.testing.assert_array_equal(taps["blocks_0"]["block_output"][0],
                                taps["blocks_1"]["block_input"][0])

  student = riformer_jax.create_model("riformer_s12", **shape)
  _, student_state = jax.jit(lambda p, x: student.apply(
      {"params": p}, x, mutable=["intermediates"]))(random_params(student, images[:1], 12),
                                                    images)
  blocks = ("stages_1/blocks_1", "stages_2/blocks_0", "stages_3/blocks_0")
  terms = losses.module_imitation(student_state["intermediates"], state["intermediates"],
                                  blocks)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values()), terms
