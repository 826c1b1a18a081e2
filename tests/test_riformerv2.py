"""The paper's Table 9 student: RIFormer in the MetaFormer-baselines design
(`riformerv2_*`): its shape, its exact re-parameterisation, its initialisation from
each of the four v2 teachers, module imitation against them, and its ONNX graph."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import riformer_jax
from riformer_jax.deploy import onnx_graph
from riformer_jax.models import baselines, counting, registry
from riformer_jax.train import losses

from conftest import random_params, relative_error

SHAPE = dict(depths=(1, 2, 2, 1), dims=(16, 32, 64, 96), num_classes=10)
DESIGNS = {  # the student beside the 12-layer teachers, and beside ConvFormer/CAFormer
    "groupnorm": {}, "layernorm": dict(norm="layernorm", mlp_head=True)}


def images(count=2, size=64, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (count, size, size, 3)).astype(np.float32)


def test_the_student_is_poolformerv2_with_an_affine_mixer_and_a_biased_deploy_norm():
  student, deploy, teacher = (
      registry.create_model(name, **kwargs) for name, kwargs in (
          ("riformerv2_s12", {}), ("riformerv2_s12", {"deploy": True}),
          ("poolformerv2_s12", {})))
  count = lambda m: counting.count_params(counting.abstract_variables(m, 224))
  channels = sum(d * c for d, c in zip(student.depths, student.dims))  # over all blocks
  # Training form: PoolFormerV2-S12 plus the mixer's s and t; deploy: norm1 (scale
  # only) and the mixer become one norm with a scale and a bias.
  assert count(student) == count(teacher) + 2 * channels == 11_898_368
  assert count(deploy) == count(teacher) + channels
  assert counting.count_macs(student, 224) == counting.count_macs(teacher, 224)
  block = jax.eval_shape(deploy.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))[
      "params"]["stages_0"]["blocks_0"]
  assert set(block) == {"norm_reparam", "norm2", "mlp"}
  assert set(block["norm_reparam"]) == {"scale", "bias"} and set(block["norm2"]) == {
      "scale"}
  # 18 layers: ConvFormer-S18's stages.
  assert registry.model_kwargs("riformerv2_s18")["depths"] == (3, 3, 9, 3)
  assert registry.has_deploy_form(student) and not registry.has_deploy_form(deploy)
  assert not registry.has_deploy_form(teacher)
  with pytest.raises(ValueError, match="token_mixers=.*pooling.*no deploy form"):
    registry.create_model("poolformerv2_s12", deploy=True)


@pytest.mark.parametrize("design", DESIGNS)
def test_reparameterize_is_exact_on_random_params(design):
  student = riformer_jax.create_model("riformerv2_s12", **SHAPE, **DESIGNS[design])
  deploy = student.clone(deploy=True)
  x = images()
  params = random_params(student, x[:1], 3)
  fused = jax.jit(riformer_jax.reparameterize)(params)
  block = fused["stages_2"]["blocks_1"]
  assert "norm1" not in block and "token_mixer" not in block
  # The fold: gamma (s - 1) and, the bias-free norm's missing beta being 0, t.
  trained = params["stages_2"]["blocks_1"]
  np.testing.assert_allclose(
      block["norm_reparam"]["scale"],
      trained["norm1"]["scale"] * (trained["token_mixer"]["scale"] - 1), rtol=1e-6)
  np.testing.assert_array_equal(block["norm_reparam"]["bias"],
                                trained["token_mixer"]["bias"])
  expected = jax.jit(student.apply)({"params": params}, x)
  got = jax.jit(deploy.apply)({"params": fused}, x)
  assert float(jnp.std(expected)) > 0.1  # random params: logits far from zero
  assert relative_error(got, expected) < 1e-5
  # The deploy model refuses the training-form tree, by path.
  with pytest.raises(Exception, match="norm_reparam"):
    deploy.apply({"params": params}, x)


@pytest.mark.parametrize("teacher_name,design", [
    ("poolformerv2_s12", "groupnorm"), ("randformer_s12", "groupnorm"),
    ("convformer_s18", "layernorm"), ("caformer_s18", "layernorm")])
def test_the_student_takes_all_but_the_mixer_from_each_v2_teacher(teacher_name, design):
  size = teacher_name.split("_")[1]
  extra = {"img_size": 64} if teacher_name.startswith("randformer") else {}
  teacher = riformer_jax.create_model(teacher_name, **SHAPE, **extra)
  student = riformer_jax.create_model(f"riformerv2_{size}", **SHAPE, **DESIGNS[design])
  x = images()
  teacher_params = random_params(teacher, x[:1], 5)
  student_params = random_params(student, x[:1], 6)
  merged, report = riformer_jax.init_student_from_teacher(student_params, teacher_params)
  # Everything but the affine mixers came from the teacher, and only its mixers stay
  # unused (RandFormer's identity stages have none).
  assert report.left and all("/token_mixer/" in p for p in report.left)
  assert all("/token_mixer/" in p for p in report.unused)
  flat_teacher = traverse_util.flatten_dict(teacher_params, sep="/")
  flat_merged = traverse_util.flatten_dict(merged, sep="/")
  assert len(report.copied) == len(flat_merged) - len(report.left)
  for path in report.copied:
    np.testing.assert_array_equal(flat_merged[path], flat_teacher[path])

  # Module imitation on the pair: the same taps, the same blocks, finite and non-zero.
  taps = lambda model, params: jax.jit(lambda p: model.apply(
      {"params": p}, x, mutable=["intermediates"]))(params)[1]["intermediates"]
  blocks = ("stages_1/blocks_1", "stages_2/blocks_0", "stages_3/blocks_0")
  terms = losses.module_imitation(taps(student, merged), taps(teacher, teacher_params),
                                  blocks)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values()), terms


@pytest.mark.parametrize("design", DESIGNS)
def test_the_student_s_taps_are_its_mixer_s_input_and_output(design):
  student = riformer_jax.create_model("riformerv2_s12", **SHAPE, **DESIGNS[design])
  x = images()
  params = random_params(student, x[:1], 7)
  _, state = jax.jit(lambda p: student.apply({"params": p}, x,
                                             mutable=["intermediates"]))(params)
  block, taps = params["stages_2"]["blocks_0"], state["intermediates"]["stages_2"]
  normed = baselines._norm(student.norm, jnp.float32, "norm1").apply(
      {"params": block["norm1"]}, taps["blocks_0"]["block_input"][0])
  s, t = block["token_mixer"]["scale"], block["token_mixer"]["bias"]
  assert relative_error(taps["blocks_0"]["mixer_output"][0], s * normed + t - normed) < 1e-5


@pytest.mark.parametrize("name,kwargs", [
    ("riformerv2_s12", {}), ("riformerv2_s12", {"deploy": True}),
    ("riformerv2_s18", dict(DESIGNS["layernorm"], deploy=True)),
    ("poolformerv2_s12", {}), ("poolformerv2_s12", {"num_classes": 0})])
def test_the_onnx_graph_computes_what_the_flax_baseline_does(name, kwargs):
  import onnxruntime as ort  # noqa: PLC0415
  model = riformer_jax.create_model(name, **{**SHAPE, **kwargs})
  x = images(3, 32)
  params = jax.device_get(random_params(model, x[:1], 8))
  expected = np.asarray(jax.jit(model.apply)({"params": params}, x))
  for layout in ("NHWC", "NCHW"):
    graph = onnx_graph.baseline_model(params, token_mixers=model.token_mixers,
                                      norm=model.norm, resolution=32, layout=layout)
    session = ort.InferenceSession(graph.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = x if layout == "NHWC" else x.transpose(0, 3, 1, 2)
    assert relative_error(session.run(None, {"images": feed})[0], expected) < 1e-5, layout
  with pytest.raises(ValueError, match=r"not \['sepconv'\]"):
    onnx_graph.baseline_model(params, token_mixers=("sepconv",) * 4, norm="layernorm",
                              resolution=32)


def test_the_student_s_mixer_branches_start_at_zero_unless_the_conv_init_is_asked():
  """`affine_init="identity"` (the default) starts every block's mixer branch at 0, as
  v1's layer scale does (the v2 block has none); "conv", MMPreTrain's initialisation,
  starts it near -norm1(x), whole-sized."""
  x = images()
  largest = {}
  for init in baselines.AFFINE_INITS:
    student = riformer_jax.create_model("riformerv2_s12", **SHAPE, affine_init=init)
    variables = jax.jit(student.init)(jax.random.key(0), x)
    _, state = jax.jit(lambda v, s=student: s.apply(v, x, mutable=["intermediates"]))(
        variables)
    outputs = [block["mixer_output"][0] for stage in state["intermediates"].values()
               for block in stage.values()]
    assert len(outputs) == sum(SHAPE["depths"])
    largest[init] = max(float(jnp.abs(o).max()) for o in outputs)
  assert largest["identity"] == 0.0 and largest["conv"] > 0.5, largest
  with pytest.raises(ValueError, match="affine_init='zero'"):
    riformer_jax.create_model("riformerv2_s12", affine_init="zero")
