"""checkpointing: the recorded config, restoring past broken checkpoints, SIGTERM."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from riformer_jax.train import checkpointing, faults


def config(**changes):
  base = ml_collections.ConfigDict({"batch_size": 32, "log_every_steps": 10,
                                    "model": {"dims": (8, 16)}})
  base.update(changes)
  return base


def test_config_is_recorded_at_the_first_start_and_checked_on_resume(tmp_path):
  assert checkpointing.record_config(tmp_path, config(), resuming=False) == []
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded == {"batch_size": 32, "log_every_steps": 10, "model": {"dims": [8, 16]}}
  # Resuming: harmless changes come back to be logged, the record stays as it was.
  assert checkpointing.record_config(tmp_path, config(log_every_steps=5),
                                     resuming=True) == ["log_every_steps: 10 -> 5"]
  assert json.loads((tmp_path / "config.json").read_text()) == recorded
  with pytest.raises(faults.RunError) as error:
    checkpointing.record_config(tmp_path, config(batch_size=64), resuming=True)
  assert "batch_size: 32 -> 64" in str(error.value) and str(tmp_path) in str(error.value)
  # Accepted on request, and the new config becomes the record.
  changes = checkpointing.record_config(tmp_path, config(batch_size=64), resuming=True,
                                        accept_changes=True)
  assert changes == ["batch_size: 32 -> 64 (accepted by --accept_config_changes)"]
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 64
  # Not resuming (no checkpoint yet): the record is simply replaced.
  checkpointing.record_config(tmp_path, config(batch_size=16), resuming=False)
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 16


def test_an_unreadable_recorded_config_is_named(tmp_path):
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(faults.RunError, match="config.json: not a readable config"):
    checkpointing.record_config(tmp_path, config(), resuming=True)


def state(value):
  return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.int32(value)}


def abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0))


def test_restore_skips_broken_checkpoints_newest_first(tmp_path):
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=5)
  assert checkpoints.restore(abstract()) == (None, 0) and not checkpoints.any()
  for step in (1, 2, 3):
    checkpoints.save(step, state(step))
  checkpoints.wait()
  # 3: truncated arrays; 2: a partial copy without its data.
  for data in (tmp_path / "checkpoints" / "3").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:10])
  for data in (tmp_path / "checkpoints" / "2").rglob("d"):
    for f in data.iterdir():
      f.unlink()
  restored, step = checkpoints.restore(abstract())
  assert step == 1 and int(restored["step"]) == 1
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 1.0))
  assert sorted(os.listdir(tmp_path / "corrupt_checkpoints")) == ["2", "3"]
  assert checkpoints.latest.all_steps() == [1]
  # The step set aside can be saved again, and that new copy is what restores.
  checkpoints.save(2, state(7))
  checkpoints.wait()
  assert checkpoints.latest.all_steps() == [1, 2]
  restored, step = checkpoints.restore(abstract())
  assert step == 2 and int(restored["step"]) == 7
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 7.0))
  checkpoints.close()


def test_a_second_ctrl_c_exits_at_once(tmp_path, monkeypatch, capsys):
  preemption = checkpointing.Preemption(checkpointing.Checkpoints(tmp_path, keep=1))

  def exit_now(code):
    raise SystemExit(code)
  monkeypatch.setattr(checkpointing.os, "_exit", exit_now)
  preemption._on_signal(signal.SIGINT, None)  # the first: saves at the step's end
  assert preemption.requested == "SIGINT"
  with pytest.raises(SystemExit) as exit_:
    preemption._on_signal(signal.SIGINT, None)
  assert exit_.value.code == 130
  assert "Ctrl-C again: exiting now, without saving" in capsys.readouterr().err


def test_restore_names_the_workdir_when_nothing_restores(tmp_path):
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=5)
  checkpoints.save(4, state(4))
  checkpoints.wait()
  (tmp_path / "checkpoints" / "4" / "default" / "_METADATA").write_text("{")
  with pytest.raises(faults.RunError, match=rf"no checkpoint in {tmp_path}/checkpoints "
                                            r"restores: step 4 \(JSONDecodeError"):
    checkpoints.restore(abstract())
  assert (tmp_path / "checkpoints" / "4").is_dir()  # nothing moved


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_single_process_catches_sigterm_and_sigint_and_restores_the_handlers(
    tmp_path, sig):
  preemption = checkpointing.Preemption(checkpointing.Checkpoints(tmp_path, keep=1))
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with preemption.handling_signals():
    assert not preemption.reached(1)
    # Installed: what the kernel would run on the signal. It is called here rather
    # than sent, which ended pytest-xdist's worker process in the full suite (the
    # signals themselves reach train.py processes in test_train).
    handler = signal.getsignal(sig)
    assert handler == preemption._on_signal
    handler(sig, None)
    assert preemption.reached(2) and preemption.requested == sig.name
  assert {s: signal.getsignal(s) for s in before} == before


_SAVING_UNTIL_INTERRUPTED = """
import sys, time
import jax.numpy as jnp
from riformer_jax.train import checkpointing
checkpoints = checkpointing.Checkpoints(sys.argv[1], keep=3)
preemption = checkpointing.Preemption(checkpoints)
with preemption.handling_signals():
  step = 0
  while True:  # a step that only saves, ~8 MB each, so a Ctrl-C lands in a save
    step += 1
    checkpoints.save(step, {"w": jnp.full((2048, 1024), step, jnp.float32),
                            "step": jnp.int32(step)})
    if step == 2:
      print("saving", flush=True)
    time.sleep(0.05)
"""


def test_a_second_ctrl_c_in_a_process_exits_at_once_and_the_newest_checkpoint_restores(
    tmp_path):
  """A real process: two SIGINTs while it writes checkpoints back to back; it exits
  with 130 at once, and the newest checkpoint on disk is whole."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415
  child = subprocess.Popen([sys.executable, "-c", _SAVING_UNTIL_INTERRUPTED,
                            str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "saving"
  child.send_signal(signal.SIGINT)
  time.sleep(0.2)  # the handler has printed; more saves are under way
  child.send_signal(signal.SIGINT)
  try:
    _, err = child.communicate(timeout=30)
  finally:
    child.kill()  # still saving: the second Ctrl-C did not end it
  assert child.returncode == 130, err
  assert "Ctrl-C again: exiting now, without saving" in err
  assert "Traceback" not in err
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=3)
  assert checkpoints.any()
  big = {"w": jax.ShapeDtypeStruct((2048, 1024), jnp.float32),
         "step": jax.ShapeDtypeStruct((), jnp.int32)}
  restored, step = checkpoints.restore(big)
  assert step >= 2 and int(restored["step"]) == step
  np.testing.assert_array_equal(restored["w"], np.full((2048, 1024), step, np.float32))
  assert not (tmp_path / "corrupt_checkpoints").exists()  # nothing had to be set aside
  checkpoints.close()
