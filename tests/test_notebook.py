"""docs/param_surgery.ipynb runs end to end on small models and records sound numbers."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest
import safetensors.numpy

import riformer_jax
from riformer_jax.weights import store, torch_keys

pytestmark = pytest.mark.heavy  # a notebook kernel: not in `make check`

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "param_surgery.ipynb"
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)
KERNEL = "riformer-jax-tests"


def random_params(name, seed, **kwargs):
  """Params far from their init (layer scales of 1e-5 would hide a wrong fusion)."""
  model = riformer_jax.create_model(name, **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (rng.uniform(-0.25, 1.25, s.shape) if len(s.shape) == 1 else
                 rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])))
      .astype(np.float32), shapes["params"])


def use_this_interpreter(env, directory):
  """Jupyter settings for a kernel on this interpreter (the .venv's, where ipykernel
  is), under a name no other Jupyter installation defines (JUPYTER_PATH is searched
  first), with its files under `directory`."""
  spec = directory / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "riformer_jax tests", "language": "python"}))
  env.setenv("JUPYTER_PATH", str(directory / "jupyter"))
  env.setenv("JUPYTER_RUNTIME_DIR", str(directory / "runtime"))
  env.setenv("IPYTHONDIR", str(directory / "ipython"))


def execute(notebook, timeout):
  """Runs every cell as Jupyter would with the notebook opened from docs/."""
  nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=timeout,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()


def test_notebook_is_committed_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook run on an MMPreTrain-format PoolFormer-S12 file (converted by the
  notebook) and a tiny trained-RIFormer directory with its deploy form."""
  tmp = tmp_path_factory.mktemp("notebook")
  teacher = tmp / "poolformer_s12.safetensors"
  safetensors.numpy.save_file(torch_keys.state_dict_from_params(
      random_params("poolformer_s12", 0, num_classes=10), "mmpretrain"), str(teacher))
  student = random_params("riformer_s12", 1, **TINY)
  store.save_pretrained(tmp / "student", "riformer_s12", TINY, student)
  store.save_pretrained(tmp / "deploy", "riformer_s12", dict(TINY, deploy=True),
                             riformer_jax.reparameterize(student))
  with pytest.MonkeyPatch.context() as env:
    use_this_interpreter(env, tmp)
    for name, value in (("TEACHER", teacher), ("TEACHER_ARCH", "poolformer_s12"),
                        ("STUDENT", tmp / "student"),  # DEPLOY: its sibling "deploy"
                        ("RESOLUTION", 32), ("WORK_DIR", tmp / "work"),
                        ("SAVED_MODEL", 0)):
      env.setenv(name, str(value))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    execute(notebook, timeout=300)
  return notebook, tmp


def printed(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_records_exact_surgery(executed):
  notebook, tmp = executed
  code = [c for c in notebook.cells if c.cell_type == "code"]
  summary = json.loads(printed(code[-1]))
  assert summary["teacher"] == "poolformer_s12" and summary["student"] == "riformer_s12"
  assert summary["deploy_max_abs_diff"] < 1e-4
  assert summary["fused_max_abs_diff"] < 1e-4
  assert summary["export_max_abs_diff"] < 1e-4
  # S12: every tensor but the 12 blocks' affine scale and bias comes from the teacher.
  assert summary["left_at_init"] == 24
  text = "".join(printed(c) for c in code)
  assert "converted" in text and "(mmpretrain format)" in text
  assert "every copied tensor equals the teacher's: True" in text
  assert "has the same paths and shapes; max |difference| to these deploy params: 0\n" in text
  assert (tmp / "work" / "riformer_s12.jax").stat().st_size > 0
  model, _ = riformer_jax.load_pretrained(tmp / "work" / "deploy")
  assert model.deploy


def test_notebook_says_how_to_get_missing_models(tmp_path, monkeypatch):
  use_this_interpreter(monkeypatch, tmp_path)
  monkeypatch.setenv("TEACHER", str(tmp_path / "nowhere"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The cells up to the first load are enough.
  first_load = next(i for i, c in enumerate(notebook.cells) if 'load("teacher"' in c.source)
  notebook.cells = notebook.cells[:first_load + 1]
  with pytest.raises(nbclient.exceptions.CellExecutionError,
                     match=r"(?s)TEACHER=.*nowhere: no model there.*make demo"):
    execute(notebook, timeout=120)
