"""PoolFormerV2, ConvFormer and CAFormer (the teachers) against timm on the same weights;
RandFormer, which timm lacks, in test_randformer.py."""

import functools

import jax
import numpy as np
import pytest
import torch

import riformer_jax
from riformer_jax.models import counting
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
