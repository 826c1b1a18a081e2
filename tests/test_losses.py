"""The paper's losses against PyTorch's definitions and on real taps."""

import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import riformer_jax
from riformer_jax.train import losses
from conftest import TINY, random_params

RNG = np.random.default_rng(0)
STUDENT = RNG.standard_normal((6, 10)).astype(np.float32) * 3
TEACHER = RNG.standard_normal((6, 10)).astype(np.float32) * 3


def test_cross_entropy_matches_torch_with_label_smoothing():
  labels = np.array([0, 3, 9, 2, 2, 5])
  targets = np.eye(10)[labels] * 0.9 + 0.01
  expected = F.cross_entropy(torch.from_numpy(STUDENT), torch.from_numpy(labels),
                             label_smoothing=0.1)
  np.testing.assert_allclose(losses.cross_entropy(STUDENT, targets), expected, rtol=1e-6)


def test_hard_distillation_is_cross_entropy_on_the_teacher_argmax():
  expected = F.cross_entropy(torch.from_numpy(STUDENT),
                             torch.from_numpy(TEACHER.argmax(-1)))
  np.testing.assert_allclose(losses.hard_distillation(STUDENT, TEACHER), expected,
                             rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_distillation_is_batchmean_kl_times_t_squared(temperature):
  student = F.log_softmax(torch.from_numpy(STUDENT) / temperature, -1)
  teacher = F.log_softmax(torch.from_numpy(TEACHER) / temperature, -1)
  expected = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
  np.testing.assert_allclose(losses.soft_distillation(STUDENT, TEACHER, temperature),
                             expected * temperature ** 2, rtol=1e-5)
  assert losses.soft_distillation(TEACHER, TEACHER, temperature) == pytest.approx(0, abs=1e-6)


def test_relation_matrix_is_the_cosine_similarity_of_tokens():
  features = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
  tokens = features.reshape(2, 12, 5)
  tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
  expected = tokens @ tokens.transpose(0, 2, 1)
  relation = losses.relation_matrix(features)
  np.testing.assert_allclose(relation, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.diagonal(relation, axis1=1, axis2=2), 1, rtol=1e-5)


def _taps(name, seed, images, **overrides):
  """A tiny model and random variables (numpy draws: eager init compiles per shape)."""
  model = riformer_jax.create_model(name, **{**TINY, **overrides})
  return model, {"params": random_params(model, images, seed)}


def _intermediates(model, variables, images):
  """The sown taps, from one compilation rather than one per operation."""
  apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  return apply(variables, images)[1]["intermediates"]


def test_module_imitation_on_real_taps(images):
  blocks = ["stages_1/blocks_1", "stages_2/blocks_0"]
  teacher, teacher_vars = _taps("poolformer_s12", 0, images)
  teacher_taps = _intermediates(teacher, teacher_vars, images)

  # Against itself every term vanishes.
  same = losses.module_imitation(teacher_taps, teacher_taps, blocks)
  assert all(float(v) == 0 for v in same.values())

  student, student_vars = _taps("riformer_s12", 1, images)

  def mi(params):
    _, state = student.apply({"params": params}, images, mutable=["intermediates"])
    return losses.module_imitation(state["intermediates"], teacher_taps, blocks)

  terms = jax.jit(mi)(student_vars["params"])
  assert all(float(v) > 0 for v in terms.values())
  # By hand for one block and one term.
  state = _intermediates(student, student_vars, images)
  s = state["stages_2"]["blocks_0"]["mixer_output"][0]
  t = teacher_taps["stages_2"]["blocks_0"]["mixer_output"][0]
  s1 = state["stages_1"]["blocks_1"]["mixer_output"][0]
  t1 = teacher_taps["stages_1"]["blocks_1"]["mixer_output"][0]
  np.testing.assert_allclose(terms["out"], np.mean((s - t) ** 2) + np.mean((s1 - t1) ** 2),
                             rtol=1e-5)
  # Each term reaches the chosen blocks' affine mixers, and none after the last one:
  # the gradient of every term, from one compiled reverse pass.
  all_grads = jax.jit(jax.jacrev(mi))(student_vars["params"])
  for term in ("in", "out", "rel"):
    grads = all_grads[term]
    mixer = lambda stage, block: np.abs(  # noqa: E731
        grads[f"stages_{stage}"][f"blocks_{block}"]["token_mixer"]["scale"]).max()
    assert mixer(1, 1) > 0 and mixer(2, 0) > 0, term
    assert mixer(2, 1) == 0 and mixer(3, 0) == 0, term


def test_module_imitation_names_mismatched_blocks(images):
  teacher, variables = _taps("poolformer_s12", 0, images)
  taps = _intermediates(teacher, variables, images)
  with pytest.raises(KeyError, match="block 'stages_1/blocks_7'.*missing 'blocks_7'"):
    losses.module_imitation(taps, taps, ["stages_1/blocks_7"])
  wider, wide_vars = _taps("riformer_s12", 0, images, dims=(8, 16, 24, 40))
  wide = _intermediates(wider, wide_vars, images)
  with pytest.raises(ValueError, match="stages_3/blocks_0: student output"):
    losses.module_imitation(wide, taps, ["stages_3/blocks_0"])


def test_table_10_readings_give_the_weights_they_name():
  s12 = (1e-4, 1e-3, 1.0)  # Table 10, "lambda x batch_size", at batch 1024
  weigh = lambda reading: [losses.module_imitation_weight(v, reading, 1024) for v in s12]
  np.testing.assert_allclose(weigh("times_batch"), [0.1024, 1.024, 1024.0])
  np.testing.assert_allclose(weigh("value"), s12)
  np.testing.assert_allclose(weigh("per_batch"), [1e-4 / 1024, 1e-3 / 1024, 1 / 1024])
  with pytest.raises(ValueError, match=r"config.distill.mi_reading='sum': expected one of"):
    losses.module_imitation_weight(1.0, "sum", 1024)
  with pytest.raises(ValueError, match=r"config.distill.mi_batch=0: must be > 0"):
    losses.module_imitation_weight(1.0, "value", 0)
