"""reporting: the progress display (a file and a terminal), metrics.jsonl, TensorBoard
events, profiler traces."""

import io
import json
import time

import jax
import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from riformer_jax.train import reporting


class Terminal(io.StringIO):
  def isatty(self):
    return True


def report_two_intervals(workdir, stream):
  reporter = reporting.Reporter(workdir, total_steps=100, start_step=0,
                                steps_per_epoch=50, global_batch_size=64, stream=stream)
  reporter.config({"lr": 0.1, "model": {"dims": (8, 16)}}, 0)
  calls = []  # (before, after) each report, as the test's own clock sees them
  for step in range(1, 21):
    reporter.tick()
    if step % 10 == 0:
      time.sleep(0.05)
      before = time.monotonic()
      reporter.train(step, {"loss/total": jnp.float32(2.5), "learning_rate": 1e-3})
      calls.append((before, time.monotonic()))
  reporter.evaluation(20, {"student/top1": 12.5})
  reporter.close()
  return calls


def test_a_file_gets_one_line_per_interval_with_throughput_and_eta(tmp_path):
  stream = io.StringIO()
  calls = report_two_intervals(tmp_path, stream)
  lines = stream.getvalue().splitlines()
  assert [line.split()[1] for line in lines[:2]] == ["10/100", "20/100"]
  for line in lines[:2]:
    for part in ("epoch 0.", "img/s", "/device)", "ms/step", "loss 2.5", "lr 0.001",
                 "elapsed", "ETA"):
      assert part in line, (part, line)
  assert lines[2] == "step 20: student/top1=12.50"
  assert "\r" not in stream.getvalue()

  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [10, 20, 20]
  step_time = logged[1]["perf/step_time_s"]
  # The interval's wall time over its 10 steps: at least the sleep, at most what the
  # test itself saw pass from the start of the first report to the end of the second.
  assert 0.05 / 10 <= step_time <= (calls[1][1] - calls[0][0]) / 10
  assert logged[1]["perf/images_per_s"] == pytest.approx(64 / step_time)
  assert logged[1]["perf/images_per_s_per_device"] == pytest.approx(
      64 / step_time / jax.device_count())
  assert logged[1]["epoch"] == 0.4

  (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  board = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
  board.Reload()
  for m in logged:
    for name, value in m.items():
      if name != "step":
        recorded = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                    for e in board.Tensors(name)}
        assert recorded[m["step"]] == pytest.approx(value), name
  assert b'"lr": 0.1' in board.Tensors("config")[0].tensor_proto.string_val[0]
  assert "_hparams_/session_start_info" in board.Tags()["tensors"]


def test_a_terminal_gets_a_bar_redrawn_in_place(tmp_path):
  stream = Terminal()
  report_two_intervals(tmp_path, stream)
  text = stream.getvalue()
  assert "\r" in text and "20/100" in text and "img/s" in text and "ETA" in text
  assert "step 20: student/top1=12.50\n" in text  # evaluations on their own line


def test_profiler_writes_a_trace_of_the_chosen_steps(tmp_path):
  profiler = reporting.Profiler(tmp_path, (2, 2))
  step_fn = jax.jit(lambda x: x * 2)
  x, written = jnp.ones(4), []
  for step in range(6):
    profiler.before_step(step)
    x = step_fn(x)
    written.append(profiler.after_step(step, x))
  assert written == [False, False, False, True, False, False]
  assert list((tmp_path / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
  off = reporting.Profiler(tmp_path / "off", (0, 0))
  off.before_step(0)
  assert not off.after_step(0, x) and not (tmp_path / "off").exists()


def test_profiler_leaves_python_threads_alone(tmp_path, monkeypatch):
  # The Python tracer hooks every thread's state as it starts, which can crash the
  # process when one of orbax's or tf.data's threads ends at that moment.
  started = []
  monkeypatch.setattr(jax.profiler, "start_trace",
                      lambda logdir, profiler_options=None: started.append(profiler_options))
  reporting.Profiler(tmp_path, (0, 1)).before_step(0)
  (options,) = started
  assert options is not None and options.python_tracer_level == 0
