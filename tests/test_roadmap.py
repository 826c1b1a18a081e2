"""roadmap.py end to end on an image folder the test writes: the runs, the
reuse of finished runs, the aggregation over seeds and the results files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A roadmap row, Table 8's slimmed S9 and a Table 9 row with its own feature teacher.
ROWS = "pool_ce,mi_f80_r20_l4_init,t8_s9_soft,t9_l12_poolformerv2"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Two classes (bright top half / bright bottom half), 64 training images each."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for split, count in (("train", 64), ("val", 16)):
    for label, name in enumerate(("top", "bottom")):
      os.makedirs(root / split / name)
      for i in range(count):
        image = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8)
        rows = slice(0, 16) if label == 0 else slice(16, 32)
        image[rows] += 120
        Image.fromarray(image).save(root / split / name / f"{i}.png")
  return str(root)


def roadmap(workdir, data_dir, *extra):
  return subprocess.run(
      [sys.executable, "roadmap.py", f"--workdir={workdir}", "--dataset=folder",
       f"--data_dir={data_dir}", "--eval_split=val", "--num_classes=2",
       "--resolution=32", "--epochs=2", f"--rows={ROWS}", "--seeds=0,1",
       # 4 steps a run: logging each puts steps inside the module-imitation windows.
       "--set", "log_every_steps=1", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_roadmap_on_an_image_folder(tmp_path, image_folder):
  result = roadmap(tmp_path, image_folder)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert set(results["rows"]) == set(ROWS.split(","))
  for row, runs in results["rows"].items():
    assert len(runs) == 2
    final = [json.load(open(tmp_path / row / f"seed_{s}" / "final.json")) for s in (0, 1)]
    assert [r["student/top1"] for r in runs] == [f["student/top1"] for f in final]
  # Seeds differ (initialisation and batch order), so their accuracies may; the table
  # reports exactly the mean of the two.
  table = open(tmp_path / "results.md").read()
  top1 = [r["student/top1"] for r in results["rows"]["pool_ce"]]
  assert f"| `pool_ce` | Table 1: PoolFormer, CE | {np.mean(top1):.1f} ± " in table
  assert "--dataset=folder" in table.splitlines()[0]
  # Each term's size against L_soft where a logged step falls in its window (L_rel's,
  # 1/6 of 2 epochs of 2 steps, holds none).
  for term in ("mi_in", "mi_out"):
    assert f"| `mi_f80_r20_l4_init` | {term} |" in table
  # The distilled row used the teacher trained in WORKDIR/teacher on the same folder;
  # the Table 9 row its PoolFormerV2, trained there too.
  assert results["teacher"] == os.path.join(str(tmp_path), "teacher", "student")
  v2_teacher = results["feature_teachers"]["poolformerv2_s12"]["directory"]
  assert v2_teacher == os.path.join(str(tmp_path), "teacher_poolformerv2_s12", "student")
  assert f"--config.teachers.feature={v2_teacher}" in result.stdout
  assert "Feature teachers: poolformerv2_s12" in table

  # Finished runs are reused: a second call trains nothing and gives the same table.
  again = roadmap(tmp_path, image_folder)
  assert again.returncode == 0 and "resumed" not in again.stdout
  assert "python train.py" in again.stdout and "\nstep " not in again.stdout
  assert open(tmp_path / "results.md").read() == table


def test_roadmap_rejects_unknown_rows(tmp_path, capsys):
  # In this process: a fresh interpreter costs seconds of imports (the script's own
  # entry point runs in the slow end-to-end test above).
  import roadmap  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as exit_:
    roadmap.main([f"--workdir={tmp_path}", "--rows=pool_ce,affine_medium"])
  assert exit_.value.code != 0 and "affine_medium" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())  # rejected before anything ran


def test_a_teacher_that_is_not_a_model_is_one_line(tmp_path):
  import roadmap  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as exit_:
    roadmap.main([f"--workdir={tmp_path}", "--rows=pool_ce",
                  f"--teacher={tmp_path / 'none'}"])
  assert str(exit_.value).startswith(f"roadmap.py: {tmp_path / 'none'}: not a converted")


def test_presets_expand_to_the_tables_rows():
  import roadmap  # pylint: disable=import-outside-toplevel
  assert roadmap.parse_args(["--rows=table9"]).rows == [
      "t9_l12_none", "t9_l12_randformer", "t9_l12_poolformerv2", "t9_l18_none",
      "t9_l18_convformer", "t9_l18_caformer"]
  assert roadmap.parse_args(["--rows=table8,pool_ce"]).rows == [
      "pool_ce", "t8_s9_soft", "t8_xs12_soft", "mi_f80_r20_l4_init"]
  assert len(roadmap.parse_args([]).rows) == 14  # the roadmap proper by default


def test_set_overrides_every_row_and_names_bad_fields(capsys):
  import roadmap  # pylint: disable=import-outside-toplevel
  args = roadmap.parse_args(["--set", "distill.mi_reading=per_batch", "--set",
                             "losses.mi_out.weight=0", "--set", "log_every_steps=4"])
  assert args.set == [("distill.mi_reading", "per_batch"), ("losses.mi_out.weight", 0.0),
                      ("log_every_steps", 4)]
  config = roadmap.roadmap_small.get_config("mi_f80_r20_l4")
  overrides = roadmap.with_data(config, args, 4, args.set)
  assert config.distill.mi_reading == "per_batch" and config.losses.mi_out.weight == 0.0
  assert "--config.distill.mi_reading=per_batch" in overrides
  assert "--config.losses.mi_out.weight=0.0" in overrides
  for setting, message in (("distill.mi_readin=value", "no config field"),
                           ("log_every_steps=often", "expected int, got 'often'"),
                           ("distill.mi_blocks=x", "a scalar field")):
    with pytest.raises(SystemExit):
      roadmap.parse_args(["--set", setting])
    assert message in capsys.readouterr().err


def test_term_sizes_are_weighted_terms_over_soft_kd_inside_each_window(tmp_path):
  import roadmap  # pylint: disable=import-outside-toplevel
  config = roadmap.roadmap_small.get_config("mi_f80_r20_l4")  # 4 epochs
  config.distill.mi_reading = "value"
  in_w, out_w, rel_w = (config.losses[n].weight for n in ("mi_in", "mi_out", "mi_rel"))
  rel_end = config.losses.mi_rel.end_epoch  # 2/3 of an epoch
  records = [dict(epoch=e, **{"loss/soft_kd": soft, "loss/mi_in": li, "loss/mi_out": lo,
                              "loss/mi_rel": lr})
             for e, soft, li, lo, lr in ((0.1, 2.0, 40.0, 8.0, 0.5),
                                         (rel_end - 0.01, 1.0, 30.0, 6.0, 0.3),
                                         (rel_end + 0.01, 0.5, 20.0, 4.0, 0.2),
                                         (3.9, 0.25, 10.0, 2.0, 0.1))]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  sizes = roadmap.term_sizes(config, tmp_path)
  np.testing.assert_allclose(sizes["mi_rel"], (rel_w, rel_w * 0.5 / 2.0, rel_w * 0.3 / 1.0),
                             rtol=1e-6)
  # L_in' and L_out stop at 8/3 epochs: the record at 3.9 is outside their window.
  np.testing.assert_allclose(sizes["mi_in"], (in_w, in_w * 40 / 2, in_w * 20 / 0.5),
                             rtol=1e-6)
  np.testing.assert_allclose(sizes["mi_out"], (out_w, out_w * 8 / 2, out_w * 4 / 0.5),
                             rtol=1e-6)
