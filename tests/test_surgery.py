import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import riformer_jax
from conftest import TINY, numpy_randomize, random_params, relative_error

SIZES = ("s12", "s24", "s36", "m36", "m48")


def train_and_deploy(name, images, seed=0, **overrides):
  """Random (non-identity) training-time params, their fused form, both outputs."""
  train_model = riformer_jax.create_model(name, **overrides)
  deploy_model = riformer_jax.create_model(name, deploy=True, **overrides)
  # randomize's distributions drawn by numpy: jax.random compiles once per leaf shape.
  params = numpy_randomize(
      jax.eval_shape(train_model.init, jax.random.key(0), images)["params"], seed)
  deploy_params = riformer_jax.reparameterize(params)
  return (params, train_model.apply({"params": params}, images),
          deploy_params, deploy_model.apply({"params": deploy_params}, images))


# S12 and S24 in the default suite (and S12 at 224 below): the sizes differ only in
# depths and widths, which test_models.test_parameter_counts_match_reference checks for
# every size in both forms. The others run in `make test-all`.
@pytest.mark.parametrize("size", [size if size in ("s12", "s24") else
                                  pytest.param(size, marks=pytest.mark.slow)
                                  for size in SIZES])
def test_reparameterize_is_exact_for_every_size(size):
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  _, train_logits, _, deploy_logits = train_and_deploy(f"riformer_{size}", images)
  assert relative_error(deploy_logits, train_logits) <= 1e-5


def test_reparameterize_is_exact_for_full_s12_at_224():
  images = jax.random.normal(jax.random.key(2), (2, 224, 224, 3))
  _, train_logits, _, deploy_logits = train_and_deploy("riformer_s12", images, seed=5)
  assert relative_error(deploy_logits, train_logits) <= 1e-5


def test_equivalence_check_catches_a_wrong_fusion(images):
  # The same comparison with Eq. 4's "- 1" forgotten must fail by far, or the tests
  # above would prove nothing.
  params, train_logits, deploy_params, _ = train_and_deploy("riformer_s12", images, **TINY)
  flat = traverse_util.flatten_dict(params, sep="/")
  wrong = traverse_util.flatten_dict(deploy_params, sep="/")
  for path in wrong:
    if "norm_reparam" in path:
      block = path.split("/norm_reparam/")[0]
      s, t = flat[f"{block}/token_mixer/scale"], flat[f"{block}/token_mixer/bias"]
      gamma, beta = flat[f"{block}/norm1/scale"], flat[f"{block}/norm1/bias"]
      wrong[path] = gamma * s if path.endswith("scale") else beta * s + t
  deploy_model = riformer_jax.create_model("riformer_s12", deploy=True, **TINY)
  wrong_logits = deploy_model.apply(
      {"params": traverse_util.unflatten_dict(wrong, sep="/")}, images)
  assert relative_error(wrong_logits, train_logits) > 1e-2


def test_reparameterize_structure_and_untouched_leaves(images):
  params, _, deploy_params, _ = train_and_deploy("riformer_s12", images, **TINY)
  deploy_model = riformer_jax.create_model("riformer_s12", deploy=True, **TINY)
  expected = jax.eval_shape(deploy_model.init, jax.random.key(0), images)["params"]
  assert jax.tree.structure(deploy_params) == jax.tree.structure(expected)
  assert params["stem"]["kernel"] is deploy_params["stem"]["kernel"]
  block, fused = params["stages_2"]["blocks_1"], deploy_params["stages_2"]["blocks_1"]
  assert fused["mlp"]["fc1"]["kernel"] is block["mlp"]["fc1"]["kernel"]
  assert fused["norm2"] is block["norm2"]
  s, t = block["token_mixer"]["scale"], block["token_mixer"]["bias"]
  np.testing.assert_allclose(fused["norm_reparam"]["scale"], block["norm1"]["scale"] * (s - 1))
  np.testing.assert_allclose(fused["norm_reparam"]["bias"],
                             block["norm1"]["bias"] * (s - 1) + t)
  # The whole `variables` dict works as well.
  assert riformer_jax.reparameterize({"params": params})["params"].keys() == deploy_params.keys()


def test_reparameterize_rejects_params_without_affine_mixers(images):
  poolformer = riformer_jax.create_model("poolformer_s12", **TINY)
  with pytest.raises(ValueError, match="no block with `norm1` and an affine `token_mixer`"):
    riformer_jax.reparameterize(random_params(poolformer, images, 0))
  _, _, deploy_params, _ = train_and_deploy("riformer_s12", images, **TINY)
  with pytest.raises(ValueError, match="expected training-time RIFormer params"):
    riformer_jax.reparameterize(deploy_params)


def test_reparameterize_under_jit_on_sharded_params(images):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  # Seed 5: no fused entry cancels to near 0 (b * (s - 1) + t), where jit's fused
  # multiply-add and eager's two roundings would differ by more than rtol 1e-6.
  params, train_logits, expected, _ = train_and_deploy("riformer_s12", images, seed=5,
                                                       **TINY)
  # Shard every vector whose length divides by 8 (FSDP-like); replicate the rest.
  shard = lambda a: jax.device_put(a, NamedSharding(
      mesh, P("data") if a.ndim == 1 and a.shape[0] % 8 == 0 else P()))
  sharded = jax.tree.map(shard, params)
  fused = jax.jit(riformer_jax.reparameterize)(sharded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), fused, expected)
  norm_reparam = fused["stages_3"]["blocks_0"]["norm_reparam"]["scale"]
  assert norm_reparam.sharding.is_equivalent_to(
      sharded["stages_3"]["blocks_0"]["norm1"]["scale"].sharding, 1)
  assert len(norm_reparam.sharding.device_set) == 8
  deploy_model = riformer_jax.create_model("riformer_s12", deploy=True, **TINY)
  # Jitted: eagerly, every operation would compile for the sharded inputs.
  logits = jax.jit(deploy_model.apply)({"params": fused}, images)
  assert relative_error(logits, train_logits) <= 1e-5


def init_params(name, images, seed, **overrides):
  model = riformer_jax.create_model(name, **{**TINY, **overrides})
  return random_params(model, images, seed)


def test_init_student_from_teacher_copies_all_but_the_token_mixer(images):
  student = init_params("riformer_s12", images, seed=1)
  teacher = init_params("poolformer_s12", images, seed=2)
  new, report = riformer_jax.init_student_from_teacher(student, teacher)

  flat_new = traverse_util.flatten_dict(new, sep="/")
  flat_student = traverse_util.flatten_dict(student, sep="/")
  flat_teacher = traverse_util.flatten_dict(teacher, sep="/")
  assert set(report.copied) == set(flat_teacher)
  assert set(report.left) == {p for p in flat_student if "/token_mixer/" in p}
  assert len(report.left) == 2 * sum(TINY["depths"])
  assert report.unused == ()
  for path in report.copied:
    np.testing.assert_array_equal(flat_new[path], flat_teacher[path])
  for path in report.left:
    np.testing.assert_array_equal(flat_new[path], flat_student[path])
  assert jax.tree.structure(new) == jax.tree.structure(student)


def test_init_student_from_teacher_reports_and_errors(images):
  student = init_params("riformer_s12", images, seed=1)
  teacher = init_params("poolformer_s12", images, seed=2, num_classes=7)
  with pytest.raises(ValueError, match=r"head/fc/kernel: student \(32, 10\), teacher \(32, 7\)"):
    riformer_jax.init_student_from_teacher(student, teacher)
  new, report = riformer_jax.init_student_from_teacher(
      student, teacher, skip=("token_mixer", "head"))
  assert "head/fc/kernel" in report.left and "head/fc/kernel" in report.unused
  np.testing.assert_array_equal(new["head"]["fc"]["kernel"], student["head"]["fc"]["kernel"])

  # A deeper teacher: its extra blocks are reported unused, nothing breaks.
  deeper = init_params("poolformer_s12", images, seed=3, depths=(1, 2, 3, 1))
  _, report = riformer_jax.init_student_from_teacher(student, deeper)
  assert report.unused and all(p.startswith("stages_2/blocks_2/") for p in report.unused)


def test_init_student_from_teacher_under_jit_casts_to_student_dtype(images):
  student = init_params("riformer_s12", images, seed=1)
  teacher = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                         init_params("identityformer_s12", images, seed=2))
  new = jax.jit(lambda s, t: riformer_jax.init_student_from_teacher(s, t)[0])(student, teacher)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))
  np.testing.assert_array_equal(new["stem"]["kernel"],
                                teacher["stem"]["kernel"].astype(jnp.float32))


def test_deploy_taps_equal_training_time_taps(images):
  # Module imitation losses read `mixer_output`; fusing must not change what they see.
  params, _, deploy_params, _ = train_and_deploy("riformer_s12", images, **TINY)
  taps = {}
  for deploy, p in ((False, params), (True, deploy_params)):
    model = riformer_jax.create_model("riformer_s12", deploy=deploy, **TINY)
    taps[deploy] = model.apply({"params": p}, images, mutable=["intermediates"])[1]
  flat = {k: traverse_util.flatten_dict(v, sep="/") for k, v in taps.items()}
  assert flat[False].keys() == flat[True].keys()
  for path, (value,) in flat[False].items():
    assert relative_error(flat[True][path][0], value) <= 1e-5, path


@pytest.mark.parametrize("name,overrides", [("riformer_s12", TINY), ("riformer_s12", {})])
def test_fused_deploy_block_matches_the_deploy_form(name, overrides):
  deploy = riformer_jax.create_model(name, **overrides, deploy=True)
  fused = riformer_jax.create_model(name, **overrides, deploy=True, fused=True)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3)) * 3 + 1
  params = random_params(deploy, images[:1], seed=2)
  expected = deploy.apply({"params": params}, images)
  assert relative_error(fused.apply({"params": params}, images), expected) < 1e-5
  # The taps agree too, so analysis code can use either.
  _, taps = fused.apply({"params": params}, images, mutable=["intermediates"])
  _, reference = deploy.apply({"params": params}, images, mutable=["intermediates"])
  for a, b in zip(jax.tree.leaves(taps), jax.tree.leaves(reference)):
    assert relative_error(a, b) < 1e-5
  with pytest.raises(ValueError, match="needs deploy=True"):
    riformer_jax.create_model(name, fused=True)
