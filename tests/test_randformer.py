"""RandFormer (MetaFormer baselines: identity mixers, then a frozen random token-mixing
matrix) against a PyTorch reference of the original code (tests/torch_metaformer.py,
checked against sail-sg/metaformer's `metaformer_baselines.py`), imported by convert.py
from the original checkpoint layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

import riformer_jax
import torch_metaformer as original
import torch_reference as ref
from conftest import random_params, relative_error
from riformer_jax.models import baselines, counting, registry
from riformer_jax.train import optim
from riformer_jax.weights import convert, store, torch_keys

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
# The original repository's table: millions of trained + frozen (the random matrices)
# parameters at 224.
PUBLISHED = {"s12": (11.9, 0.2), "s24": (21.3, 0.5), "s36": (30.8, 0.7),
             "m36": (56.1, 0.7), "m48": (73.3, 0.9)}


def torch_randformer(size=None, img_size=224, seed=0, num_classes=1000, **shape):
  """The reference at a registered `size` or a given `shape`, with the matrices of
  `img_size`'s grids and every parameter far from its init."""
  if size:
    kwargs = registry.model_kwargs(f"randformer_{size}")
    shape = dict(depths=kwargs["depths"], dims=kwargs["dims"])
  tokens = tuple(baselines.stage_grid(img_size, stage) ** 2 for stage in (2, 3))
  model = original.MetaFormer(mixer="random", tokens=tokens, num_classes=num_classes,
                              **shape)
  return ref.randomize_(model, seed).eval()


def logits_error(torch_model, model, variables, size):
  images = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
  return relative_error(jax.jit(model.apply)(variables, images),
                        ref.forward_nhwc(torch_model, images))


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_parameter_counts_match_the_original(size):
  flax_model = riformer_jax.create_model(f"randformer_{size}")
  flat = traverse_util.flatten_dict(counting.abstract_variables(flax_model, 224)["params"],
                                    sep="/")
  frozen = sum(np.prod(v.shape) for k, v in flat.items() if k.endswith("random_matrix"))
  trained = sum(np.prod(v.shape) for k, v in flat.items()) - frozen
  with torch.device("meta"):
    torch_model = torch_randformer(size)
  assert trained + frozen == sum(p.numel() for p in torch_model.parameters())
  assert frozen == sum(p.numel() for p in torch_model.parameters() if not p.requires_grad)
  assert (round(trained / 1e6, 1), round(frozen / 1e6, 1)) == PUBLISHED[size]
  # The same keys and shapes as the original's state dict.
  zeros = {k: np.zeros(v.shape, np.float32) for k, v in flat.items()}
  ours = torch_keys.state_dict_from_params(traverse_util.unflatten_dict(zeros, sep="/"),
                                           "metaformer")
  assert {k: v.shape for k, v in ours.items()} == {
      k: tuple(v.shape) for k, v in torch_model.state_dict().items()}


@pytest.mark.heavy  # S12 forward in both frameworks: not in `make check`
@pytest.mark.parametrize("img_size", [224, 384])
def test_convert_imports_an_original_randformer_s12_exactly(tmp_path, img_size):
  """A checkpoint made at 224, or at 384 (576 and 144 tokens): convert.py tells the
  size from the matrices and builds the model for it."""
  torch_model = torch_randformer("s12", img_size=img_size, seed=3)
  torch.save(torch_model.state_dict(), tmp_path / "randformer_s12.pth")
  assert convert.main(["--arch", "randformer_s12", "--src",
                       str(tmp_path / "randformer_s12.pth"),
                       "--dst", str(tmp_path / "out")]) == 0
  manifest = store.read_manifest(tmp_path / "out")
  assert manifest["format"] == "metaformer" and manifest["kwargs"]["img_size"] == img_size
  model, variables = riformer_jax.load_pretrained(tmp_path / "out")
  assert logits_error(torch_model, model, variables, img_size) < 1e-5


@pytest.mark.parametrize("img_size", [64, 96])
def test_tiny_randformers_match_at_their_size_and_refuse_another(img_size):
  """At 64 px the matrices mix 16 and 4 tokens, at 96 px 36 and 9; the keys map both
  ways; any other input size is refused, naming the block."""
  torch_model = torch_randformer(img_size=img_size, seed=4, num_classes=10, **TINY)
  model = riformer_jax.create_model("randformer_s12", num_classes=10, img_size=img_size,
                                    **TINY)
  abstract = counting.abstract_variables(model, img_size)["params"]
  state_dict = ref.numpy_state_dict(torch_model)
  params = torch_keys.params_from_state_dict(state_dict, abstract, "metaformer")
  assert logits_error(torch_model, model, {"params": params}, img_size) < 1e-5
  back = torch_keys.state_dict_from_params(params, "metaformer")
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    assert np.array_equal(back[key], value), key
  with pytest.raises(ValueError, match=r"stages_2/blocks_0 mixes \d+ tokens, but this "
                     r"input gives a \d+x\d+ grid"):
    model.apply({"params": params},
                np.zeros((1, img_size + 32, img_size + 32, 3), np.float32))


def test_the_random_matrices_stay_frozen_in_training():
  model = riformer_jax.create_model("randformer_s12", num_classes=10, img_size=64, **TINY)
  images = np.random.default_rng(0).standard_normal((4, 64, 64, 3)).astype(np.float32)
  params = random_params(model, images[:1], 6)

  @jax.jit
  def step(params, opt_state):
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, images)))  # noqa: E731
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), grads

  optimizer = optim.make_optimizer(1e-2, weight_decay=0.5)
  new, grads = step(params, optimizer.init(params))
  flat = traverse_util.flatten_dict(params, sep="/")
  new, grads = (traverse_util.flatten_dict(t, sep="/") for t in (new, grads))
  matrices = [k for k in flat if k.endswith("random_matrix")]
  assert len(matrices) == 3
  for key in matrices:
    assert not np.any(grads[key]) and np.array_equal(new[key], flat[key]), key
  # ... while the kernels next to them moved (the step did something).
  assert not np.array_equal(new["stages_2/blocks_0/mlp/fc1/kernel"],
                            flat["stages_2/blocks_0/mlp/fc1/kernel"])


def test_an_original_poolformerv2_imports_from_the_same_layout():
  torch_model = ref.randomize_(original.MetaFormer(mixer="pooling", num_classes=10,
                                                  **TINY), 7).eval()
  model = riformer_jax.create_model("poolformerv2_s12", num_classes=10, **TINY)
  abstract = counting.abstract_variables(model, 64)["params"]
  params = torch_keys.params_from_state_dict(ref.numpy_state_dict(torch_model), abstract,
                                             "metaformer")
  assert logits_error(torch_model, model, {"params": params}, 64) < 1e-5
