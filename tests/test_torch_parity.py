"""Our models against the original PyTorch code (timm, MMPreTrain) on the same weights."""

import jax
import numpy as np
import pytest
import torch

import riformer_jax
from riformer_jax.models import counting
from riformer_jax.weights import torch_keys
from conftest import relative_error
import torch_reference as ref

RESOLUTIONS = ((224, 224), (97, 131))


class Jitted:
  """`model` whose `apply` is jitted, for `ref.assert_same_logits`."""

  def __init__(self, model):
    self.apply = jax.jit(model.apply)


def test_timm_poolformer_with_timm_head():
  torch_model = ref.randomize_(ref.timm_poolformer("s12"), seed=0)
  model, params = ref.load_into_flax(torch_model, "poolformer_s12", "timm", head="timm")
  ref.assert_same_logits(torch_model, model, params, RESOLUTIONS)
  # The original head on the same weights is a different function (docs/reference.md
  # section 2).
  original = riformer_jax.create_model("poolformer_s12")
  images = np.random.default_rng(1).standard_normal((2, 64, 64, 3), dtype=np.float32)
  assert relative_error(original.apply({"params": params}, images),
                        ref.forward_nhwc(torch_model, images)) > 1e-2


def test_mmpretrain_poolformer_with_original_head():
  torch_model = ref.randomize_(ref.mmpretrain_poolformer("s12"), seed=1)
  model, params = ref.load_into_flax(torch_model, "poolformer_s12", "mmpretrain")
  ref.assert_same_logits(torch_model, model, params, RESOLUTIONS)


def test_mmpretrain_riformer_training_time_and_deploy():
  torch_model = ref.randomize_(ref.mmpretrain_riformer("s12"), seed=2)
  model, params = ref.load_into_flax(torch_model, "riformer_s12", "mmpretrain")
  ref.assert_same_logits(torch_model, model, params, RESOLUTIONS)

  # Our pure re-parameterisation against MMPreTrain's in-place switch_to_deploy.
  torch_model.backbone.switch_to_deploy()
  ours = torch_keys.state_dict_from_params(riformer_jax.reparameterize(params), "mmpretrain")
  theirs = ref.numpy_state_dict(torch_model)
  assert set(ours) == set(theirs)
  for key in theirs:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7, err_msg=key)
  deploy_model = riformer_jax.create_model("riformer_s12", deploy=True)
  ref.assert_same_logits(torch_model, deploy_model, riformer_jax.reparameterize(params),
                         RESOLUTIONS, seed=3)


# S24 in the default suite: the sizes differ only in depths and widths, which
# test_models.test_parameter_counts_match_reference checks for every size (training and
# deploy forms); S12 runs in every test above. The others run in `make test-all`.
@pytest.mark.parametrize("size", ["s24"] + [pytest.param(size, marks=pytest.mark.slow)
                                            for size in ("s36", "m36", "m48")])
def test_mmpretrain_riformer_every_size(size):
  torch_model = ref.randomize_(ref.mmpretrain_riformer(size), seed=4)
  model, params = ref.load_into_flax(torch_model, f"riformer_{size}", "mmpretrain")
  ref.assert_same_logits(torch_model, model, params, RESOLUTIONS)


def test_tiny_mmpretrain_riformer_with_custom_arch():
  arch = dict(layers=[1, 2, 2, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[4] * 4,
              layer_scale_init_value=1e-5)
  torch_model = ref.MMPreTrainClassifier(ref.RIFormer(arch), num_classes=10).eval()
  ref.randomize_(torch_model, seed=5)
  model, params = ref.load_into_flax(torch_model, "riformer_s12", "mmpretrain",
                                 depths=(1, 2, 2, 1), dims=(8, 16, 24, 32), num_classes=10)
  # Jitted (one compilation per resolution): eagerly, each of this width's operations
  # would compile at both resolutions, which no other test here runs.
  ref.assert_same_logits(torch_model, Jitted(model), params, RESOLUTIONS)


@pytest.mark.parametrize("fmt,factory,name,overrides", [
    ("timm", lambda: ref.timm_poolformer("s12"), "poolformer_s12", {"head": "timm"}),
    ("mmpretrain", lambda: ref.mmpretrain_poolformer("s12"), "poolformer_s12", {}),
    ("mmpretrain", lambda: ref.mmpretrain_riformer("s12"), "riformer_s12", {}),
    ("mmpretrain", lambda: ref.mmpretrain_riformer("s12", deploy=True), "riformer_s12",
     {"deploy": True}),
])
def test_state_dict_round_trip_is_exact(fmt, factory, name, overrides):
  torch_model = ref.randomize_(factory(), seed=6)
  _, params = ref.load_into_flax(torch_model, name, fmt, **overrides)
  back = torch_keys.state_dict_from_params(params, fmt)
  original = ref.numpy_state_dict(torch_model)
  assert back.keys() == original.keys()
  for key, value in original.items():
    assert back[key].shape == value.shape and np.array_equal(back[key], value), key
  # The exported dict loads into the PyTorch model with strict key matching.
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_sail_keys_are_mmpretrain_keys_without_backbone_prefix():
  model = riformer_jax.create_model("poolformer_s12")
  abstract = counting.abstract_variables(model, 64)["params"]
  mm = ref.numpy_state_dict(ref.mmpretrain_poolformer("s12"))
  sail = {k.removeprefix("backbone.").replace("norm6.", "norm.").replace("head.fc.", "head."): v
          for k, v in mm.items()}
  from_mm = torch_keys.params_from_state_dict(mm, abstract, "mmpretrain")
  from_sail = torch_keys.params_from_state_dict(sail, abstract, "sail")
  assert jax.tree.all(jax.tree.map(np.array_equal, from_mm, from_sail))


def test_mismatched_state_dicts_name_the_problem():
  model = riformer_jax.create_model("riformer_s12")
  abstract = counting.abstract_variables(model, 64)["params"]
  sd = ref.numpy_state_dict(ref.mmpretrain_riformer("s12"))
  missing = {k: v for k, v in sd.items() if k != "backbone.network.4.3.norm1.weight"}
  with pytest.raises(KeyError, match=r"missing \['backbone.network.4.3.norm1.weight'\]"):
    torch_keys.params_from_state_dict(missing, abstract, "mmpretrain")
  with pytest.raises(KeyError, match="unexpected.*network.0.0.norm_reparam"):
    torch_keys.params_from_state_dict(
        {**sd, "backbone.network.0.0.norm_reparam.weight": np.ones(64)}, abstract, "mmpretrain")
  wrong = {**sd, "head.fc.weight": np.zeros((10, 512), np.float32)}
  with pytest.raises(ValueError, match=r"head.fc.weight: \(10, 512\) does not fit head/fc/kernel"):
    torch_keys.params_from_state_dict(wrong, abstract, "mmpretrain")
  # Training-time RIFormer params (zeros of their shapes: eager init would compile
  # once per shape) have no timm layout. Their keys come sorted, so the affine mixer's
  # bias is the first key named (init's own dict lists its scale first).
  zeros = jax.tree.map(lambda spec: np.zeros(spec.shape, spec.dtype), abstract)
  with pytest.raises(KeyError, match="stages_0/blocks_0/token_mixer/bias: no timm "
                                     "equivalent"):
    torch_keys.state_dict_from_params(zeros, "timm")
