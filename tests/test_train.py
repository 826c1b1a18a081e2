"""train.py end to end on the embedded data set: what a user watches, resume after
SIGTERM and kill -9, FSDP, teachers, and every fault a run meets (divergence, corrupt
checkpoints, a changed config, an unreadable teacher, a misspelt override). Runs whose
claim is the process (signals, resume, the command line's messages) are real
processes, as a user starts them; the rest call the trainer in this process."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import riformer_jax
from configs import tiny
from conftest import random_params, relative_error
from riformer_jax.data import pipeline, sources, synthetic
from riformer_jax.models import surgery
from riformer_jax.train import checkpointing, distill, faults, trainer
from riformer_jax.weights import store

pytestmark = pytest.mark.heavy  # real training processes: not in `make check`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every 4 steps: checkpoints at 4, 8 and 12. The processes share the session's
# compilation cache (conftest) with each other and with the runs in this process.
SHORT = ["--config.total_steps=12", "--config.checkpoint_every_steps=4",
         "--config.resolution=32", "--config.batch_size=32",
         "--config.model.dims=(8, 16, 24, 32)",
         f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"]


def start(workdir, *overrides, config="configs/tiny.py", env=None):
  return subprocess.Popen(
      [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
       *SHORT, *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=env)


def run(workdir, *overrides, **kwargs):
  process = start(workdir, *overrides, **kwargs)
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


def interrupt(workdir, sig, *overrides):
  """Starts a run that saves every 2 steps and sends `sig` once its first checkpoint
  is on disk (well before the run ends)."""
  process = start(workdir, "--config.checkpoint_every_steps=2", *overrides)
  checkpoints = os.path.join(workdir, "checkpoints")
  while not (os.path.isdir(checkpoints) and
             any(name.isdigit() for name in os.listdir(checkpoints))):
    assert process.poll() is None, process.stdout.read()
    time.sleep(0.05)
  process.send_signal(sig)
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


def resumed_step(output):
  (line,) = [line for line in output.splitlines() if line.startswith("resumed from step")]
  return int(line.split()[-1])


def final_params(workdir):
  _, variables = riformer_jax.load_pretrained(os.path.join(workdir, "student"))
  return jax.device_get(variables["params"])


def saved_state(workdir, step):
  """A train-state checkpoint as numpy arrays, whatever devices wrote it."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if n.isdigit())


def assert_same_tree(actual, expected, **tolerance):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    if tolerance:
      np.testing.assert_allclose(a, b, **tolerance)
    else:
      np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  code, output = run(workdir, "--config.log_every_steps=4", "--config.profile_steps=(5, 2)")
  assert code == 0, output
  return workdir, output


def tiny_config(arg=None, **changes):
  """configs/tiny.py (`arg` as after its ':') with test_train's SHORT overrides and
  `changes` ({"aug.re_prob": 0.5, ...}), for runs in this process."""
  config = tiny.get_config(arg)
  config.total_steps, config.checkpoint_every_steps = 12, 4
  config.resolution, config.batch_size, config.model.dims = 32, 32, (8, 16, 24, 32)
  for field, value in changes.items():
    node = config
    *parents, leaf = field.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def test_straight_run_reports_student_and_deploy_alike(straight):
  workdir, output = straight
  assert "deploy/top1" in output
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  final = json.loads(lines[-1])
  assert final["step"] == 12 and final["student/top1"] == final["deploy/top1"]
  # What deploy/ holds is the fold of what student/ holds (the evaluation that agrees
  # above is tested away from chance below).
  student, trained = riformer_jax.load_pretrained(workdir / "student")
  deploy, variables = riformer_jax.load_pretrained(workdir / "deploy")
  assert deploy.deploy and "norm_reparam" in variables["params"]["stages_0"]["blocks_0"]
  assert_same_tree(variables["params"], riformer_jax.reparameterize(trained["params"]))
  # What the evaluation fed the model, for export.py's manifest.
  config = json.loads((workdir / "config.json").read_text())
  for model in ("student", "deploy"):
    manifest = store.read_manifest(workdir / model)
    assert manifest["preprocessing"] == store.preprocessing_record(
        32, config["data"]["crop_pct"] or None)
    # What the outputs mean, for riformer_jax.deploy.predict.
    assert manifest["class_names"] == list(synthetic.CLASS_NAMES)


def test_the_deploy_evaluation_agrees_with_the_student_away_from_chance():
  """The trainer's evaluation of the deploy form, on params far from their init and
  labels the student gets exactly half right: the same counts, top-1 and top-5. A
  12-step run sits at chance with layer scales of 1e-5, where any fold agrees."""
  config = tiny_config()
  student, deploy = trainer.build_student(config)
  # Each image its own colour (noise alone pools to the same features everywhere).
  images = (2 * jax.random.normal(jax.random.key(0), (64, 1, 1, 3))
            + jax.random.normal(jax.random.key(3), (64, 32, 32, 3)))
  params = random_params(student, images[:1], 8)  # numpy draws: no init compiles
  head = params["head"]  # no head biases: they would pick one class for every image
  params["head"] = {"fc": dict(head["fc"], bias=0 * head["fc"]["bias"]),
                    "norm": dict(head["norm"], bias=0 * head["norm"]["bias"])}
  predicted = np.argmax(student.apply({"params": params}, images), -1)
  assert len(set(predicted.tolist())) >= 3  # not one class for every image
  labels = np.where(np.arange(64) % 2 == 0, predicted, (predicted + 1) % 10)
  batch = {"image": images, "label": labels, "mask": np.ones(64, bool)}
  state = distill.TrainState(step=0, params=params, opt_state=None)
  fns = trainer.eval_functions(config, student, deploy)
  with mock.patch.object(surgery, "reparameterize", wraps=surgery.reparameterize) as fold:
    counts = {name: np.asarray(fn(state, batch)) for name, fn in fns.items()}
  fold.assert_called_once()  # the deploy row runs the folded params, traced once
  assert counts["student"][0] == 32 and counts["student"][2] == 64
  np.testing.assert_array_equal(counts["deploy"], counts["student"])


def test_a_run_shows_progress_and_writes_tensorboard_and_its_config(straight):
  workdir, output = straight
  # Output to a pipe: one progress line per log interval, then the evaluation.
  progress = [line for line in output.splitlines() if line.startswith("step ") and
              "/12 " in line]
  assert [line.split()[1] for line in progress] == ["4/12", "8/12", "12/12"]
  for part in ("epoch", "img/s", "/device)", "ms/step", "loss", "lr", "elapsed", "ETA"):
    assert all(part in line for line in progress), (part, progress)
  assert "compiled the train step in" in output
  assert "profile of steps 5-6 written" in output
  assert list((workdir / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))

  config = json.loads((workdir / "config.json").read_text())
  assert config["batch_size"] == 32 and config["model"]["dims"] == [8, 16, 24, 32]

  # Every scalar of metrics.jsonl, at its steps, is in TensorBoard; so is the config.
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
  board = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
  board.Reload()
  assert {"config", "_hparams_/session_start_info", "perf/images_per_s",
          "student/top1"} <= set(board.Tags()["tensors"])
  assert b'"batch_size": 32' in board.Tensors("config")[0].tensor_proto.string_val[0]
  for line in logged:
    for name, value in line.items():
      if name != "step":
        recorded = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                    for e in board.Tensors(name)}
        assert recorded[line["step"]] == pytest.approx(value, rel=1e-6), name


def train_here(workdir, capsys, arg=None, **changes):
  """The trainer in this process on `tiny_config(arg, **changes)`: (final metrics or
  the `RunError`'s message, what it printed)."""
  try:
    result = trainer.train_and_evaluate(tiny_config(arg, **changes), str(workdir))
  except faults.RunError as error:
    result = str(error)
  return result, capsys.readouterr().out


def test_rerunning_a_finished_run_evaluates_it_again(straight, tmp_path, capsys):
  shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
  # A harmless change (how often to log) is accepted and said.
  final, output = train_here(tmp_path, capsys, log_every_steps=3)
  assert isinstance(final, dict), final  # finished, not a RunError
  assert "resumed from step 12" in output, output
  assert "log_every_steps: 4 -> 3" in output
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1]) == json.loads(lines[-2])  # the same final evaluation
  assert_same_tree(final_params(tmp_path), final_params(straight[0]))


@pytest.mark.parametrize("sig", [
    signal.SIGKILL, signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_interrupted_and_resumed_run_is_bit_identical(straight, tmp_path, sig):
  code, output = interrupt(tmp_path, sig, "--config.log_every_steps=4")
  if sig == signal.SIGKILL:
    assert code == -signal.SIGKILL
  elif sig == signal.SIGINT:  # Ctrl-C: the step finished and saved, exit status 130
    assert code == 130 and "Ctrl-C: finishing this step, saving" in output, output
    saved = int(output.split("SIGINT: saved step ")[1].split(",")[0])
    assert saved in checkpoint_steps(tmp_path)
    assert "train.py: interrupted (Ctrl-C)" in output and "Traceback" not in output
  else:
    assert code == 0 and "SIGTERM: saved step" in output, output
  assert not (tmp_path / "student").exists()  # it really stopped early
  code, output = run(tmp_path, "--config.log_every_steps=4",
                     env=dict(os.environ, JAX_LOG_COMPILES="1"))
  assert code == 0, output
  assert 2 <= resumed_step(output) < 12  # resumed part-way, from a checkpoint
  # The restarted run takes its train step from the persistent compilation cache.
  assert "Persistent compilation cache hit for 'jit_step_fn'" in output
  assert_same_tree(final_params(tmp_path), final_params(straight[0]))
  assert_same_tree(saved_state(tmp_path, 12), saved_state(straight[0], 12))


@pytest.mark.slow  # FSDP's results: test_distill's fsdp test; resume: the SIGKILL one
def test_fsdp_run_resumes_from_a_sharded_checkpoint(straight, tmp_path):
  code, _ = interrupt(tmp_path, signal.SIGKILL, "--config.fsdp=True")
  assert code == -signal.SIGKILL
  first = checkpoint_steps(tmp_path)[0]
  with open(tmp_path / "checkpoints" / str(first) / "default" / "_sharding") as f:
    specs = [json.loads(v)["partition_spec"] for v in json.load(f).values()]
  assert any("data" in spec for spec in specs)  # the state really is sharded on disk
  code, output = run(tmp_path, "--config.fsdp=True")
  assert code == 0, output
  assert 2 <= resumed_step(output) < 12
  # Sharded storage changes reduction orders, not the training.
  assert_same_tree(saved_state(tmp_path, 12), saved_state(straight[0], 12),
                   rtol=1e-4, atol=1e-6)


def test_a_diverging_run_stops_before_saving_non_finite_values(tmp_path, capsys):
  message, _ = train_here(tmp_path, capsys, lr=1e4)
  assert isinstance(message, str) and "non-finite" in message, message
  bad_step = int(message.split(" at step ")[1].split(":")[0])
  assert "grad_norm" in message or "loss/total" in message
  saved = checkpoint_steps(tmp_path)
  assert saved and max(saved) < bad_step and f"up to step {max(saved)} are kept" in message
  for step in saved:  # every checkpoint kept is finite
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved_state(tmp_path, step)))
  assert not (tmp_path / "student").exists() and not (tmp_path / "deploy").exists()


def test_a_corrupt_latest_checkpoint_is_set_aside_and_nothing_is_lost(straight, tmp_path,
                                                                     capsys):
  shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / "student")
  # Step 12 with truncated array files, step 8 with broken metadata.
  for data in (tmp_path / "checkpoints" / "12").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:50])
  (tmp_path / "checkpoints" / "8" / "default" / "_METADATA").write_text("{")
  final, output = train_here(tmp_path, capsys, log_every_steps=4)
  assert isinstance(final, dict), final
  assert "checkpoint step 12 does not restore" in output
  assert "checkpoint step 8 does not restore" in output
  assert resumed_step(output) == 4
  assert (tmp_path / "corrupt_checkpoints" / "12").is_dir()  # kept for a post-mortem
  assert_same_tree(final_params(tmp_path), final_params(straight[0]))

  # When no checkpoint restores: an error naming the workdir, nothing moved.
  for step in checkpoint_steps(tmp_path):
    (tmp_path / "checkpoints" / str(step) / "default" / "_METADATA").write_text("{")
  message, _ = train_here(tmp_path, capsys, log_every_steps=4)
  assert f"no checkpoint in {tmp_path}/checkpoints restores" in message
  assert checkpoint_steps(tmp_path) == [4, 8, 12]


def test_resuming_with_another_config_is_refused_before_compiling(straight, tmp_path):
  shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
  code, output = run(tmp_path, "--config.model.depths=(1, 1, 2, 2)",
                     "--config.batch_size=48", "--config.log_every_steps=4")
  assert code != 0 and "Traceback" not in output, output
  assert "model.depths: (1, 1, 2, 1) -> (1, 1, 2, 2)" in output
  assert "batch_size: 32 -> 48" in output
  assert "log_every_steps" not in output  # unchanged here, and harmless anyway
  assert "compiled" not in output


def test_distillation_with_teachers_and_teacher_init(tmp_path, capsys):
  # A converted teacher directory, as convert.py writes one.
  teacher = riformer_jax.create_model("poolformer_s12", depths=(1, 1, 2, 1),
                                      dims=(8, 16, 24, 32), num_classes=10)
  params = teacher.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  store.save_pretrained(tmp_path / "teacher", "poolformer_s12",
                             dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                                  num_classes=10), params)
  final, output = train_here(tmp_path / "run", capsys, "with_teacher", total_steps=4,
                             **{"teachers.logit": str(tmp_path / "teacher"),
                                "teachers.feature": str(tmp_path / "teacher")})
  assert isinstance(final, dict), final
  logged = list(map(json.loads,
                    (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))
  # One directory in both roles: loaded and evaluated once, reported under both.
  (teacher_line,) = [m for m in logged if "teacher_logit/top1" in m]
  assert teacher_line["teacher_feature/top1"] == teacher_line["teacher_logit/top1"]
  assert output.count("teacher_logit/top1") == 1
  train_lines = [m for m in logged if "loss/total" in m]
  assert all(m["loss/soft_kd"] > 0 and m["loss/mi_in"] > 0 and m["loss/ce"] > 0
             for m in train_lines)

  # The same directory with damaged arrays: named, with the cause, no traceback.
  for data in (tmp_path / "teacher" / "variables").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:20])
  message, _ = train_here(tmp_path / "run2", capsys, "with_teacher",
                          **{"teachers.logit": str(tmp_path / "teacher")})
  assert f"config.teachers.logit='{tmp_path / 'teacher'}' is not a readable model" in message


@pytest.mark.heavy  # a training run: not in `make check`
def test_table9_student_distils_from_a_v2_teacher_and_deploys(tmp_path, capsys):
  """riformerv2 (Table 9's student) through the trainer: soft KD and module imitation
  from a PoolFormerV2 directory, initialised from it, its deploy form evaluated and
  written as the fold of what it trained."""
  shape = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)
  teacher = riformer_jax.create_model("poolformerv2_s12", **shape)
  store.save_pretrained(tmp_path / "teacher", "poolformerv2_s12", shape, random_params(
      teacher, np.zeros((1, 32, 32, 3), np.float32), 3))
  final, output = train_here(
      tmp_path / "run", capsys, "with_teacher", total_steps=4, model_name="riformerv2_s12",
      **{"teachers.logit": str(tmp_path / "teacher"),
         "teachers.feature": str(tmp_path / "teacher")})
  assert isinstance(final, dict), final
  assert "student initialised from the feature teacher" in output
  assert final["deploy/top1"] == final["student/top1"]
  train_lines = [json.loads(line) for line in
                 (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if "loss/total" in line]
  assert all(m["loss/mi_in"] > 0 and m["loss/mi_rel"] > 0 for m in train_lines)
  student, trained = riformer_jax.load_pretrained(tmp_path / "run" / "student")
  deploy, folded = riformer_jax.load_pretrained(tmp_path / "run" / "deploy")
  assert deploy.deploy and isinstance(deploy, type(student))
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  assert relative_error(deploy.apply(folded, images), student.apply(trained, images)) < 1e-5


def test_bad_configuration_is_named(tmp_path):
  # The command line's own messages: three processes side by side.
  processes = [start(tmp_path, override) for override in (
      "--config.batch_sise=8", "--config.model.dims=(8, 16, x, 32)", "--config.lr=fast")]
  processes += [start(tmp_path, config=config) for config in (
      "configs/nonexistent.py", "configs/tiny.py:no_such_role")]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  (code, output), (dims_code, dims), (lr_code, lr), (file_code, file), (arg_code, arg) = [
      (p.returncode, out) for p, out in zip(processes, outputs)]
  assert file_code != 0 and "Traceback" not in file
  assert ("train.py: --config=configs/nonexistent.py: cannot load it ([Errno 2] No such "
          "file or directory") in file
  assert arg_code != 0 and "Traceback" not in arg
  assert "configs/tiny.py: unknown argument 'no_such_role'" in arg, arg
  assert code != 0 and "Traceback" not in output
  assert "--config.batch_sise: no such config field; did you mean --config.batch_size?" \
      in output
  assert dims_code != 0 and "Traceback" not in dims
  assert "--config.model.dims" in dims and "expected a tuple of int" in dims
  assert lr_code != 0 and "Traceback" not in lr and "--config.lr=fast" in lr
  # A RunError is what train.py prints as its one line (main); these come from the
  # trainer, so they are checked in this process.
  def fault(**changes):
    with pytest.raises(faults.RunError) as error:
      trainer.train_and_evaluate(tiny_config(**changes), str(tmp_path / "faults"))
    return str(error.value)
  assert "config.distill.mi_reading='sum': expected one of" in fault(
      **{"distill.mi_reading": "sum"})
  message = fault(**{"teachers.logit": str(tmp_path / "nowhere")})
  assert "config.teachers.logit" in message and "convert.py" in message
  assert "config.init_from" in fault(init_from=str(tmp_path))  # no manifest
  message = fault(**{"data.dataset": "imagenet2012", "data.data_dir": str(tmp_path)})
  assert "ILSVRC2012_img_train.tar" in message
  assert "riformer_jax.data.sources prepare imagenet2012" in message
  assert "config.aug.auto_augment_on='gpu': expected 'device'" in fault(
      **{"aug.auto_augment": "original", "aug.auto_augment_on": "gpu"})
  assert "set config.data.uint8_batches=True" in fault(
      **{"aug.auto_augment": "original", "data.uint8_batches": False})
  assert "config.aug.auto_augment='rand-q9': unknown RandAugment section 'q9'" in fault(
      **{"aug.auto_augment": "rand-q9"})
  assert "config.aug.resize_on='device' needs RandAugment/AutoAugment after the resize" \
      in fault(**{"aug.auto_augment": "original", "aug.auto_augment_on": "host",
                  "aug.resize_on": "device"})
  assert "config.aug.canvas=16 is smaller than config.resolution=32" in fault(
      **{"aug.resize_on": "device", "aug.canvas": 16})


def test_device_augmentation_and_erasing_train_and_resume_exactly(straight, tmp_path):
  """The paper's recipe as ImageNet configs run it: the host decodes and crops, the
  jitted step resizes the crop from its canvas, applies RandAugment and erases, on
  uint8 batches. The run finishes, the device work changed what it trained on (the
  same seed without it is the straight run), and a run resumed from its step-4
  checkpoint ends with the same params, bit for bit: the step's draws are a function
  of (seed, step)."""
  config = tiny_config(log_every_steps=4, **{
      "aug.re_prob": 0.5, "aug.auto_augment": "rand-m9-mstd0.5-inc1",
      "aug.resize_on": "device", "aug.canvas": 96})
  assert config.data.uint8_batches and config.aug.auto_augment_on == "device"
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final["student/top1"] == final["deploy/top1"]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  plain = [json.loads(line) for line in
           (straight[0] / "metrics.jsonl").read_text().splitlines()]
  loss = {m["step"]: m["loss/total"] for m in logged if "loss/total" in m}
  plain_loss = {m["step"]: m["loss/total"] for m in plain if "loss/total" in m}
  assert all(np.isfinite(v) for v in loss.values()) and set(loss) == set(plain_loss)
  assert all(loss[step] != plain_loss[step] for step in loss)
  whole = final_params(tmp_path)
  for name in ("checkpoints/8", "checkpoints/12", "student", "deploy"):
    shutil.rmtree(tmp_path / name)
  trainer.train_and_evaluate(config, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [4, 8, 12]
  assert_same_tree(final_params(tmp_path), whole)


@pytest.mark.slow
def test_two_processes_match_one_with_eight_devices_and_agree_on_sigterm(straight,
                                                                         tmp_path):
  """Two processes over loopback, one of them sent SIGTERM: orbax's preemption
  support has both save the same step and exit; resumed, they end where one process
  with eight devices does."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")

  def two_processes(*extra):
    with socket_port() as port:
      return [subprocess.Popen(
          [sys.executable, "train.py", "--config=configs/tiny.py",
           f"--workdir={tmp_path}", *SHORT, "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=100", f"--coordinator_address=localhost:{port}",
           "--num_processes=2", f"--process_id={i}", *extra],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]

  processes = two_processes()
  first = processes[0].stdout.readline()
  while not first.startswith("step 3/"):  # a few steps in: preempt the second host
    assert first, "process 0 ended early"
    first = processes[0].stdout.readline()
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert "SIGTERM: saved step" in outputs[0]
  (stopped,) = checkpoint_steps(tmp_path)
  assert 3 <= stopped < 12

  processes = two_processes()
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert resumed_step(outputs[0]) == stopped
  assert_same_tree(saved_state(tmp_path, 12), saved_state(straight[0], 12),
                   rtol=1e-5, atol=1e-7)


@contextlib.contextmanager
def socket_port():
  """A free local TCP port for the coordinator."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  yield port


def test_module_imitation_blocks_the_model_lacks_are_named(tmp_path, capsys):
  message, _ = train_here(tmp_path, capsys, **{"distill.mi_blocks": ("stages_2/blocks_5",)})
  assert message.startswith("config.distill.mi_blocks: ['stages_2/blocks_5'] are not "
                            "blocks of riformer_s12, whose depths (1, 1, 2, 1)"), message
  assert not any((tmp_path / "checkpoints").iterdir())  # refused before any step


def test_data_errors_are_one_line_naming_the_data(tmp_path, capsys):
  """An unknown TFDS name, a folder source without its root, a data set smaller than
  one global batch: `RunError`s (train.py prints them without a traceback)."""
  from PIL import Image  # noqa: PLC0415
  for label in ("a", "b"):  # 2 classes x 3 images: less than one batch of 32
    os.makedirs(tmp_path / "few" / "train" / label)
    for i in range(3):
      Image.new("RGB", (8, 8)).save(tmp_path / "few" / "train" / label / f"{i}.png")
  shutil.copytree(tmp_path / "few" / "train", tmp_path / "few" / "test")
  cases = [
      ({"data.dataset": "tfds:no_such_ds"}, "config.data: unknown TFDS data set "
       "'no_such_ds'"),
      ({"data.dataset": "folder"}, "config.data: dataset='folder' needs data_dir=<root>"),
      ({"data.dataset": "folder", "data.data_dir": str(tmp_path / "few"),
        "model.num_classes": 2},
       "config.data: folder/train has 6 examples, fewer than one global batch of 32: "
       "lower config.batch_size"),
  ]
  for index, (changes, expected) in enumerate(cases):
    message, _ = train_here(tmp_path / f"run{index}", capsys, **changes)
    assert isinstance(message, str) and message.startswith(expected), message


@pytest.mark.heavy  # two train.py processes: not in `make check`
def test_a_second_train_py_on_a_live_run_s_workdir_is_refused(tmp_path):
  first = start(tmp_path, "--config.total_steps=400")
  try:
    while not (tmp_path / "run.lock").exists():
      assert first.poll() is None, first.stdout.read()
      time.sleep(0.05)
    code, output = run(tmp_path)
    assert code == 1 and "Traceback" not in output, output
    assert (f"train.py: {tmp_path} is in use by another run (host {socket.gethostname()}, "
            f"pid {first.pid}, started ") in output
  finally:
    first.kill()
    first.wait()


def test_out_of_memory_names_the_batch_and_what_gives_memory_back(tmp_path, capsys,
                                                                   monkeypatch):
  """XLA's RESOURCE_EXHAUSTED where the train step compiles (a CPU has no device memory
  limit to run into, so the compile raises what an accelerator's XLA raises)."""
  class OutOfMemory:
    def lower(self, *args):
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes.")
  monkeypatch.setattr(trainer, "jit_train_step", lambda *args: OutOfMemory())
  message, _ = train_here(tmp_path, capsys, accum_steps=2)
  devices = jax.device_count()
  assert message.startswith(
      "out of device memory compiling or running the train step: riformer_s12 at 32 px, "
      f"{32 // devices // 2} images per device per micro-batch (config.batch_size=32 over "
      f"{devices} device(s), config.accum_steps=2); XLA: Out of memory while trying to allocate 25769803776 "
      "bytes. What gives memory back: config.accum_steps=4"), message
  assert "config.remat=True" in message and "config.fsdp=True" in message
  # Another runtime error is not mistaken for it.
  monkeypatch.setattr(OutOfMemory, "compile", lambda self: (_ for _ in ()).throw(
      jax.errors.JaxRuntimeError("INTERNAL: something else")))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    train_here(tmp_path / "other", capsys)


@pytest.fixture
def small_filesystem(tmp_path):
  """A 64 MiB tmpfs: a real filesystem that fills up. Mounting needs root (as in this
  project's CI containers); elsewhere the test says so and is skipped."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the full-disk "
                "path is then untested")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory):
  """Writes a ballast file until the filesystem is full; returns its path."""
  ballast = os.path.join(directory, "ballast")
  with open(ballast, "wb") as f:
    try:
      while True:
        f.write(b"\0" * (1 << 20))
        f.flush()
    except OSError:
      pass
  return ballast


@pytest.mark.heavy  # two training runs: not in `make check`
def test_a_full_disk_stops_the_run_and_every_earlier_checkpoint_resumes(
    straight, small_filesystem, capsys, monkeypatch):
  workdir = small_filesystem / "run"
  save = checkpointing.Checkpoints.save
  ballast = []

  def save_on_a_full_disk(self, step, state):
    if step == 8:  # the disk fills once the first checkpoint is written
      self.wait()
      ballast.append(fill(str(small_filesystem)))
    save(self, step, state)
  monkeypatch.setattr(checkpointing.Checkpoints, "save", save_on_a_full_disk)
  message, output = train_here(workdir, capsys)
  assert isinstance(message, str), message
  assert message.startswith(f"could not write ") and str(workdir) in message, message
  assert "no space left on device" in message and " MiB free" in message, message
  assert "Traceback" not in output
  assert checkpoint_steps(workdir) == [4]  # the failed write left no step 8
  assert not (workdir / "student").exists()

  monkeypatch.setattr(checkpointing.Checkpoints, "save", save)
  os.remove(ballast[0])  # room again: the same run resumes and ends as if never stopped
  final, output = train_here(workdir, capsys)
  assert isinstance(final, dict), final
  assert resumed_step(output) == 4
  assert_same_tree(final_params(workdir), final_params(straight[0]))


@pytest.mark.heavy  # two training runs: not in `make check`
def test_an_image_that_breaks_mid_run_is_skipped_counted_and_reported(tmp_path, capsys,
                                                                     monkeypatch):
  """A folder whose files passed the start-up scan and then broke (as a file replaced
  on a network filesystem): the run goes on, names the file, counts it in its metrics
  and its evaluation, and stops once more than config.data.max_bad_fraction broke."""
  from PIL import Image  # noqa: PLC0415
  rng = np.random.default_rng(0)
  for split, count in (("train", 40), ("test", 8)):
    for label in ("a", "b"):
      os.makedirs(tmp_path / "data" / split / label)
      for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
            tmp_path / "data" / split / label / f"{i}.jpg")
  broken = [tmp_path / "data" / "train" / "a" / "3.jpg",
            tmp_path / "data" / "test" / "b" / "5.jpg"]
  # The scan ran before they broke.
  monkeypatch.setattr(sources, "_scan_file", lambda path: sources._Scan(path))
  for path in broken:
    path.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9")
  # The crops and the evaluation's windows resized in the step (ImageNet's default):
  # unreadable rows then stand in as canvases too.
  data = {"data.dataset": "folder", "data.data_dir": str(tmp_path / "data"),
          "model.num_classes": 2, "total_steps": 4, "log_every_steps": 2,
          "aug.resize_on": "device", "aug.canvas": 48}
  final, output = train_here(tmp_path / "run", capsys, **data,
                             **{"data.max_bad_fraction": 0.05})
  assert isinstance(final, dict), final
  assert f"cannot read {broken[0]} (" in output
  logged = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  # Each time the shuffled batches held it: the count at the last log step.
  source = sources.get_source("folder", "train", data_dir=str(tmp_path / "data"))
  index = source.paths.index(str(broken[0]))
  times = sum(int((pipeline.train_indices(source, 32, 0, step) == index).sum())
              for step in range(4))
  assert times >= 1
  assert [m["data/unreadable"] for m in logged if "data/unreadable" in m][-1] == times
  assert final["eval/unreadable"] == 1
  message, _ = train_here(tmp_path / "strict", capsys, **data,
                          **{"data.max_bad_fraction": 0.01})
  assert message.startswith("config.data: 1 examples of folder/train could not be read "
                            "by step "), message
  assert "more than config.data.max_bad_fraction=0.01 of its 80 (1)" in message
