"""The input benchmark runs both sides on the same files and reports their ratio."""

import json
import math

import numpy as np
import pytest

from riformer_jax.bench import input as bench_input
from riformer_jax.data import augment

import torch_reference  # noqa: F401  (makes timm importable)


@pytest.mark.heavy  # real runtimes or processes: not in `make check`
def test_ours_next_to_timm_in_one_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench_input.main(["--cores", "1", "--seconds", "0.3", "--rounds", "2", "--images", "6",
                    "--batch-size", "4", "--size", "64", "--rows", "4", "7",
                    "--json", str(out)])
  table = capsys.readouterr().out
  assert "| pipeline | cores | ours img/s | timm img/s | ours / timm |" in table
  rows = json.loads(out.read_text())["rows"]
  assert [r["row"] for r in rows] == [bench_input.ROWS[3][0], bench_input.ROWS[6][0]]
  for row in rows:
    assert row["cores"] == 1 and len(row["ours_rounds"]) == len(row["timm_rounds"]) == 2
    assert row["ours"] > 0 and row["timm"] > 0
    assert row["row"] in table


def test_the_ratio_is_the_mean_rate_of_ours_over_timms_with_rounds_interleaved(
    monkeypatch):
  """Known rates in, the table's numbers out: means over rounds, ours / timm, and the
  sides taking turns (ours first in even rounds, timm first in odd ones)."""
  rates = {"ours": iter([100.0, 200.0, 600.0]), "timm": iter([50.0, 100.0, 75.0])}
  calls = []

  class FakeSide:
    def __init__(self, side, *_):
      self.side = side

    def rate(self, row, seconds):
      calls.append(self.side)
      return next(rates[self.side])

    def close(self):
      pass

  monkeypatch.setattr(bench_input, "_Side", FakeSide)
  monkeypatch.setattr(bench_input, "write_jpegs", lambda root, count: None)
  (row,) = bench_input.run(cores=(1,), rounds=3, seconds=0.1,
                           rows=[bench_input.ROWS[0][0]])
  assert calls == ["ours", "timm", "timm", "ours", "ours", "timm"]
  assert row["ours_rounds"] == [100.0, 200.0, 600.0]
  assert row["timm_rounds"] == [50.0, 100.0, 75.0]
  assert row["ours"] == 300.0 and row["timm"] == 75.0  # means, not medians
  assert math.isclose(row["ratio"], 4.0)


@pytest.mark.heavy  # a benchmark run: not in `make check`
def test_breakdown_times_every_stage(tmp_path):
  bench_input.write_jpegs(str(tmp_path), 6)
  # 20 images a stage: a stage's cost is its map's time less an empty map's, and at 64
  # px the resize costs about 0.5 ms, which 3 images under load (the other pytest
  # worker) once read as 0.
  stages = dict(bench_input.breakdown(str(tmp_path), size=64, repeats=20))
  for name in augment.RAND_INCREASING_OPS:
    assert f"  RandAugment op {name} (applied, m = 9)" in stages
  assert all(np.isfinite(ms) and ms >= 0 for ms in stages.values())
  decode = stages["draw the crop window + decode only the window"]
  assert decode > 0 and stages["resize the crop to 64, one float pass (default)"] > 0


@pytest.mark.heavy  # builds tf.data pipelines: not in `make check`
def test_each_timed_cell_of_ours_starts_a_fresh_iterator(tmp_path):
  """Our side builds its iterator per cell (and the worker drops it after), so no
  tf.data thread of ours runs during timm's cell: a second start begins again at the
  first batch instead of going on where the first left off."""
  bench_input.write_jpegs(str(tmp_path), 6)
  name = bench_input.ROWS[5][0]  # the canvas row: the recipe train.py runs
  start = bench_input._ours(str(tmp_path), [name], 1, 2, 32)[name]
  first = start()
  a, b = first(), first()
  again = start()()
  np.testing.assert_array_equal(again["image"], a["image"])
  assert not np.array_equal(a["image"], b["image"])
  assert a["image"].shape == (2, 512, 512, 3) and a["size"].shape == (2, 2)
