"""Mixup/CutMix/label smoothing against timm's Mixup, and the invariants a trainer needs."""

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import torch_reference  # noqa: F401  (makes timm importable)
from timm.data import mixup as timm_mixup

import riformer_jax
from riformer_jax.train import distill, losses, mixup, parallel
from conftest import TINY, random_params


def _images(batch=6, size=8, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("center", [(0, 0), (5, 17), (31, 31), (12, 3)])
def test_cutmix_box_matches_timm(lam, center):
  with mock.patch.object(np.random, "randint", side_effect=list(center)):
    expected = timm_mixup.rand_bbox((2, 3, 32, 32), lam)
  box = mixup.cutmix_box(jnp.float32(lam), center[0], center[1], 32, 32)
  assert [int(v) for v in box] == [int(v) for v in expected]


@pytest.mark.parametrize("key", range(12))
def test_mixing_matches_timm_for_the_same_draw(key):
  """Given our draw (kind, lambda, box), timm's batch-mode Mixup gives the same output."""
  x = _images()
  y = np.array([0, 3, 2, 1, 4, 0])
  params = mixup.sample_mix_params(jax.random.key(key), 8, 8)
  mixed, targets = mixup.apply_mix(params, jnp.asarray(x), jnp.asarray(y), 5, 0.1)
  reference = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                               num_classes=5)
  lam, box = float(params.lam), tuple(int(v) for v in params.box)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with mock.patch.object(reference, "_params_per_batch",
                         return_value=(lam, bool(params.use_cutmix))), \
       mock.patch.object(timm_mixup, "cutmix_bbox_and_lam", return_value=(box, lam)):
    x_ref, t_ref = reference(x_torch, torch.from_numpy(y))
  np.testing.assert_array_equal(np.asarray(mixed), x_ref.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(targets), t_ref.numpy(), atol=1e-6)


def test_invariants_over_many_draws():
  """Targets sum to one; mixup is the lambda blend; CutMix's lambda is the kept area."""
  batch, size, classes = 8, 16, 10
  # Sample i is the constant i + 1 everywhere, so every pixel tells its source.
  x = jnp.broadcast_to(jnp.arange(1, batch + 1, dtype=jnp.float32)[:, None, None, None],
                       (batch, size, size, 3))
  y = jnp.arange(batch) % classes
  # The batches and their draws from one compiled function (eagerly, every batched
  # operation compiles on its own).
  run = jax.jit(jax.vmap(lambda k: (mixup.mix_batch(k, x, y, classes),
                                    mixup.sample_mix_params(jax.random.split(k, 1)[0],
                                                            size, size))))
  keys = jax.random.split(jax.random.key(0), 400)
  (mixed, targets), params = run(keys)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
  assert float(targets.min()) >= 0.1 / classes * 0.999
  lam = np.asarray(params.lam)
  cut = np.asarray(params.use_cutmix)
  own = np.asarray(mixed)[:, 0, :, :, 0] == 1.0  # sample 0's own pixels
  kept = own.mean(axis=(1, 2))
  np.testing.assert_allclose(kept[cut], lam[cut], atol=1e-6)
  blend = lam[~cut] * 1.0 + (1 - lam[~cut]) * batch
  np.testing.assert_allclose(np.asarray(mixed)[~cut, 0, 0, 0, 0], blend, rtol=1e-5)
  # Label mass follows the pixels: sample 0 gets lam of its class, 1 - lam of the last.
  on = 1 - 0.1 + 0.1 / classes
  np.testing.assert_allclose(np.asarray(targets)[:, 0, 0], lam * on + (1 - lam) * 0.01
                             if y[-1] != y[0] else on, atol=1e-5)
  # Switch probability 0.5; mixup's Beta(0.8, 0.8) has mean 0.5. CutMix's corrected
  # lambda is larger on average: boxes clipped at the border take fewer pixels.
  assert 0.4 < cut.mean() < 0.6
  assert 0.4 < lam[~cut].mean() < 0.6 and 0.5 < lam[cut].mean() < 0.85


def test_options_disable_and_switch():
  x, y = jnp.asarray(_images()), jnp.arange(6)
  keys = jax.random.split(jax.random.key(1), 64)
  off = jax.vmap(lambda k: mixup.sample_mix_params(k, 8, 8, prob=0.0))(keys)
  assert np.all(np.asarray(off.lam) == 1.0) and not np.any(off.use_cutmix)
  only_mixup = jax.vmap(lambda k: mixup.sample_mix_params(k, 8, 8, switch_prob=0.0))(keys)
  assert not np.any(only_mixup.use_cutmix)
  only_cutmix = jax.vmap(lambda k: mixup.sample_mix_params(k, 8, 8, mixup_alpha=0.0))(keys)
  assert np.mean(only_cutmix.use_cutmix) > 0.9
  images, targets = mixup.mix_batch(keys[0], x, y, 6, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(images, x)
  np.testing.assert_allclose(targets, mixup.smooth_one_hot(y, 6, 0.1))
  with pytest.raises(ValueError, match="even"):
    mixup.mix_batch(keys[0], x[:5], y[:5], 6)


def test_deterministic_per_key():
  x, y = jnp.asarray(_images()), jnp.arange(6)
  a = mixup.mix_batch(jax.random.key(3), x, y, 6)
  b = mixup.mix_batch(jax.random.key(3), x, y, 6)
  c = mixup.mix_batch(jax.random.key(4), x, y, 6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_groups_mix_within_themselves():
  batch, groups = 8, 2
  x = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None, None],
                       (batch, 8, 8, 1))
  y = jnp.arange(batch)
  for key in range(10):
    mixed, targets = mixup.mix_batch(jax.random.key(key), x, y, batch, num_groups=groups,
                                     label_smoothing=0.0)
    for g in range(groups):
      rows = slice(g * 4, (g + 1) * 4)
      assert float(mixed[rows].min()) >= g * 4 - 1e-5
      assert float(mixed[rows].max()) <= g * 4 + 3 + 1e-5
      assert float(targets[rows][:, [c for c in range(batch) if c // 4 != g]].sum()) == 0


@pytest.mark.heavy  # two sharded step compilations (20 s): not in `make check`
def test_teachers_see_the_students_mixed_batch_in_the_sharded_train_step():
  """`Distiller.train_step` on 8 devices with mixup/CutMix, the student its own teacher
  in both roles (TINY has no dropout or drop path): the distillation terms vanish
  only if the teachers take the very array the student takes."""
  mesh = parallel.make_mesh()
  host = {"image": _images(batch=16, size=32), "label": np.arange(16, dtype=np.int32) % 5}
  batch = parallel.to_global(host, mesh)
  assert mesh.devices.size == 8
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  student = riformer_jax.create_model("riformer_s12", **dict(TINY, num_classes=5))
  # numpy draws (no init compiles); with seed 87 every control below clears its bound
  # by 30x or more.
  params = random_params(student, host["image"][:1], 87)
  # Without the head's biases the argmax varies with the input, so hard KD can tell
  # batches apart (with them every row of these random logits has the same argmax).
  params["head"] = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if path[-1].key == "bias" else p, params["head"])
  teacher = jax.device_put(distill.Teacher(student, {"params": params}),
                           parallel.replicated(mesh))
  config = distill.MixConfig()
  blocks = ("stages_1/blocks_1", "stages_2/blocks_0")
  distiller = distill.Distiller(student=student, optimizer=optax.sgd(0.1), num_classes=5,
                                mix=config, mi_blocks=blocks)
  state = jax.device_put(distiller.init_state(params), parallel.replicated(mesh))
  every_term = {t: jnp.float32(1.0) for t in distill.TERMS}
  steps = {shared: jax.jit(dataclasses.replace(distiller,
                                               shared_teacher=shared).train_step)
           for shared in (False, True)}
  apply = jax.jit(lambda x: student.apply({"params": params}, x,
                                          mutable=["intermediates"]))

  # The references below are jitted too: one compilation each, not one per operation.
  @jax.jit
  def draw(rng):  # the step's own draw: mixing takes the first half of fold_in(rng, 0)
    key = jax.random.split(jax.random.fold_in(rng, 0))[0]
    return mixup.mix_batch(key, jnp.asarray(host["image"]), jnp.asarray(host["label"]), 5,
                           **dataclasses.asdict(config))

  @jax.jit
  def terms(student_images, teacher_images):
    (logits, taps), (teacher_logits, teacher_taps) = map(apply, (student_images,
                                                                 teacher_images))
    mi = losses.module_imitation(taps["intermediates"], teacher_taps["intermediates"],
                                 blocks)
    return {"hard_kd": losses.hard_distillation(logits, teacher_logits),
            "soft_kd": losses.soft_distillation(logits, teacher_logits),
            "mi_in": mi["in"], "mi_out": mi["out"], "mi_rel": mi["rel"]}

  unmixed_ce = losses.cross_entropy(apply(host["image"])[0],
                                    mixup.smooth_one_hot(host["label"], 5, 0.1))
  rngs = jax.random.key(0), jax.random.key(1)
  draws = [draw(rng) for rng in rngs]
  kept = [float(np.mean(np.asarray(images) == host["image"])) for images, _ in draws]
  assert 0 < kept[0] < 1 and kept[1] == 0  # a CutMix draw and a mixup draw
  for rng, (images, targets), (other_images, _) in zip(rngs, draws, draws[::-1]):
    ce = losses.cross_entropy(apply(images)[0], targets)
    assert abs(float(ce) - float(unmixed_ce)) > 1e-3  # the pin below tells them apart
    same = terms(images, images)
    for shared, step in steps.items():
      _, metrics = step(state, batch["image"], batch["label"], every_term, rng, teacher,
                        teacher)
      # The student took this draw (the sharded step draws as one device does) ...
      np.testing.assert_allclose(metrics["loss/ce"], ce, rtol=1e-5, err_msg=str(shared))
      # ... and so did the teachers: equal logits and taps, the same argmax.
      for term in ("soft_kd", "mi_in", "mi_out", "mi_rel"):
        assert float(metrics[f"loss/{term}"]) < 1e-6, (shared, term)
      np.testing.assert_allclose(metrics["loss/hard_kd"], same["hard_kd"], rtol=1e-5,
                                 err_msg=str(shared))
    # A teacher fed the unmixed batch or another draw would show in every term, 100
    # times above the bounds.
    for seen in (host["image"], other_images):
      control = terms(images, seen)
      assert all(float(control[t]) > 1e-4 for t in ("soft_kd", "mi_in", "mi_out",
                                                    "mi_rel")), control
      assert float(control["hard_kd"]) > float(same["hard_kd"]) * (1 + 1e-3), control


def test_finish_batch_normalises_and_erases_the_given_boxes():
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
  boxes = np.array([[5, 7, 30, 20], [0, 0, 0, 0], [39, 47, 1, 1]], np.int32)
  normalised = (images / 255.0 - np.array(mean)) / np.array(std)
  finish = jax.jit(mixup.finish_batch, static_argnums=(3, 4, 5))
  out = np.asarray(finish(jax.random.key(0), images, boxes, mean, std, "pixel"))
  inside = np.zeros(images.shape[:3], bool)
  inside[0, 5:35, 7:27] = inside[2, 39, 47] = True
  np.testing.assert_allclose(out[~inside], normalised[~inside], rtol=1e-6, atol=1e-6)
  erased = out[0, 5:35, 7:27]
  assert np.all(np.abs(erased - normalised[0, 5:35, 7:27]) > 1e-6)
  assert abs(erased.mean()) < 0.15 and 0.85 < erased.std() < 1.15  # N(0, 1) noise
  np.testing.assert_array_equal(out, finish(jax.random.key(0), images, boxes, mean, std,
                                            "pixel"))
  assert not np.array_equal(out, finish(jax.random.key(1), images, boxes, mean, std, "pixel"))
  colour = np.asarray(finish(jax.random.key(0), images, boxes, mean, std, "rand"))[0, 5:35, 7:27]
  assert np.ptp(colour.reshape(-1, 3), axis=0).max() == 0 and np.any(colour != 0)
  const = np.asarray(finish(jax.random.key(0), images, boxes, mean, std, "const"))
  assert np.all(const[inside] == 0)
  plain = np.asarray(finish(jax.random.key(0), images, boxes, mean, std, None))
  np.testing.assert_allclose(plain, normalised, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="erasing mode='box'"):
    mixup.finish_batch(jax.random.key(0), images, boxes, mean, std, "box")
