"""GFNet / GFNet-H in Flax against our PyTorch reference (tests/torch_gfnet.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import riformer_jax
from riformer_jax.models import counting, gfnet
from riformer_jax.weights import torch_keys

import torch_gfnet as ref
from conftest import relative_error

torch.set_num_threads(2)

# Exact counts of the original code at 224 with 1000 classes, and the rounded ones of
# the paper / README (GFNet-Ti: 7.51M is published as 7M).
PARAM_COUNTS = {
    "gfnet_ti": (7_511_784, 7), "gfnet_xs": (15_985_768, 16),
    "gfnet_s": (24_869_608, 25), "gfnet_b": (43_120_616, 43),
    "gfnet_h_ti": (15_085_096, 15), "gfnet_h_s": (32_162_632, 32),
    "gfnet_h_b": (53_744_200, 54),
}

# Tiny configurations trained (i.e. with params) at 64x64, with their torch twins.
TINY_PYRAMID = dict(img_size=64, dims=(8, 16, 24, 32), depths=(1, 2, 2, 1),
                    mlp_ratios=(4.0, 3.0, 4.0, 2.0), init_values=1e-6, num_classes=10)
TINY_PLAIN = dict(img_size=64, patch_size=8, dim=16, depth=3, num_classes=10)


def torch_twin(config, img_size=None):
  """Our torch reference built like the Flax `config`, at `img_size`."""
  img_size = img_size or config["img_size"]
  if "dims" in config:
    return ref.GFNetPyramid(
        img_size, num_classes=config["num_classes"], embed_dim=config["dims"],
        depth=config["depths"], mlp_ratio=config["mlp_ratios"],
        init_values=config["init_values"]).eval()
  return ref.GFNet(img_size, config["patch_size"], config["num_classes"], config["dim"],
                   config["depth"]).eval()


def flax_model(config, **overrides):
  cls = gfnet.GFNetPyramid if "dims" in config else gfnet.GFNet
  return cls(**{**config, **overrides})


def random_params(model, seed):
  """Every parameter far from its init, like conftest.numpy_randomize (vectors, gamma included,
  uniform in [-0.25, 1.25], kernels N(0, 1/fan_in)) but with numpy: jax.random compiles
  once per leaf shape, which costs seconds here. Filters and pos_embed: N(0, 1)."""
  rng = np.random.default_rng(seed)
  abstract = counting.abstract_variables(model, 64)["params"]
  params = {}
  for path, leaf in traverse_util.flatten_dict(abstract, sep="/").items():
    if path.endswith("complex_weight") or path == "pos_embed":
      value = rng.standard_normal(leaf.shape)
    elif len(leaf.shape) == 1:
      value = rng.uniform(-0.25, 1.25, leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    params[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(params, sep="/")


def apply(model, params, x, **kwargs):
  """`model.apply` under jit: one compilation instead of one per operation."""
  return jax.jit(functools.partial(model.apply, **kwargs))({"params": params}, x)


def torch_state_dict(params):
  flat = traverse_util.flatten_dict(params, sep="/")
  return {torch_keys.gfnet_torch_key(path): torch.from_numpy(torch_keys.gfnet_to_torch(path, value).copy())
          for path, value in flat.items()}


def params_from_state_dict(state_dict, like):
  flat = traverse_util.flatten_dict(like, sep="/")
  return traverse_util.unflatten_dict(
      {path: jnp.asarray(torch_keys.gfnet_from_torch(path, state_dict[torch_keys.gfnet_torch_key(path)]
                                          .numpy())) for path in flat}, sep="/")


def images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal((2, *shape, 3), dtype=np.float32)


def test_param_counts_of_every_size():
  for name, (exact, millions) in PARAM_COUNTS.items():
    model = riformer_jax.create_model(name)
    abstract = counting.abstract_variables(model)["params"]
    assert counting.count_params(abstract) == exact, name
    assert gfnet.PARAM_COUNTS[name] == exact
    assert abs(exact / 1e6 - millions) < 0.52, name
  assert set(gfnet.SIZES) == set(PARAM_COUNTS)
  assert gfnet.CLASSES["gfnet_h_b"] is gfnet.GFNetPyramid
  assert gfnet.CLASSES["gfnet_s"] is gfnet.GFNet


# Key names and shapes read off the original `gfnet.py` (`GFNetPyramid`, `GFNet`).
ORIGINAL_KEYS = {
    "gfnet_h_b": (373, {
        "pos_embed": (1, 3136, 96),
        "patch_embed.0.proj.weight": (96, 3, 4, 4),
        "patch_embed.3.proj.weight": (768, 384, 2, 2),
        "patch_embed.3.proj.bias": (768,),
        "blocks.0.0.filter.complex_weight": (56, 29, 96, 2),
        "blocks.1.2.filter.complex_weight": (28, 15, 192, 2),
        "blocks.2.26.filter.complex_weight": (14, 8, 384, 2),
        "blocks.3.2.filter.complex_weight": (7, 4, 768, 2),
        "blocks.2.26.gamma": (384,),
        "blocks.2.5.norm1.weight": (384,),
        "blocks.2.5.norm2.bias": (384,),
        "blocks.3.2.mlp.fc1.weight": (3072, 768),
        "blocks.3.2.mlp.fc2.weight": (768, 3072),
        "norm.weight": (768,),
        "head.weight": (1000, 768),
        "head.bias": (1000,),
    }),
    "gfnet_s": (178, {
        "pos_embed": (1, 196, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16),
        "patch_embed.proj.bias": (384,),
        "blocks.0.filter.complex_weight": (14, 8, 384, 2),
        "blocks.18.norm1.weight": (384,),
        "blocks.18.mlp.fc1.weight": (1536, 384),
        "blocks.18.mlp.fc2.bias": (384,),
        "norm.bias": (384,),
        "head.weight": (1000, 384),
    }),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_KEYS))
def test_key_layout_matches_original(name):
  count, sample = ORIGINAL_KEYS[name]
  kwargs = gfnet.SIZES[name]
  with torch.device("meta"):
    if name.startswith("gfnet_h_"):
      torch_model = ref.GFNetPyramid(embed_dim=kwargs["dims"], depth=kwargs["depths"],
                                     init_values=kwargs["init_values"])
    else:
      torch_model = ref.GFNet(embed_dim=kwargs["dim"], depth=kwargs["depth"])
  theirs = {key: tuple(value.shape) for key, value in torch_model.state_dict().items()}
  assert len(theirs) == count and theirs.items() >= sample.items()
  abstract = traverse_util.flatten_dict(
      counting.abstract_variables(riformer_jax.create_model(name))["params"], sep="/")
  # Zero-stride stand-ins: the layouts without allocating 54M parameters.
  ours = {torch_keys.gfnet_torch_key(path):
          torch_keys.gfnet_to_torch(path, np.broadcast_to(np.float32(0), value.shape)).shape
          for path, value in abstract.items()}
  assert ours == theirs


def test_torch_key_examples_and_layouts():
  assert (torch_keys.gfnet_torch_key("blocks_2_5/filter/complex_weight")
          == "blocks.2.5.filter.complex_weight")
  assert torch_keys.gfnet_torch_key("patch_embed_0/proj/kernel") == "patch_embed.0.proj.weight"
  assert torch_keys.gfnet_torch_key("patch_embed/proj/bias") == "patch_embed.proj.bias"
  assert torch_keys.gfnet_torch_key("blocks_7/mlp/fc1/kernel") == "blocks.7.mlp.fc1.weight"
  assert torch_keys.gfnet_torch_key("blocks_0_1/gamma") == "blocks.0.1.gamma"
  assert torch_keys.gfnet_torch_key("pos_embed") == "pos_embed"
  assert torch_keys.gfnet_torch_key("norm/scale") == "norm.weight"
  assert torch_keys.gfnet_torch_key("head/kernel") == "head.weight"
  with pytest.raises(KeyError):
    torch_keys.gfnet_torch_key("stages_0/blocks_1/norm1/scale")
  rng = np.random.default_rng(0)
  shapes = {"patch_embed_0/proj/kernel": (4, 4, 3, 8), "head/kernel": (8, 5),
            "pos_embed": (1, 6, 6, 8), "blocks_0_0/filter/complex_weight": (6, 4, 8, 2),
            "norm/bias": (8,)}
  for path, shape in shapes.items():
    value = rng.standard_normal(shape)
    back = torch_keys.gfnet_from_torch(path, torch_keys.gfnet_to_torch(path, value))
    np.testing.assert_array_equal(back, value)
  assert torch_keys.gfnet_to_torch("pos_embed", np.zeros((1, 6, 6, 8))).shape == (1, 36, 8)
  with pytest.raises(ValueError):
    torch_keys.gfnet_from_torch("pos_embed", np.zeros((1, 35, 8)))


@pytest.mark.parametrize("config", [TINY_PYRAMID, TINY_PLAIN], ids=["pyramid", "plain"])
def test_parity_at_training_resolution(config):
  model = flax_model(config)
  params = random_params(model, seed=0)
  torch_model = torch_twin(config)
  state_dict = torch_state_dict(params)
  torch_model.load_state_dict(state_dict, strict=True)
  x = images((64, 64))
  error = relative_error(apply(model, params, x), ref.forward_nhwc(torch_model, x))
  assert error < 1e-5
  # from_torch inverts to_torch on every key.
  back = params_from_state_dict(state_dict, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_state_dict_format_gfnet():
  """riformer_jax.weights.torch_keys's "gfnet" format: torch_key, to_torch and from_torch."""
  model = flax_model(TINY_PYRAMID)
  params = random_params(model, seed=15)
  ours = torch_keys.state_dict_from_params(params, "gfnet")
  expected = torch_state_dict(params)
  assert set(ours) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
  abstract = counting.abstract_variables(model, 64)["params"]
  back = torch_keys.params_from_state_dict(ours, abstract, "gfnet")
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("config", [TINY_PYRAMID, TINY_PLAIN], ids=["pyramid", "plain"])
@pytest.mark.parametrize("resolution", [100, 40])
def test_parity_at_a_new_resolution(config, resolution):
  """Run-time resizing and `resize_gfnet_params` both equal the original's loader."""
  patch = config.get("patch_size", 4)
  model = flax_model(config)
  params = random_params(model, seed=1)
  torch_model = torch_twin(config, resolution)
  finetuned = ref.finetune_state_dict(torch_state_dict(params), resolution, patch)
  torch_model.load_state_dict(finetuned, strict=True)
  x = images((resolution, resolution), seed=2)
  expected = ref.forward_nhwc(torch_model, x)

  assert relative_error(apply(model, params, x), expected) < 1e-5
  resized_model = flax_model(config, img_size=resolution)
  resized = gfnet.resize_gfnet_params(params, resolution)
  assert relative_error(apply(resized_model, resized, x), expected) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               resized, params_from_state_dict(finetuned, resized))


def test_non_square_inputs():
  model = flax_model(TINY_PYRAMID)
  params = random_params(model, seed=3)
  x = images((72, 104), seed=4)
  runtime = apply(model, params, x)
  resized = gfnet.resize_gfnet_params(params, (72, 104))
  assert resized["blocks_0_0"]["filter"]["complex_weight"].shape == (18, 14, 8, 2)
  assert resized["pos_embed"].shape == (1, 18, 26, 8)
  once = apply(flax_model(TINY_PYRAMID, img_size=(72, 104)), resized, x)
  assert gfnet.params_resolution(resized) == (72, 104)
  assert gfnet.params_resolution(params) == (64, 64)
  assert runtime.shape == (2, 10) and np.isfinite(runtime).all()
  assert relative_error(runtime, once) < 1e-6


def test_taps_and_mixer_output():
  model = flax_model(TINY_PYRAMID)
  params = random_params(model, seed=5)
  x = images((64, 64), seed=6)
  _, state = apply(model, params, x, mutable=["intermediates"])
  taps = state["intermediates"]
  names = [f"blocks_{i}_{j}" for i, depth in enumerate(TINY_PYRAMID["depths"])
           for j in range(depth)]
  assert sorted(taps) == sorted(names)
  for name in names:
    stage = int(name.split("_")[1])
    shape = (2, 16 >> stage, 16 >> stage, TINY_PYRAMID["dims"][stage])
    for tap in ("block_input", "mixer_output", "block_output"):
      (value,) = taps[name][tap]
      assert value.shape == shape and value.dtype == jnp.float32, (name, tap)
  np.testing.assert_array_equal(taps["blocks_1_0"]["block_output"][0],
                                taps["blocks_1_1"]["block_input"][0])
  # mixer_output is filter(norm1(x)): the torch filter's output, per block.
  torch_model = torch_twin(TINY_PYRAMID)
  torch_model.load_state_dict(torch_state_dict(params))
  outputs = []
  for stage in torch_model.blocks:
    for block in stage:
      block.filter.register_forward_hook(lambda m, i, o: outputs.append(o.numpy()))
  ref.forward_nhwc(torch_model, x)
  for name, expected in zip(names, outputs):
    assert relative_error(taps[name]["mixer_output"][0], expected) < 1e-5, name


def test_num_classes_zero_returns_pooled_features():
  model = flax_model(TINY_PLAIN)
  params = random_params(model, seed=7)
  x = images((64, 64), seed=8)
  features = apply(flax_model(TINY_PLAIN, num_classes=0),
                   {k: v for k, v in params.items() if k != "head"}, x)
  assert features.shape == (2, TINY_PLAIN["dim"])
  logits = features @ params["head"]["kernel"] + params["head"]["bias"]
  assert relative_error(logits, apply(model, params, x)) < 1e-6


def test_bfloat16_compute_close_to_float32():
  model = flax_model(TINY_PYRAMID, init_values=0.5)
  params = random_params(model, seed=9)
  x = images((64, 64), seed=10)
  expected = apply(model, params, x)
  actual, state = apply(flax_model(TINY_PYRAMID, dtype=jnp.bfloat16), params, x,
                        mutable=["intermediates"])
  assert actual.dtype == jnp.float32
  assert state["intermediates"]["blocks_2_1"]["mixer_output"][0].dtype == jnp.float32
  assert relative_error(actual, expected) < 2e-2


def test_dropout_and_drop_path_in_training():
  config = dict(TINY_PLAIN, drop_rate=0.1, drop_path_rate=0.3, head_drop_rate=0.2)
  model = flax_model(config)
  params = random_params(model, seed=11)
  x = images((64, 64), seed=12)
  evaluated = apply(model, params, x)
  # An RBG key: XLA compiles its masks in a fraction of threefry's time.
  trained = apply(model, params, x, train=True,
                  rngs={"dropout": jax.random.key(0, impl="rbg")})
  assert np.isfinite(trained).all() and relative_error(trained, evaluated) > 1e-3
  deterministic = apply(flax_model(TINY_PLAIN), params, x, train=True)
  np.testing.assert_allclose(deterministic, evaluated, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError):
    flax_model(TINY_PLAIN, drop_path_rate=1.0)


@pytest.mark.heavy  # 54M parameters forward in both frameworks: not in `make check`
def test_full_size_gfnet_h_b():
  """The released architecture at 224, and at 64 with its filters (56, 29) ... (7, 4)
  resized on the fly."""
  model = riformer_jax.create_model("gfnet_h_b")
  params = random_params(model, seed=13)
  state_dict = torch_state_dict(params)
  config = gfnet.SIZES["gfnet_h_b"]
  for resolution in (224, 64):
    with torch.device("meta"):  # no init of 54M parameters: they are assigned below
      torch_model = ref.GFNetPyramid(resolution, embed_dim=config["dims"],
                                     depth=config["depths"]).eval()
    if resolution != 224:
      state_dict = ref.finetune_state_dict(state_dict, resolution, 4)
    torch_model.load_state_dict(state_dict, assign=True)
    x = images((resolution, resolution), seed=14)[:1]
    error = relative_error(apply(model, params, x), ref.forward_nhwc(torch_model, x))
    assert error < 1e-5, resolution
