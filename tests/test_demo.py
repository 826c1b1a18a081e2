"""demo.py's report on finished runs: reuse, the deploy check, throughput, the table
and the curves (the trainings themselves are the trainer's, tested in test_train.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import demo
import riformer_jax
from configs import demo as demo_configs
from riformer_jax.train import runs
from riformer_jax.weights import store
from conftest import random_params


def fake_run(workdir, role, top1, seed):
  """A finished train.py workdir: random weights of the role's model, a metrics log."""
  config = demo_configs.get_config(role)
  kwargs = dict(config.model)
  model = riformer_jax.create_model(config.model_name, **kwargs)
  # conftest.numpy_randomize's distributions (layer scales far from init's 1e-5, so the
  # deploy check below sees every block), drawn by numpy: eager init compiles per shape.
  params = random_params(model, jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32), seed)
  if config.model_name.startswith("riformer"):  # the affine mixers away from identity
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.5 if "token_mixer" in jax.tree_util.keystr(path) else x,
        params)
  run_dir = os.path.join(workdir, role)
  store.save_pretrained(os.path.join(run_dir, "student"), config.model_name, kwargs,
                             params)
  if role != "teacher":
    store.save_pretrained(os.path.join(run_dir, "deploy"), config.model_name,
                               dict(kwargs, deploy=True),
                               riformer_jax.reparameterize(params))
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step in (26, 52, 78):
      f.write(json.dumps({"step": step, "epoch": step / 78, "loss/total": 3 - step / 50,
                          "train_accuracy": step / 100}) + "\n")
    f.write(json.dumps({"step": 78, "student/top1": top1, "deploy/top1": top1}) + "\n")
  with open(os.path.join(run_dir, runs.FINAL), "w") as f:  # a finished run's record
    json.dump({"step": 78, "student/top1": top1, "deploy/top1": top1, "seconds": 1.0}, f)


@pytest.mark.heavy  # a throughput measurement: not in `make check`
def test_report_on_finished_runs(tmp_path, capsys):
  for seed, (role, top1) in enumerate((("teacher", 90.0), ("ce", 40.0),
                                       ("distilled", 75.5))):
    fake_run(str(tmp_path), role, top1, seed)
  demo.main([f"--workdir={tmp_path}", "--throughput_batch=8"])
  output = capsys.readouterr().out
  assert output.count("already trained: reusing") == 3
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results["top1"] == {"teacher": 90.0, "ce": 40.0, "distilled": 75.5}
  assert results["margin"] == 35.5 and "+35.5 points" in output
  # The deploy form written next to the student computes the same logits.
  assert 0 < results["deploy_max_logit_diff"] < 1e-4
  # Deploy drops one (scale, bias) pair of per-channel vectors per block.
  dims = demo_configs.get_config().model.dims
  assert results["params"]["student"] - results["params"]["deploy"] == sum(
      2 * dim * depth for dim, depth in zip(dims, demo_configs.DEPTHS))
  speed = results["images_per_second"]
  assert speed["poolformer"] > 0 and speed["deploy"] > 0
  assert results["deploy_over_poolformer"] == speed["deploy"] / speed["poolformer"]
  table = open(tmp_path / "results.md").read()
  assert "| RIFormer, distilled | 214,522 | 75.5 |" in table
  with Image.open(tmp_path / "curves.png") as image:
    assert image.size == (1500, 400)
    assert np.asarray(image.convert("L")).std() > 10  # something was drawn


def test_a_teacher_that_is_not_a_model_is_named_before_any_run(tmp_path):
  with pytest.raises(SystemExit) as exit_:
    demo.main(["--workdir", str(tmp_path / "demo"), "--teacher", str(tmp_path / "none")])
  assert str(exit_.value).startswith(f"demo.py: --teacher: {tmp_path / 'none'}: not a "
                                     "converted model")
  assert not (tmp_path / "demo").exists()
