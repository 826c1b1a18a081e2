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
ROWS = "pool_ce,mi_f80_r20_l4_init"


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
       "--resolution=32", "--epochs=2", f"--rows={ROWS}", "--seeds=0,1", *extra],
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
  # The distilled row used the teacher trained in WORKDIR/teacher on the same folder.
  assert results["teacher"] == os.path.join(str(tmp_path), "teacher", "student")

  # Finished runs are reused: a second call trains nothing and gives the same table.
  again = roadmap(tmp_path, image_folder)
  assert again.returncode == 0 and "resumed" not in again.stdout
  assert "python train.py" in again.stdout and "\nstep " not in again.stdout
  assert open(tmp_path / "results.md").read() == table


def test_roadmap_rejects_unknown_rows(tmp_path):
  result = subprocess.run([sys.executable, "roadmap.py", f"--workdir={tmp_path}",
                           "--rows=pool_ce,affine_medium"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0 and "affine_medium" in result.stderr
