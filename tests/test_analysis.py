"""riformer_jax.analysis: ERFs, stage features and affine scales, and the command."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import riformer_jax
from riformer_jax import analysis
from riformer_jax.weights import store
from conftest import relative_error

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)
SIZE = 32


def tiny_params(name, seed, **overrides):
  """A tiny model and params far from their init (conftest.numpy_randomize's distributions,
  drawn by numpy: eager jax.random would compile once per shape)."""
  model = riformer_jax.create_model(name, **{**TINY, **overrides})
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 1:
      return jnp.asarray(rng.uniform(-0.25, 1.25, leaf.shape), jnp.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
  return model, jax.tree.map(draw, shapes["params"])


def with_layer_scales(params, value):
  """Layer scales set to `value`: at 0 every block is the identity, so a stage's output
  is the stack of strided convolutions before it."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat = {p: jnp.full_like(v, value) if "layer_scale" in p else v for p, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def images():
  return np.asarray(jax.random.normal(jax.random.key(3), (3, SIZE, SIZE, 3)))


@pytest.fixture(scope="module")
def riformer():
  return tiny_params("riformer_s12", seed=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny RIFormer, a tiny PoolFormer, and a copy of the RIFormer, as directories."""
  root = tmp_path_factory.mktemp("models")
  dirs = {}
  for label, name, seed in (("riformer", "riformer_s12", 1), ("poolformer", "poolformer_s12", 2),
                            ("copy", "riformer_s12", 1)):
    _, params = tiny_params(name, seed)
    dirs[label] = str(store.save_pretrained(root / label, name, TINY, params))
  return dirs


# ---------------------------------------------------------------- ERF


def test_erf_of_the_stem_is_its_kernel_footprint(images):
  model, params = tiny_params("riformer_s12", seed=4)
  params = with_layer_scales(params, 0.0)
  erf = analysis.erf_map(model, {"params": params}, images, stage=0)
  # The stem is 7x7/4 with padding 2: output (c, c), c = 32 / 4 / 2, sees input rows and
  # columns 4c - 2 ... 4c + 4, each with d centre / d pixel = sum over output channels.
  kernel = np.asarray(params["stem"]["kernel"], np.float64)  # (7, 7, 3, C)
  expected = np.zeros((SIZE, SIZE))
  lo = 4 * (SIZE // 8) - 2
  expected[lo:lo + 7, lo:lo + 7] = np.abs(kernel.sum(-1)).sum(-1)
  np.testing.assert_allclose(erf, expected, rtol=1e-5, atol=1e-7)


def test_erf_is_zero_outside_the_receptive_field_and_positive_inside(images):
  model, params = tiny_params("poolformer_s12", seed=5)
  erf = analysis.erf_map(model, {"params": with_layer_scales(params, 0.0)}, images, stage=1)
  # The 3x3/2 downsampling at the centre c = 2 of the 4x4 stage-1 output reads stem
  # outputs 3..5, which read input pixels 4 * 3 - 2 ... 4 * 5 + 4 = 10 ... 24.
  inside = np.zeros((SIZE, SIZE), bool)
  inside[10:25, 10:25] = True
  assert (erf[inside] > 0).all()
  assert (erf[~inside] == 0).all()
  assert erf[SIZE // 2, SIZE // 2] > 0


def test_erf_averages_per_image_gradients_whatever_the_batching(riformer, images):
  model, params = riformer
  one_by_one = analysis.erf_map(model, {"params": params}, images, stage=-1, batch_size=1)
  together = analysis.erf_map(model, {"params": params}, images, stage=3, batch_size=2)
  np.testing.assert_allclose(together, one_by_one, rtol=1e-5)
  # GroupNorm statistics reach every pixel: with its blocks on, the ERF is global.
  assert (one_by_one > 0).all()


def test_missing_stage_is_named(riformer, images):
  model, params = riformer
  with pytest.raises(ValueError, match="has 4 stage.*no stage 4"):
    analysis.erf_map(model, {"params": params}, images, stage=4)
  assert analysis.check_stage(model, {"params": params}, images, -1) == 3


def test_area_ratio_of_known_maps():
  point = np.zeros((9, 9))
  point[4, 4] = 2.0
  for t in analysis.THRESHOLDS:
    assert analysis.area_ratio(point, t) == 1 / 81
  uniform = np.ones((9, 9))
  assert analysis.area_ratio(uniform, 0.2) == 25 / 81  # 9/81 is not more than 20%
  assert analysis.area_ratio(uniform, 0.5) == 49 / 81
  assert analysis.area_ratio(uniform, 0.99) == 1.0
  # Even sizes: the square is centred on pixel (h // 2, w // 2) and clipped.
  assert analysis.area_ratio(np.ones((4, 4)), 0.99) == 1.0
  # RepLKNet takes ratios of log10(1 + x) / max, which equal those of log1p(x).
  erf = np.random.default_rng(0).gamma(0.5, 10.0, (33, 33))
  summary = analysis.erf_summary(erf)
  replknet = np.log10(erf + 1) / np.log10(erf + 1).max()
  for t in analysis.THRESHOLDS:
    assert summary["area_ratio_log"][str(t)] == analysis.area_ratio(replknet, t)
    assert summary["area_ratio_raw"][str(t)] == analysis.area_ratio(erf, t)
  image = analysis.erf_image(erf)
  assert image.min() == 0 and image.max() == 1


# ---------------------------------------------------------------- features


def test_stage_features_are_the_last_blocks_outputs(images):
  model, params = tiny_params("riformer_s12", seed=6, depths=(1, 2, 1, 1))
  features = analysis.stage_features(model, {"params": params}, images, batch_size=2)
  apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  taps = apply({"params": params}, images)[1]["intermediates"]
  last = ["stages_0/blocks_0", "stages_1/blocks_1", "stages_2/blocks_0", "stages_3/blocks_0"]
  assert len(features) == 4
  for got, path in zip(features, last):
    stage, block = path.split("/")
    assert relative_error(got, taps[stage][block]["block_output"][0]) < 1e-5


def test_stage_outputs_of_every_tap_layout():
  tap = lambda v: {"block_output": (np.full(2, v),)}
  metaformer = {"stages_0": {"blocks_0": tap(0), "blocks_2": tap(2), "blocks_10": tap(10)},
                "stages_1": {"downsample": {}, "blocks_0": tap(20)}}
  gfnet_h = {"blocks_1_0": tap(3), "blocks_0_0": tap(1), "blocks_0_1": tap(2)}
  gfnet = {"blocks_2": tap(2), "blocks_11": tap(11), "patch_embed": {}}
  first = lambda outs: [int(o[0]) for o in outs]
  assert first(analysis.stage_outputs(metaformer)) == [10, 20]
  assert first(analysis.stage_outputs(gfnet_h)) == [2, 3]
  assert first(analysis.stage_outputs(gfnet)) == [11]
  with pytest.raises(ValueError, match="no block taps"):
    analysis.stage_outputs({"head": {}})


def test_feature_stats_are_numpys():
  x = np.random.default_rng(1).standard_normal((2, 4, 4, 8)).astype(np.float32) * 3 + 1
  stats = analysis.feature_stats(x)
  x64 = x.astype(np.float64)
  assert stats["mean"] == pytest.approx(np.mean(x64), rel=1e-12)
  assert stats["std"] == pytest.approx(np.std(x64), rel=1e-12)
  assert (stats["min"], stats["max"]) == (x.min(), x.max())
  for q in analysis.QUANTILES:
    assert stats["quantiles"][str(q)] == pytest.approx(np.quantile(x64, q), rel=1e-12)


def test_feature_distances():
  b = np.random.default_rng(2).standard_normal((2, 4, 4, 8))
  assert analysis.feature_distance(b, b) == {"wasserstein": 0.0, "relative_l2": 0.0,
                                             "cosine": pytest.approx(1.0)}
  doubled = analysis.feature_distance(2 * b, b)
  assert doubled["relative_l2"] == pytest.approx(1.0)
  assert doubled["cosine"] == pytest.approx(1.0)
  assert analysis.feature_distance(b + 0.5, b)["wasserstein"] == pytest.approx(0.5)
  assert analysis.feature_distance(-b, b)["cosine"] == pytest.approx(-1.0)
  # Different shapes (e.g. another teacher width): only the distributions compare.
  assert set(analysis.feature_distance(b[:, :2], b)) == {"wasserstein"}


# ---------------------------------------------------------------- affine


def test_affine_scales_read_back_with_the_effective_convention(riformer):
  _, params = riformer
  flat = traverse_util.flatten_dict(params, sep="/")
  for path in flat:
    if path.endswith("token_mixer/scale"):
      flat[path] = jnp.linspace(-1.0, 2.0, flat[path].shape[0])
  params = traverse_util.unflatten_dict(flat, sep="/")
  scales = analysis.affine_scales(params)
  assert list(scales) == [f"stages_{i}/blocks_0" for i in range(4)]
  for block, values in scales.items():
    stage, name = block.split("/")
    mixer = params[stage][name]["token_mixer"]
    np.testing.assert_array_equal(values["scale"], mixer["scale"])
    np.testing.assert_array_equal(values["bias"], mixer["bias"])
    np.testing.assert_allclose(values["effective_scale"], np.asarray(mixer["scale"]) - 1)
    # The convention is the factor that re-parameterisation folds into norm1's scale.
    fused = riformer_jax.reparameterize(params)[stage][name]["norm_reparam"]["scale"]
    np.testing.assert_allclose(fused, params[stage][name]["norm1"]["scale"]
                               * values["effective_scale"], rtol=1e-6)
  # The mixer's output really is effective_scale * x + bias.
  x = jnp.arange(8.0)
  mixer = params["stages_0"]["blocks_0"]["token_mixer"]
  out = riformer_jax.models.metaformer.Affine().apply({"params": mixer}, x)
  np.testing.assert_allclose(out, scales["stages_0/blocks_0"]["effective_scale"] * x
                             + mixer["bias"], rtol=1e-6, atol=1e-6)


def test_affine_scales_refuse_models_without_the_mixer(riformer):
  _, poolformer = tiny_params("poolformer_s12", seed=7)
  with pytest.raises(ValueError, match="no affine token mixer.*PoolFormer"):
    analysis.affine_scales(poolformer)
  with pytest.raises(ValueError, match="deploy-form.*norm_reparam"):
    analysis.affine_scales(riformer_jax.reparameterize(riformer[1]))


def test_load_images_resizes_other_data_sets(tmp_path):
  """A folder data set goes through timm's resize and 0.9 centre crop by default."""
  rng = np.random.default_rng(0)
  for i in range(3):
    (tmp_path / "test" / f"class_{i}").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50, 3), np.uint8)).save(
        tmp_path / "test" / f"class_{i}" / "a.png")
  images = analysis.load_images("folder", "test", 5, SIZE, data_dir=str(tmp_path))
  assert images.shape == (3, SIZE, SIZE, 3) and np.isfinite(images).all()
  assert abs(images.mean()) < 1  # normalised
  with pytest.raises(ValueError, match="synthetic images are 96 px"):
    analysis.load_images("synthetic", "test", 1, 128)


# ---------------------------------------------------------------- the command


def test_default_labels_tell_the_directories_apart():
  dirs = ["/runs/demo/teacher/student", "/runs/demo/distilled/student", "/x/deploy"]
  assert analysis._labels(dirs, None) == [  # noqa: SLF001
      "teacher/student", "distilled/student", "x/deploy"]


def run(*args):
  return analysis.main([str(a) for a in args])


def test_erf_command_writes_what_the_functions_compute(saved, tmp_path, capsys):
  out = tmp_path / "erf"
  assert run("erf", "--models", saved["riformer"], saved["poolformer"], "--labels", "RIF",
             "PF", "--resolution", SIZE, "--num_images", 3, "--out", out) == 0
  images = analysis.load_images("synthetic", "test", 3, SIZE)
  assert images.shape == (3, SIZE, SIZE, 3)
  numbers = json.loads((out / "erf.json").read_text())
  assert numbers["num_images"] == 3 and numbers["resolution"] == [SIZE, SIZE]
  arrays = np.load(out / "erf.npz")
  module, variables = riformer_jax.load_pretrained(saved["riformer"])
  np.testing.assert_allclose(arrays["RIF"], analysis.erf_map(module, variables, images),
                             rtol=1e-5)
  assert not np.allclose(arrays["PF"], arrays["RIF"])
  for label in ("RIF", "PF"):
    assert numbers["models"][label]["stage"] == 3
    assert numbers["models"][label]["area_ratio_log"] == analysis.erf_summary(
        arrays[label])["area_ratio_log"]
  assert (out / "erf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "RIF (stage 3): area ratio" in capsys.readouterr().out


def test_features_command_identical_models_are_at_distance_zero(saved, tmp_path):
  out = tmp_path / "features"
  assert run("features", "--models", saved["riformer"], saved["copy"],
             "--resolution", SIZE, "--num_images", 2, "--out", out) == 0
  numbers = json.loads((out / "features.json").read_text())
  assert list(numbers["models"]) == ["riformer", "copy"]  # the directory names
  assert numbers["reference"] == "riformer"
  for distance in numbers["models"]["copy"]["distance_to_reference"]:
    assert distance["relative_l2"] == 0 and distance["wasserstein"] == 0
    assert distance["cosine"] == pytest.approx(1.0)
  module, variables = riformer_jax.load_pretrained(saved["riformer"])
  images = analysis.load_images("synthetic", "test", 2, SIZE)
  for stats, features in zip(numbers["models"]["riformer"]["stages"],
                             analysis.stage_features(module, variables, images)):
    assert stats["shape"] == list(features.shape)
    expected = analysis.feature_stats(features)
    assert stats["mean"] == pytest.approx(expected["mean"], rel=1e-5, abs=1e-6)
    assert stats["quantiles"]["0.5"] == pytest.approx(expected["quantiles"]["0.5"],
                                                      rel=1e-5, abs=1e-6)
  arrays = np.load(out / "features.npz")
  for i in range(4):
    density, edges = arrays[f"copy:stage_{i}:density"], arrays[f"stage_{i}:edges"]
    np.testing.assert_array_equal(density, arrays[f"riformer:stage_{i}:density"])
    assert np.sum(density * np.diff(edges)) == pytest.approx(1.0)
  assert (out / "features.png").stat().st_size > 0


def test_affine_command_saves_the_params(saved, tmp_path):
  out = tmp_path / "affine"
  assert run("affine", "--models", saved["riformer"], "--blocks", "0/0", "3/0",
             "--out", out) == 0
  _, variables = riformer_jax.load_pretrained(saved["riformer"])
  mixer = variables["params"]["stages_3"]["blocks_0"]["token_mixer"]
  arrays = np.load(out / "affine.npz")
  np.testing.assert_array_equal(arrays["riformer:stages_3/blocks_0:scale"], mixer["scale"])
  np.testing.assert_array_equal(arrays["riformer:stages_3/blocks_0:effective_scale"],
                                np.asarray(mixer["scale"]) - np.float32(1))
  numbers = json.loads((out / "affine.json").read_text())
  block = numbers["riformer"]["blocks"]["stages_3/blocks_0"]
  assert block["channels"] == 32
  assert block["mean_abs"] == pytest.approx(float(np.abs(np.asarray(mixer["scale"]) - 1).mean()))
  assert (out / "affine.png").exists() and (out / "affine_blocks.png").exists()


@pytest.mark.parametrize("args,message", [
    (["erf", "--models", "{missing}"], "{missing}: no such model directory"),
    (["erf", "--models", "{poolformer}", "--stage", "7"], "{poolformer}: MetaFormer has 4"),
    (["affine", "--models", "{poolformer}"], "{poolformer} (poolformer_s12): no affine"),
    (["affine", "--models", "{riformer}", "--blocks", "2/9"],
     "no block stages_2/blocks_9; it has stages_0/blocks_0"),
    (["affine", "--models", "{riformer}", "--blocks", "stage2"], "expected STAGE/BLOCK"),
    (["affine", "--models", "{riformer}", "{copy}", "--labels", "a"], "1 --labels for 2"),
    (["features", "--models", "{riformer}", "--reference", "x"],
     "--reference 'x' is none of the labels"),
    (["erf", "--models", "{riformer}", "--resolution", "128"], "--crop_pct 1"),
    (["affine", "--models", "{riformer}", "{riformer}"], "same directory twice"),
])
def test_bad_inputs_are_named(saved, tmp_path, capsys, args, message):
  names = dict(saved, missing=str(tmp_path / "nowhere"))
  args = [a.format(**names) for a in args] + ["--out", str(tmp_path / "out")]
  assert analysis.main(args) == 1
  assert message.format(**names) in capsys.readouterr().err
