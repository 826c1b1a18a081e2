"""train.py end to end on the embedded data set: resume after SIGTERM and kill -9,
teachers, config errors. Each run is a real process, as a user starts it."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import riformer_jax
from riformer_jax import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.total_steps=12", "--config.checkpoint_every_steps=2",
         "--config.resolution=32", "--config.batch_size=32",
         "--config.model.dims=(8, 16, 24, 32)"]


def start(workdir, *overrides, config="configs/tiny.py"):
  return subprocess.Popen(
      [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
       *SHORT, *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def run(workdir, *overrides, **kwargs):
  process = start(workdir, *overrides, **kwargs)
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


def interrupt(workdir, sig, *overrides):
  """Starts a run and sends `sig` once its first checkpoint is on disk."""
  process = start(workdir, *overrides)
  checkpoints = os.path.join(workdir, "checkpoints")
  while not (os.path.isdir(checkpoints) and
             any(name.isdigit() for name in os.listdir(checkpoints))):
    assert process.poll() is None, process.stdout.read()
    time.sleep(0.05)
  process.send_signal(sig)
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


def final_params(workdir):
  _, variables = riformer_jax.load_pretrained(os.path.join(workdir, "student"))
  return jax.device_get(variables["params"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  code, output = run(workdir)
  assert code == 0, output
  return workdir, output


def test_straight_run_reports_student_and_deploy_alike(straight):
  workdir, output = straight
  assert "deploy/top1" in output
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  final = json.loads(lines[-1])
  assert final["step"] == 12 and final["student/top1"] == final["deploy/top1"]
  deploy, variables = riformer_jax.load_pretrained(workdir / "deploy")
  assert deploy.deploy and "norm_reparam" in variables["params"]["stages_0"]["blocks_0"]


def test_rerunning_a_finished_run_evaluates_it_again(straight, tmp_path):
  shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
  code, output = run(tmp_path)
  assert code == 0 and "resumed from step 12" in output, output
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1]) == json.loads(lines[-2])  # the same final evaluation
  reference, again = final_params(straight[0]), final_params(tmp_path)
  assert jax.tree.all(jax.tree.map(np.array_equal, reference, again))


@pytest.mark.parametrize("sig", [
    signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_interrupted_and_resumed_run_is_bit_identical(straight, tmp_path, sig):
  code, output = interrupt(tmp_path, sig)
  if sig == signal.SIGKILL:
    assert code == -signal.SIGKILL
  else:
    assert code == 0 and "SIGTERM: saved step" in output, output
  assert not (tmp_path / "student").exists()  # it really stopped early
  code, output = run(tmp_path)
  assert code == 0 and "resumed from step" in output, output
  reference, resumed = final_params(straight[0]), final_params(tmp_path)
  assert jax.tree.all(jax.tree.map(np.array_equal, reference, resumed))


def test_distillation_with_teachers_and_teacher_init(tmp_path):
  # A converted teacher directory, as convert.py writes one.
  teacher = riformer_jax.create_model("poolformer_s12", depths=(1, 1, 2, 1),
                                      dims=(8, 16, 24, 32), num_classes=10)
  params = teacher.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  pretrained.save_pretrained(tmp_path / "teacher", "poolformer_s12",
                             dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                                  num_classes=10), params)
  code, output = run(tmp_path / "run", "--config.total_steps=4",
                     f"--config.teachers.logit={tmp_path / 'teacher'}",
                     f"--config.teachers.feature={tmp_path / 'teacher'}",
                     config="configs/tiny.py:with_teacher")
  assert code == 0, output
  logged = list(map(json.loads,
                    (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))
  # One directory in both roles: loaded and evaluated once, reported under both.
  (teacher_line,) = [m for m in logged if "teacher_logit/top1" in m]
  assert teacher_line["teacher_feature/top1"] == teacher_line["teacher_logit/top1"]
  assert output.count("teacher_logit/top1") == 1
  train_lines = [m for m in logged if "loss/total" in m]
  assert all(m["loss/soft_kd"] > 0 and m["loss/mi_in"] > 0 and m["loss/ce"] > 0
             for m in train_lines)


def test_bad_configuration_is_named(tmp_path):
  code, output = run(tmp_path, "--config.batch_sise=8")
  assert code != 0 and "batch_sise" in output
  code, output = run(tmp_path, f"--config.teachers.logit={tmp_path / 'nowhere'}")
  assert code != 0 and "config.teachers.logit" in output and "convert.py" in output
  code, output = run(tmp_path, "--config.data.dataset=imagenet2012",
                     f"--config.data.data_dir={tmp_path}")
  assert code != 0 and "ILSVRC2012_img_train.tar" in output
  assert "input_pipeline prepare imagenet2012" in output


@pytest.mark.slow
def test_two_processes_over_loopback_match_one_with_eight_devices(straight, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  with socket_port() as port:
    processes = [subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", *SHORT, f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  for reference, two_hosts in zip(jax.tree.leaves(final_params(straight[0])),
                                  jax.tree.leaves(final_params(tmp_path))):
    np.testing.assert_allclose(two_hosts, reference, rtol=1e-5, atol=1e-7)


@contextlib.contextmanager
def socket_port():
  """A free local TCP port for the coordinator."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  yield port
