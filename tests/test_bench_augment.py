"""The device-augmentation cost benchmark (riformer_jax.bench.augment_cost)."""

import pytest

from riformer_jax.bench import augment_cost

TINY = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 10}


@pytest.mark.heavy  # compiles three train steps: not in `make check`
def test_the_augmentation_s_share_of_the_step_is_read_from_xla():
  rows = augment_cost.step_costs("s12", batch=2, resolution=32,
                                 logit_teacher="poolformer_s12", dtype="float32",
                                 overrides=TINY, canvas=48, specs=("original",))
  assert [(r["spec"], r["resize"]) for r in rows] == [
      (None, False), ("original", False), ("original", True)]
  assert rows[-1]["input_bytes_per_image"] == 48 * 48 * 3
  plain = rows[0]
  assert plain["step_flops"] > 0 and plain["step_bytes"] > 0
  for row in rows[1:]:
    # The step with the augmentation in it costs more than without, by at least
    # what the augmentation alone costs in FLOPs; the fractions are those ratios.
    assert row["augment_flops"] > 0 and row["step_flops"] > plain["step_flops"]
    assert row["added_flops_fraction"] == pytest.approx(
        row["step_flops"] / plain["step_flops"] - 1)
    assert row["augment_flops_fraction"] == pytest.approx(
        row["augment_flops"] / plain["step_flops"])
  times = augment_cost.wall_times(batch=2, resolution=32, repeats=1, canvas=64)
  assert len(times) == 3 and all(t > 0 for t in times.values())
