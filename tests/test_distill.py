"""The fused distillation step: loss composition, no retracing, sharding, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import riformer_jax
from riformer_jax.train import distill, losses, optim, parallel
from conftest import TINY, random_params, relative_error

BLOCKS = ("stages_1/blocks_1", "stages_2/blocks_0")
PEAK_LR = 1e-3


def weights(**on):
  return {t: jnp.float32(on.get(t, 0.0)) for t in distill.TERMS}


@pytest.fixture(scope="module")
def setup():
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10
  student = riformer_jax.create_model("riformer_s12", **TINY)
  teacher = riformer_jax.create_model("poolformer_s12", **TINY)
  # Redrawn: init's layer scales of 1e-5 give the branches gradients below Adam's eps.
  # Drawn by numpy (conftest.random_params): eager init compiles once per shape.
  params = random_params(student, images[:1], 1)
  teacher_vars = {"params": random_params(teacher, images[:1], 2)}
  return images, labels, student, params, distill.Teacher(teacher, teacher_vars)


EMA_DECAY = 0.75


@pytest.fixture(scope="module")
def default(setup):
  """The module's Distiller, its `train_step` jitted once for all tests here, and the
  list its traces append to. A compilation of the step costs seconds on 2 cores, and
  jit keeps one per call signature (devices, dtypes), so the tests share them. No
  mixing (it doubles the compile time; the uint8 test below runs it, test_mixup the
  sharded step with mixing and both teacher modes), the EMA on."""
  distiller = make_distiller(setup[2], mix=None, ema_decay=EMA_DECAY)
  traces = []

  def step(*args):
    traces.append(1)  # once per trace, i.e. per compilation
    return distiller.train_step(*args)
  return distiller, jax.jit(step), traces


def make_distiller(student, **kwargs):
  # No warm-up: a warm-up from 0 makes the first update a no-op, and the comparisons
  # below need every update of their two steps to move the params.
  schedule = optim.learning_rate_schedule(PEAK_LR, total_steps=10, warmup_steps=0)
  return distill.Distiller(student=student, optimizer=optim.make_optimizer(schedule),
                           num_classes=10, mi_blocks=BLOCKS, schedule=schedule, **kwargs)


def assert_moved(after, before, name):
  """A tenth of one Adam step: the leaf really moved, so comparing it tests an update."""
  assert np.abs(np.asarray(after, np.float64) - before).max() > 0.1 * PEAK_LR, name


def assert_same_updates(reference, other, initial):
  """TrainState `other` took the updates `reference` took from the params `initial`.

  Each leaf's update (final - initial) must have moved in `reference` and agree
  normwise, which a dropped or halved update fails. Adam's mu and nu must agree too:
  they start at 0 and scale with the gradient, so they show a summed instead of
  averaged gradient in full, where Adam's near scale invariance leaves the params
  only a trace of it. Adam divides each entry by its own gradient scale, so
  summation-order noise in entries with small gradients moves the params by up to
  ~1e-3 of the update; mu and nu, linear and quadratic in the gradient, agree to ~1e-6.
  """
  reference, other, initial = jax.device_get((reference, other, initial))
  assert int(reference.step) >= 2 and int(other.step) == int(reference.step)
  for name in ("params", "opt_state"):
    assert jax.tree.structure(getattr(other, name)) == \
        jax.tree.structure(getattr(reference, name)), name
  paths = jax.tree_util.tree_flatten_with_path(initial)[0]
  for (path, start), a, b in zip(paths, jax.tree.leaves(reference.params),
                                 jax.tree.leaves(other.params)):
    name = jax.tree_util.keystr(path)
    assert_moved(a, start, name)
    start = np.asarray(start, np.float64)
    assert relative_error(np.asarray(b, np.float64) - start, a - start) < 1e-2, name
  paths = jax.tree_util.tree_flatten_with_path(reference.opt_state)[0]
  for (path, a), b in zip(paths, jax.tree.leaves(other.opt_state)):
    assert relative_error(b, a) < 1e-4, jax.tree_util.keystr(path)


def test_terms_are_the_losses_of_the_mixed_batch(setup, default):
  images, labels, student, params, teacher = setup
  distiller, step, _ = default
  assert distiller.mix is None
  state = distiller.init_state(params)
  w = weights(ce=1.0, hard_kd=1.0, soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0)
  _, metrics = step(state, images, labels, w, jax.random.key(0), teacher, teacher, None)
  # No mixing and no dropout in TINY: the terms are the plain losses.
  @jax.jit  # the reference in one compilation, not one per operation
  def plain_losses(params, teacher, images, labels):
    logits, taps = student.apply({"params": params}, images, mutable=["intermediates"])
    _, teacher_taps = teacher.module.apply(teacher.variables, images,
                                           mutable=["intermediates"])
    teacher_logits = teacher.module.apply(teacher.variables, images)
    mi = losses.module_imitation(taps["intermediates"], teacher_taps["intermediates"],
                                 BLOCKS)
    return {
        "ce": losses.cross_entropy(logits, jax.nn.one_hot(labels, 10)),
        "hard_kd": losses.hard_distillation(logits, teacher_logits),
        "soft_kd": losses.soft_distillation(logits, teacher_logits),
        "mi_in": mi["in"], "mi_out": mi["out"], "mi_rel": mi["rel"]}

  expected = plain_losses(params, teacher, images, labels)
  for term, value in expected.items():
    np.testing.assert_allclose(metrics[f"loss/{term}"], value, rtol=1e-5, err_msg=term)
  np.testing.assert_allclose(metrics["loss/total"], sum(expected.values()), rtol=1e-5)


def test_switching_terms_off_skips_them_without_recompiling(setup, default):
  images, labels, _, params, teacher = setup
  distiller, train_step, traces = default

  def step(state, w):
    return train_step(state, images, labels, w, jax.random.key(0), teacher, teacher, None)

  state = distiller.init_state(params)
  state, on = step(state, weights(soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0))
  compiled = len(traces)  # one trace for this signature, here or in an earlier test
  state, off = step(state, weights(soft_kd=1.0))
  state, ce_only = step(state, weights(ce=1.0))
  assert compiled >= 1 and len(traces) == compiled
  assert all(float(on[f"loss/{t}"]) > 0 for t in ("soft_kd", "mi_in", "mi_out", "mi_rel"))
  assert all(float(off[f"loss/{t}"]) == 0 for t in ("mi_in", "mi_out", "mi_rel"))
  assert float(off["loss/soft_kd"]) > 0
  assert float(ce_only["loss/soft_kd"]) == 0 and float(ce_only["loss/hard_kd"]) == 0
  assert int(state.step) == 3


def _run(distiller, step, params, images, labels, teacher, mesh, steps=2,
         erase_boxes=None, seed=3, window_sizes=None):
  """`steps` updates by `step` (`distiller.train_step` jitted), the batch split over
  `mesh`, or on the default device alone where `mesh` is None."""
  state = distiller.init_state(params)
  if mesh is not None:
    data = parallel.data_sharding(mesh)
    state = jax.device_put(state, parallel.replicated(mesh))
    images, labels, erase_boxes, window_sizes = jax.device_put(
        (images, labels, erase_boxes, window_sizes), data)
    teacher = jax.device_put(teacher, parallel.replicated(mesh))
  w = weights(soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0)
  for _ in range(steps):
    state, metrics = step(state, images, labels, w, jax.random.key(seed), teacher, teacher,
                          erase_boxes, window_sizes)
  return jax.device_get((state, metrics))


@pytest.fixture(scope="module")
def eight_devices(setup, default):
  """The module's step, two updates on 8 devices: the reference of two tests below."""
  images, labels, _, params, teacher = setup
  return _run(*default[:2], params, images, labels, teacher, parallel.make_mesh())


@pytest.mark.heavy  # compiles a step of its own (10-20 s): not in `make check`
def test_a_uint8_batch_is_finished_in_the_step(setup):
  """uint8 images normalised in the step give the float batch's updates; erasing
  boxes change them. With mixing: finishing must leave the mixing draws alone. On
  one device (the mixing step's compilation for 8 takes twice as long; test_train's
  uint8 run trains with erasing in the sharded step)."""
  _, labels, student, params, teacher = setup
  pixels = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  finish = distill.FinishConfig()
  host = ((pixels / 255.0 - np.array(finish.mean)) / np.array(finish.std)).astype(np.float32)
  distiller = make_distiller(student)  # the default recipe: mixing, pixel erasing
  assert distiller.mix is not None and distiller.finish.erase_mode == "pixel"
  step = jax.jit(distiller.train_step)
  reference, _ = _run(distiller, step, params, host, labels, teacher, mesh=None)
  # Empty boxes erase nothing (test_mixup: finish_batch); one compilation serves both.
  nothing = np.zeros((8, 4), np.int32)
  finished, _ = _run(distiller, step, params, pixels, labels, teacher, mesh=None,
                     erase_boxes=nothing)
  assert_same_updates(reference, finished, params)
  boxes = np.tile(np.array([[4, 6, 20, 12]], np.int32), (8, 1))
  # Same key, so the same mixing and dropout: only the erased boxes differ.
  erased, _ = _run(distiller, step, params, pixels, labels, teacher, mesh=None,
                   erase_boxes=boxes)
  for a, b in zip(jax.tree.leaves(erased.params), jax.tree.leaves(reference.params)):
    if not np.allclose(a, b, rtol=1e-4, atol=1e-6):
      break
  else:
    raise AssertionError("erasing boxes left every update unchanged")


@pytest.mark.heavy  # compiles two steps of its own: not in `make check`
def test_device_resize_and_rand_augment_run_in_the_step_with_the_step_s_draws(setup):
  """A step that resizes windows from their canvases and applies RandAugment (sharded
  over 8 devices) makes the update that a plain step makes on the batch resized and
  augmented beforehand with the step's key: the draws are a function of (seed, step)
  alone, per image, whatever the sharding."""
  from riformer_jax.data import device_augment  # noqa: PLC0415
  _, labels, student, params, teacher = setup
  rng = np.random.default_rng(5)
  canvases = rng.integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
  sizes = rng.integers(20, 49, (8, 2)).astype(np.int32)
  plan = device_augment.plan("rand-m9-mstd0.5-inc1")
  plain = make_distiller(student, mix=None, finish=distill.FinishConfig(erase_mode=None))
  augmenting = make_distiller(student, mix=None, finish=distill.FinishConfig(
      erase_mode=None, auto_augment=plan, resize_to=32))
  state, _ = _run(augmenting, jax.jit(augmenting.train_step), params, canvases, labels,
                  teacher, parallel.make_mesh(), steps=1, window_sizes=sizes)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 0),
                           distill._AUGMENT_STREAM)
  pixels = device_augment.resize_windows(jnp.asarray(canvases), jnp.asarray(sizes), 32)
  augmented = np.asarray(device_augment.auto_augment(key, pixels, plan))
  pixels = np.asarray(pixels)
  assert (augmented != pixels).any(axis=(1, 2, 3)).sum() >= 4  # most images changed
  expected, _ = _run(plain, jax.jit(plain.train_step), params, augmented, labels,
                     teacher, mesh=None, steps=1)
  untouched, _ = _run(plain, jax.jit(plain.train_step), params, pixels, labels, teacher,
                      mesh=None, steps=1)
  for got, want, before, other in zip(*(jax.tree.leaves(s.params) for s in (
      state, expected, distill.TrainState(0, params, None), untouched))):
    assert_moved(want, before, "update")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(untouched.params)))


def test_eight_devices_match_one(setup, default, eight_devices):
  images, labels, _, params, teacher = setup
  eight, eight_metrics = eight_devices
  one, one_metrics = _run(*default[:2], params, images, labels, teacher, mesh=None)
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(one_metrics["loss/total"], eight_metrics["loss/total"],
                             rtol=1e-5)
  assert_same_updates(one, eight, params)


@pytest.mark.heavy  # compiles a step of its own (10-20 s): not in `make check`
def test_accumulation_gives_the_large_batch_update(setup, default, eight_devices):
  images, labels, _, params, teacher = setup
  whole, whole_metrics = eight_devices
  accumulating = dataclasses.replace(default[0], accum_steps=2)
  accumulated, metrics = _run(accumulating, jax.jit(accumulating.train_step), params,
                              images, labels, teacher, parallel.make_mesh())
  np.testing.assert_allclose(whole_metrics["loss/total"], metrics["loss/total"],
                             rtol=1e-5)
  assert_same_updates(whole, accumulated, params)


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
  # Without warm-up the first step already takes the peak (make_distiller relies on it).
  np.testing.assert_allclose(optim.learning_rate_schedule(2e-3, 100, 0)(0), 2e-3,
                             rtol=1e-6)
  assert float(schedule(100)) == pytest.approx(0, abs=1e-9)
  with pytest.raises(ValueError, match="warm-up steps"):
    optim.learning_rate_schedule(1e-3, total_steps=10, warmup_steps=10)


@pytest.mark.heavy  # compiles a step of its own (10-20 s): not in `make check`
def test_fsdp_shards_large_axes_and_keeps_results(setup, default):
  images, labels, _, params, teacher = setup
  mesh = parallel.make_mesh()
  shardings = parallel.fsdp_shardings(params, mesh)
  assert shardings["stages_3"]["blocks_0"]["mlp"]["fc1"]["kernel"].spec == \
      jax.sharding.PartitionSpec(None, "data")  # (32, 128): 128 splits over 8
  assert shardings["stem"]["bias"].spec == jax.sharding.PartitionSpec("data")  # 8
  distiller, plain_step, _ = default
  plain = distiller.init_state(params)
  state_shardings = parallel.fsdp_shardings(plain, mesh)
  sharded = jax.device_put(plain, state_shardings)
  sharded_images = jax.device_put(images, parallel.data_sharding(mesh))
  sharded_step = jax.jit(distiller.train_step, out_shardings=(state_shardings, None))
  for _ in range(2):
    sharded, metrics = sharded_step(sharded, sharded_images, labels, weights(ce=1.0),
                                    jax.random.key(3))
    # The module's one-device step (teachers given, skipped at weight 0: the same loss).
    plain, expected = plain_step(plain, images, labels, weights(ce=1.0),
                                 jax.random.key(3), teacher, teacher, None)
    np.testing.assert_allclose(metrics["loss/total"], expected["loss/total"], rtol=1e-5)
  assert sharded.params["stages_3"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "data")  # the update keeps the layout
  assert_same_updates(plain, sharded, params)


def test_ema_tracks_the_params(setup, default):
  images, labels, _, params, teacher = setup
  distiller, step, _ = default
  assert distiller.ema_decay == EMA_DECAY == 0.75
  state = distiller.init_state(params)
  history = [params]
  for _ in range(2):  # the teachers are skipped at weight 0
    state, _ = step(state, images, labels, weights(ce=1.0), jax.random.key(0), teacher,
                    teacher, None)
    history.append(state.params)
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, _), p0, p1, p2, ema in zip(
      paths, *map(jax.tree.leaves, jax.device_get((*history, state.ema_params)))):
    name = jax.tree_util.keystr(path)
    assert_moved(p1, p0, name)
    assert_moved(p2, p1, name)
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    expected = 0.75 * (0.75 * p0 + 0.25 * p1) + 0.25 * p2  # ema_0 = params_0
    # Compared as moves away from params_0, which both steps contribute to.
    assert relative_error(ema - p0, expected - p0) < 1e-3, name


@pytest.mark.heavy  # compiles a step of its own (10-20 s): not in `make check`
def test_rematerialisation_changes_memory_not_results(setup):
  images, labels, _, params, _ = setup
  results = []
  for remat in (False, True):
    student = riformer_jax.create_model("riformer_s12", **TINY, remat=remat,
                                        drop_path_rate=0.2)
    distiller = make_distiller(student, mix=None)  # mixing: compile time, no bearing
    step = jax.jit(distiller.train_step)
    state, totals = distiller.init_state(params), []
    for _ in range(2):  # two steps, two drop-path draws
      state, metrics = step(state, images, labels, weights(ce=1.0), jax.random.key(0))
      totals.append(metrics["loss/total"])
    results.append((totals, state))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  assert_same_updates(results[0][1], results[1][1], params)


def test_eval_counts_with_fewer_than_five_classes():
  model = riformer_jax.create_model("riformer_s12", **dict(TINY, num_classes=2))
  images = jax.random.normal(jax.random.key(0), (6, 32, 32, 3))
  variables = {"params": random_params(model, images, 1)}
  predicted = jnp.argmax(jax.jit(model.apply)(variables, images), -1)
  labels = predicted.at[:2].set(1 - predicted[:2])  # two wrong, four right
  mask = jnp.array([True] * 5 + [False])  # the last (right) one is padding
  # Jitted, as the trainer runs it: one compilation instead of one per operation.
  top1, top5, count = jax.jit(distill.eval_counts, static_argnums=0)(
      model, variables, images, labels, mask)
  assert (int(top1), int(top5), int(count)) == (3, 5, 5)


@pytest.mark.heavy  # compiles a step of its own (10-20 s): not in `make check`
def test_a_shared_teacher_gives_the_same_steps_with_one_forward_pass(setup, default):
  images, labels, _, params, teacher = setup
  distiller, separate, _ = default
  state = distiller.init_state(params)
  rng = jax.random.key(0)
  # The same teacher in both roles, run twice (separate: the module's step, compiled
  # once for all its tests) or once (shared): one compiled step each, the terms
  # switched by the traced weights.
  shared = jax.jit(dataclasses.replace(distiller, shared_teacher=True).train_step)
  steps = {name: step.lower(state, images, labels, weights(), rng, teacher, teacher,
                            None).compile()
           for name, step in (("separate", separate), ("shared", shared))}
  for on in (dict(ce=1.0, hard_kd=1.0, soft_kd=1.0, mi_in=1.0, mi_out=1.0, mi_rel=1.0),
             dict(soft_kd=1.0), dict(mi_rel=1.0), dict(ce=1.0)):
    expected, actual = (steps[name](state, images, labels, weights(**on), rng, teacher,
                                    teacher, None) for name in ("separate", "shared"))
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(on))
  teacher_flops = jax.jit(teacher.module.apply).lower(
      teacher.variables, images).compile().cost_analysis()["flops"]
  saved = (steps["separate"].cost_analysis()["flops"]
           - steps["shared"].cost_analysis()["flops"])
  assert 0.8 * teacher_flops < saved < 1.2 * teacher_flops, (saved, teacher_flops)
