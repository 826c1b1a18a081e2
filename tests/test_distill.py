"""The fused distillation step: loss composition, no retracing, sharding, accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riformer_jax
from riformer_jax import distill, losses, optim
from conftest import TINY

BLOCKS = ("stages_1/blocks_1", "stages_2/blocks_0")


def weights(**on):
  return {t: jnp.float32(on.get(t, 0.0)) for t in distill.TERMS}


@pytest.fixture(scope="module")
def setup():
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10
  student = riformer_jax.create_model("riformer_s12", **TINY)
  teacher = riformer_jax.create_model("poolformer_s12", **TINY)
  params = student.init(jax.random.key(1), images[:1])["params"]
  teacher_vars = teacher.init(jax.random.key(2), images[:1])
  return images, labels, student, params, distill.Teacher(teacher, teacher_vars)


def make_distiller(student, **kwargs):
  schedule = optim.learning_rate_schedule(1e-3, total_steps=10, warmup_steps=2)
  return distill.Distiller(student=student, optimizer=optim.make_optimizer(schedule),
                           num_classes=10, mi_blocks=BLOCKS, schedule=schedule, **kwargs)


def test_terms_are_the_losses_of_the_mixed_batch(setup):
  images, labels, student, params, teacher = setup
  distiller = make_distiller(student, mix=None)
  state = distiller.init_state(params)
  w = weights(ce=1.0, hard_kd=1.0, soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0)
  _, metrics = jax.jit(distiller.train_step)(state, images, labels, w, jax.random.key(0),
                                             teacher, teacher)
  # No mixing and no dropout in TINY: the terms are the plain losses.
  logits, taps = student.apply({"params": params}, images, mutable=["intermediates"])
  _, teacher_taps = teacher.module.apply(teacher.variables, images, mutable=["intermediates"])
  teacher_logits = teacher.module.apply(teacher.variables, images)
  mi = losses.module_imitation(taps["intermediates"], teacher_taps["intermediates"], BLOCKS)
  expected = {
      "ce": losses.cross_entropy(logits, jax.nn.one_hot(labels, 10)),
      "hard_kd": losses.hard_distillation(logits, teacher_logits),
      "soft_kd": losses.soft_distillation(logits, teacher_logits),
      "mi_in": mi["in"], "mi_out": mi["out"], "mi_rel": mi["rel"]}
  for term, value in expected.items():
    np.testing.assert_allclose(metrics[f"loss/{term}"], value, rtol=1e-5, err_msg=term)
  np.testing.assert_allclose(metrics["loss/total"], sum(expected.values()), rtol=1e-5)


def test_switching_terms_off_skips_them_without_recompiling(setup):
  images, labels, student, params, teacher = setup
  distiller = make_distiller(student)
  traces = []

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, w):
    traces.append(1)
    return distiller.train_step(state, images, labels, w, jax.random.key(0), teacher,
                                teacher)

  state = distiller.init_state(jax.tree.map(jnp.copy, params))  # donated below
  state, on = step(state, weights(soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0))
  state, off = step(state, weights(soft_kd=1.0))
  state, ce_only = step(state, weights(ce=1.0))
  assert len(traces) == 1
  assert all(float(on[f"loss/{t}"]) > 0 for t in ("soft_kd", "mi_in", "mi_out", "mi_rel"))
  assert all(float(off[f"loss/{t}"]) == 0 for t in ("mi_in", "mi_out", "mi_rel"))
  assert float(off["loss/soft_kd"]) > 0
  assert float(ce_only["loss/soft_kd"]) == 0 and float(ce_only["loss/hard_kd"]) == 0
  assert int(state.step) == 3


def _run(distiller, params, images, labels, teacher, mesh, steps=2):
  data = distill.data_sharding(mesh)
  state = distiller.init_state(jax.tree.map(jnp.copy, params))  # donated below
  state = jax.device_put(state, distill.replicated(mesh))
  images, labels = jax.device_put((images, labels), data)
  teacher = jax.device_put(teacher, distill.replicated(mesh))
  step = jax.jit(distiller.train_step, donate_argnums=0)
  w = weights(soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0)
  for _ in range(steps):
    state, metrics = step(state, images, labels, w, jax.random.key(3), teacher, teacher)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_eight_devices_match_one(setup):
  images, labels, student, params, teacher = setup
  distiller = make_distiller(student)
  one = _run(distiller, params, images, labels, teacher, distill.make_mesh(jax.devices()[:1]))
  eight = _run(distiller, params, images, labels, teacher, distill.make_mesh())
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(one[1]["loss/total"], eight[1]["loss/total"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(eight[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_accumulation_gives_the_large_batch_update(setup):
  images, labels, student, params, teacher = setup
  mesh = distill.make_mesh()
  whole = _run(make_distiller(student), params, images, labels, teacher, mesh)
  accumulated = _run(make_distiller(student, accum_steps=2), params, images, labels,
                     teacher, mesh)
  np.testing.assert_allclose(whole[1]["loss/total"], accumulated[1]["loss/total"],
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(whole[0]), jax.tree.leaves(accumulated[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_weight_decay_only_on_kernels(setup):
  *_, params, _ = setup
  mask = optim.decay_mask(params)
  block = mask["stages_0"]["blocks_0"]
  assert block["mlp"]["fc1"]["kernel"] and mask["stem"]["kernel"]
  assert not any([block["token_mixer"]["scale"], block["token_mixer"]["bias"],
                  block["norm1"]["scale"], block["layer_scale1"],
                  block["mlp"]["fc1"]["bias"]])


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  schedule = optim.learning_rate_schedule(2e-3, total_steps=100, warmup_steps=10)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0, 1e-3, 2e-3],
                             rtol=1e-6)
  np.testing.assert_allclose(schedule(55), 1e-3, rtol=1e-5)
  assert float(schedule(100)) == pytest.approx(0, abs=1e-9)
  with pytest.raises(ValueError, match="warm-up steps"):
    optim.learning_rate_schedule(1e-3, total_steps=10, warmup_steps=10)


def test_fsdp_shards_large_axes_and_keeps_results(setup):
  images, labels, student, params, teacher = setup
  mesh = distill.make_mesh()
  shardings = distill.fsdp_shardings(params, mesh)
  assert shardings["stages_3"]["blocks_0"]["mlp"]["fc1"]["kernel"].spec == \
      jax.sharding.PartitionSpec(None, "data")  # (32, 128): 128 splits over 8
  assert shardings["stem"]["bias"].spec == jax.sharding.PartitionSpec("data")  # 8
  distiller = make_distiller(student)
  state = distiller.init_state(params)
  state_shardings = distill.fsdp_shardings(state, mesh)
  step = jax.jit(distiller.train_step, out_shardings=(state_shardings, None))
  sharded, metrics = step(jax.device_put(state, state_shardings),
                          jax.device_put(images, distill.data_sharding(mesh)), labels,
                          weights(ce=1.0), jax.random.key(3))
  plain, expected = jax.jit(distiller.train_step)(state, images, labels, weights(ce=1.0),
                                                  jax.random.key(3))
  np.testing.assert_allclose(metrics["loss/total"], expected["loss/total"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ema_tracks_the_params(setup):
  images, labels, student, params, _ = setup
  distiller = make_distiller(student, ema_decay=0.75)
  state = distiller.init_state(params)
  new, _ = jax.jit(distiller.train_step)(state, images, labels, weights(ce=1.0),
                                         jax.random.key(0))
  for ema, before, after in zip(*map(jax.tree.leaves,
                                     (new.ema_params, params, new.params))):
    np.testing.assert_allclose(ema, 0.75 * before + 0.25 * after, rtol=1e-6, atol=1e-7)


def test_rematerialisation_changes_memory_not_results(setup):
  images, labels, _, params, _ = setup
  results = []
  for remat in (False, True):
    student = riformer_jax.create_model("riformer_s12", **TINY, remat=remat,
                                        drop_path_rate=0.2)
    distiller = make_distiller(student)
    new, metrics = jax.jit(distiller.train_step)(
        distiller.init_state(params), images, labels, weights(ce=1.0), jax.random.key(0))
    results.append((metrics["loss/total"], new.params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_eval_counts_with_fewer_than_five_classes():
  model = riformer_jax.create_model("riformer_s12", **dict(TINY, num_classes=2))
  images = jax.random.normal(jax.random.key(0), (6, 32, 32, 3))
  variables = model.init(jax.random.key(1), images)
  predicted = jnp.argmax(model.apply(variables, images), -1)
  labels = predicted.at[:2].set(1 - predicted[:2])  # two wrong, four right
  mask = jnp.array([True] * 5 + [False])  # the last (right) one is padding
  top1, top5, count = distill.eval_counts(model, variables, images, labels, mask)
  assert (int(top1), int(top5), int(count)) == (3, 5, 5)


def test_a_shared_teacher_gives_the_same_steps_with_one_forward_pass(setup):
  images, labels, student, params, teacher = setup
  state = make_distiller(student).init_state(params)
  rng = jax.random.key(0)
  # The same teacher in both roles, run twice (separate) or once (shared): one
  # compiled step each, the terms switched by the traced weights.
  steps = {name: jax.jit(make_distiller(student, shared_teacher=shared).train_step)
           .lower(state, images, labels, weights(), rng, teacher, teacher).compile()
           for name, shared in (("separate", False), ("shared", True))}
  for on in (dict(ce=1.0, hard_kd=1.0, soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0),
             dict(soft_kd=1.0), dict(mi_rel=1.0), dict(ce=1.0)):
    expected, actual = (steps[name](state, images, labels, weights(**on), rng, teacher,
                                    teacher) for name in ("separate", "shared"))
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(on))
  teacher_flops = jax.jit(teacher.module.apply).lower(
      teacher.variables, images).compile().cost_analysis()["flops"]
  saved = (steps["separate"].cost_analysis()["flops"]
           - steps["shared"].cost_analysis()["flops"])
  assert 0.8 * teacher_flops < saved < 1.2 * teacher_flops, (saved, teacher_flops)
