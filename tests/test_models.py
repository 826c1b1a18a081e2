import functools
import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import riformer_jax
from riformer_jax.models import counting, metaformer
from conftest import TINY, numpy_randomize, random_params, relative_error

SIZES = ("s12", "s24", "s36", "m36", "m48")
# docs/reference.md section 1 (1000 classes): training-time and deploy parameter counts.
PARAMS = {
    "s12": (11_921_832, 11_915_176),
    "s24": (21_402_280, 21_388_968),
    "s36": (30_882_728, 30_862_760),
    "m36": (56_199_016, 56_172_520),
    "m48": (73_508_776, 73_473_448),
}
GMACS_224 = {"s12": 1.82, "s24": 3.41, "s36": 5.00, "m36": 8.80, "m48": 11.59}
GMACS_384 = {"s12": 5.36, "s24": 10.03, "s36": 14.70, "m36": 25.87, "m48": 34.06}


def n_params(name, **overrides):
  model = riformer_jax.create_model(name, **overrides)
  return counting.count_params(counting.abstract_variables(model, 64))


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_match_reference(size):
  train, deploy = PARAMS[size]
  assert n_params(f"riformer_{size}") == train
  assert n_params(f"riformer_{size}", deploy=True) == deploy
  # IdentityFormer has the deploy structure; PoolFormer's mixer has no parameters.
  assert n_params(f"identityformer_{size}") == deploy
  assert n_params(f"poolformer_{size}") == deploy
  assert n_params(f"poolformer_{size}", head="timm") == deploy


@pytest.mark.parametrize("size", SIZES)
def test_macs_within_one_percent_of_published(size):
  for resolution, published in ((224, GMACS_224), (384, GMACS_384)):
    for deploy in (False, True):
      model = riformer_jax.create_model(f"riformer_{size}", deploy=deploy)
      macs = counting.count_macs(model, resolution) / 1e9
      assert abs(macs / published[size] - 1) < 0.01, (size, resolution, deploy, macs)


def test_macs_counts_every_matmul_and_conv():
  # S12 at 224 in closed form: stem, three downsamplings, two MLP matmuls per block, fc.
  dims, depths, hw = (64, 128, 320, 512), (2, 2, 6, 2), (56, 28, 14, 7)
  expected = hw[0] ** 2 * dims[0] * 7 * 7 * 3
  for i in range(4):
    if i:
      expected += hw[i] ** 2 * dims[i] * 3 * 3 * dims[i - 1]
    expected += depths[i] * 2 * hw[i] ** 2 * dims[i] * 4 * dims[i]
  expected += dims[-1] * 1000
  assert counting.count_macs(riformer_jax.create_model("riformer_s12"), 224) == expected


def test_registry_lists_all_families_and_rejects_bad_input():
  names = riformer_jax.list_models()
  for family in ("riformer", "identityformer", "poolformer"):
    assert {f"{family}_{s}" for s in SIZES} <= set(names)
  with pytest.raises(ValueError, match="unknown model 'riformer_s13'"):
    riformer_jax.create_model("riformer_s13")
  with pytest.raises(TypeError, match="unknown argument.*'num_clases'"):
    riformer_jax.create_model("riformer_s12", num_clases=10)
  with pytest.raises(ValueError, match="token_mixer='pooling' has no deploy form"):
    riformer_jax.create_model("poolformer_s12", deploy=True)
  with pytest.raises(ValueError, match="head='bogus'"):
    riformer_jax.create_model("poolformer_s12", head="bogus")
  with pytest.raises(ValueError, match="drop_path_rate=1.5"):
    riformer_jax.create_model("riformer_s12", drop_path_rate=1.5)


def test_create_model_overrides_and_layer_scale_init():
  model = riformer_jax.create_model("riformer_s36", num_classes=7, dtype=jnp.bfloat16)
  assert (model.num_classes, model.dtype, model.layer_scale_init_value) == (7, jnp.bfloat16, 1e-6)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  assert params["head"]["fc"]["kernel"].shape == (512, 7)
  # Init's own values under jit, from the RBG generator (which XLA compiles in a
  # fraction of threefry's time): constants and ones do not depend on the generator.
  variables = jax.jit(riformer_jax.create_model("riformer_s12", **TINY).init)(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
  block = variables["params"]["stages_0"]["blocks_0"]
  np.testing.assert_array_equal(block["layer_scale1"], np.full(8, 1e-5, np.float32))
  np.testing.assert_array_equal(block["norm1"]["scale"], np.ones(8, np.float32))


def test_output_shapes_and_features_mode(images):
  model = riformer_jax.create_model("riformer_s12", **TINY)
  variables = {"params": random_params(model, images, 0)}
  logits = jax.jit(model.apply)(variables, images)  # one compilation, not one per op
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  features_model = riformer_jax.create_model("riformer_s12", **{**TINY, "num_classes": 0})
  params = random_params(features_model, images, 0)
  assert "fc" not in params["head"]
  assert jax.jit(features_model.apply)({"params": params}, images).shape == (2, 32)
  with pytest.raises(ValueError, match="expected NHWC images"):
    model.apply(variables, images[0])


def test_odd_resolution_follows_pytorch_floor_semantics():
  # 7x7/4 pad 2 then three 3x3/2 pad 1: 97 -> 24 -> 12 -> 6 -> 3; 131 -> 33 -> 17 -> 9 -> 5.
  model = riformer_jax.create_model("poolformer_s12", **TINY)
  x = jax.ShapeDtypeStruct((1, 97, 131, 3), jnp.float32)  # shapes are the claim: traced
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, state = jax.eval_shape(functools.partial(model.apply, mutable=["intermediates"]),
                            variables, x)
  shapes = [state["intermediates"][f"stages_{i}"]["blocks_0"]["block_output"][0].shape[1:3]
            for i in range(4)]
  assert shapes == [(24, 33), (12, 17), (6, 9), (3, 5)]


def test_pooling_excludes_padding_at_borders():
  x = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3) ** 1.5
  out = np.asarray(metaformer.Pooling().apply({}, x))
  xn = np.asarray(x)
  expected = np.empty_like(xn)
  for i in range(4):
    for j in range(5):
      window = xn[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      expected[:, i, j] = window.mean(axis=(1, 2))  # the mean of the real pixels only
  np.testing.assert_allclose(out, expected - xn, rtol=1e-6, atol=1e-4)
  # A corner averages 4 pixels, an edge 6: dividing by 9 would be visibly off.
  assert not np.allclose(out[:, 0, 0], xn[:, :2, :2].sum((1, 2)) / 9 - xn[:, 0, 0])


def test_drop_path_rates_ramp_linearly_over_all_blocks():
  per_stage = metaformer.stagewise_drop_path_rates((2, 2, 6, 2), 0.1)
  np.testing.assert_allclose(sum(per_stage, []), [0.1 * k / 11 for k in range(12)])
  assert [len(stage) for stage in per_stage] == [2, 2, 6, 2]


def test_drop_path_and_dropout_inactive_at_eval_active_in_training(images):
  stochastic = riformer_jax.create_model(
      "riformer_s12", **TINY, drop_path_rate=0.5, drop_rate=0.3)
  plain = riformer_jax.create_model("riformer_s12", **TINY)
  variables = {"params": random_params(plain, images, 1)}
  # Jitted: one compilation per program instead of one per operation.
  evaluate = lambda model: jax.jit(functools.partial(model.apply, train=False))(  # noqa: E731
      variables, images)
  eval_logits = evaluate(stochastic)
  np.testing.assert_array_equal(eval_logits, evaluate(plain))

  run = jax.jit(lambda v, x, key: stochastic.apply(v, x, train=True, rngs={"dropout": key}))
  # RBG keys: XLA compiles their masks in a fraction of threefry's time.
  train = lambda seed: run(variables, images, jax.random.key(seed, impl="rbg"))  # noqa: E731
  assert not np.allclose(train(0), eval_logits)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))
  with pytest.raises(flax.errors.InvalidRngError):
    stochastic.apply(variables, images, train=True)


def test_drop_path_drops_whole_samples():
  block = metaformer.MetaFormerBlock(token_mixer="affine", drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (32, 4, 4, 8))
  params = numpy_randomize(jax.eval_shape(functools.partial(block.init, train=False),
                                          jax.random.key(1), x)["params"], 2)
  params["layer_scale2"] = jnp.zeros(8)  # leave only the mixer branch
  out, state = block.apply({"params": params}, x, train=True,
                           rngs={"dropout": jax.random.key(3)}, mutable=["intermediates"])
  branch = np.asarray(params["layer_scale1"] * state["intermediates"]["mixer_output"][0])
  delta = np.asarray(out - x)
  kept = [np.allclose(d, 2 * b, rtol=1e-5, atol=1e-6) for d, b in zip(delta, branch)]
  dropped = [np.all(d == 0) for d in delta]
  assert all(k != d for k, d in zip(kept, dropped))  # each sample: all kept or all dropped
  assert 0 < sum(kept) < 32


def intermediates(name, images, **overrides):
  model = riformer_jax.create_model(name, **TINY, **overrides)
  variables = {"params": random_params(model, images, 0)}  # numpy: no init compiles
  logits, state = model.apply(variables, images, mutable=["intermediates"])
  return variables, logits, state["intermediates"]


def test_sow_taps_pair_student_and_teacher_block_by_block(images):
  _, _, student = intermediates("riformer_s12", images)
  _, _, teacher = intermediates("poolformer_s12", images)
  _, _, identity = intermediates("identityformer_s12", images)
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  assert shapes(student) == shapes(teacher) == shapes(identity)
  flat = flax.traverse_util.flatten_dict(student, sep="/")
  expected_hw = {0: 16, 1: 8, 2: 4, 3: 2}
  n_blocks = 0
  for i, depth in enumerate(TINY["depths"]):
    for j in range(depth):
      for tap in ("block_input", "mixer_output", "block_output"):
        (value,) = flat[f"stages_{i}/blocks_{j}/{tap}"]
        hw = expected_hw[i]
        assert value.shape == (2, hw, hw, TINY["dims"][i])
      n_blocks += 1
  assert len(flat) == 3 * n_blocks
  # Consecutive blocks chain: the output of one block is the input of the next.
  np.testing.assert_array_equal(flat["stages_1/blocks_0/block_output"][0],
                                flat["stages_1/blocks_1/block_input"][0])


def test_mixer_output_tap_is_the_mixer_minus_its_input(images):
  variables, _, taps = intermediates("poolformer_s12", images)
  block = taps["stages_0"]["blocks_0"]
  params = variables["params"]["stages_0"]["blocks_0"]
  normed = metaformer.GroupNorm1().apply({"params": params["norm1"]}, block["block_input"][0])
  expected = metaformer.Pooling().apply({}, normed)
  np.testing.assert_allclose(block["mixer_output"][0], expected, rtol=1e-5, atol=1e-6)


def test_capturing_costs_nothing_when_not_requested(images):
  model = riformer_jax.create_model("riformer_s12", **TINY)
  variables = {"params": random_params(model, images, 0)}
  plain = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
  captured = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"])) \
      .lower(variables, images).compile()
  logits_bytes = 2 * 10 * 4
  assert plain.memory_analysis().output_size_in_bytes == logits_bytes
  assert captured.memory_analysis().output_size_in_bytes > 100 * logits_bytes
  assert "intermediates" not in variables


def _reduction_dtypes(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum":
      yield eqn.invars[0].aval.dtype
    for sub in counting._subjaxprs(eqn):
      yield from _reduction_dtypes(sub)


def test_bfloat16_compute_stays_close_to_float32():
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  f32 = riformer_jax.create_model("riformer_s12", num_classes=10)
  bf16 = riformer_jax.create_model("riformer_s12", num_classes=10, dtype=jnp.bfloat16)
  params = random_params(f32, images, 3)  # numpy draws: no per-shape init compiles
  # Jitted, as in training: one compilation each instead of one per operation.
  expected = jax.jit(f32.apply)({"params": params}, images)
  actual, state = jax.jit(functools.partial(bf16.apply, mutable=["intermediates"]))(
      {"params": params}, images)
  assert actual.dtype == jnp.float32
  assert relative_error(actual, expected) < 1.5e-2  # measured: 2.4e-3
  taps = state["intermediates"]["stages_2"]["blocks_0"]
  assert taps["mixer_output"][0].dtype == jnp.bfloat16
  assert taps["block_output"][0].dtype == jnp.float32  # residual stream
  # Norm statistics (every reduce_sum in the program) are computed in float32.
  jaxpr = jax.make_jaxpr(lambda p, x: bf16.apply({"params": p}, x))(params, images)
  dtypes = set(_reduction_dtypes(jaxpr.jaxpr))
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_configs_build_the_reference_models():
  for size in SIZES:
    config = importlib.import_module(f"configs.{size}").get_config()
    model = riformer_jax.create_model(config.model_name, **config.model)
    assert model.drop_path_rate == 0.1
    params = counting.abstract_variables(model, config.resolution)
    assert counting.count_params(params) == PARAMS[size][0]


def test_summary_command_prints_the_reference_counts(capsys):
  from riformer_jax.models import summary
  summary.main(["riformer_s12", "poolformer_s12"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split() == ["riformer_s12", "train", "11,921,832", "1.812"]
  assert lines[2].split() == ["riformer_s12", "deploy", "11,915,176", "1.812"]
  assert lines[3].split() == ["poolformer_s12", "11,915,176", "1.812"]
  with pytest.raises(SystemExit):
    summary.main(["riformer_s99"])
  assert "unknown model 'riformer_s99'" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a ZeroDivisionError's traceback before
    summary.main(["poolformer_s12", "--resolution", "7"])
  assert "--resolution 7: the models downsample by 32" in capsys.readouterr().err
  # RandFormer's matrices are built for the size asked (a ValueError's traceback before).
  summary.main(["randformer_s12", "--resolution", "384"])
  assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["randformer_s12",
                                                                 "13,923,840"]


def test_table_8_s_slimmed_poolformers_have_the_shapes_docs_models_states():
  """S9: S12 with the third stage halved (2-2-3-2); XS12: 5/6 of each width, to a
  multiple of 8. Counts and MACs at 224 as docs/models.md and BENCHMARKS.md give them."""
  expected = {"poolformer_s9": ((2, 2, 3, 2), (64, 128, 320, 512), 9_447_016, 1.331),
              "poolformer_xs12": ((2, 2, 6, 2), (56, 104, 264, 424), 8_217_200, 1.255),
              "poolformer_s12": ((2, 2, 6, 2), (64, 128, 320, 512), 11_915_176, 1.812)}
  for name, (depths, dims, params, gmacs) in expected.items():
    model = riformer_jax.create_model(name)
    assert (tuple(model.depths), tuple(model.dims)) == (depths, dims), name
    assert counting.count_params(counting.abstract_variables(model, 224)) == params, name
    assert counting.count_macs(model, 224) / 1e9 == pytest.approx(gmacs, abs=1e-3), name
  assert [round(5 * d / 6 / 8) * 8 for d in (64, 128, 320, 512)] == [56, 104, 264, 424]


def test_group_norm1_keeps_its_digits_at_large_per_sample_means():
  """Deep residual streams carry per-sample means far above their spread; GroupNorm1's
  two-pass variance stays within 1e-4 of a float64 reference there, where a one-pass
  E[x^2] - E[x]^2 (flax's `use_fast_variance`) does not. Same parameter names as flax."""
  rng = np.random.default_rng(0)
  means = np.array([300.0, -300.0]).reshape(2, 1, 1, 1)
  x = (means + rng.normal(size=(2, 7, 7, 48))).astype(np.float32)
  scale, bias = rng.normal(size=48).astype(np.float32), rng.normal(size=48).astype(
      np.float32)
  params = {"params": {"scale": scale, "bias": bias}}
  x64 = x.astype(np.float64)
  centred = x64 - x64.mean(axis=(1, 2, 3), keepdims=True)
  expected = centred / np.sqrt((centred ** 2).mean(axis=(1, 2, 3), keepdims=True)
                               + 1e-5) * scale + bias
  ours = metaformer.GroupNorm1().apply(params, x)
  assert relative_error(ours, expected) < 1e-4
  one_pass = flax.linen.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=True)
  assert relative_error(one_pass.apply(params, x), expected) > 1e-4
  flax_tree = one_pass.init(jax.random.key(0), x)
  ours_tree = metaformer.GroupNorm1().init(jax.random.key(0), x)
  assert jax.tree.structure(flax_tree) == jax.tree.structure(ours_tree)
  assert jax.tree.map(np.shape, flax_tree) == jax.tree.map(np.shape, ours_tree)
