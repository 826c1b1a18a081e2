"""Exported artifacts reload in a fresh process without this project and match Flax."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import riformer_jax
from riformer_jax import export, pretrained
from conftest import TINY, randomize, relative_error

RELOAD = r"""
import sys, numpy as np
images = np.load(sys.argv[2])
if sys.argv[1].endswith(".jax"):
  import jax
  exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
  logits = [np.asarray(exported.call(images[:n])) for n in (1, len(images))]
else:
  import tensorflow as tf
  model = tf.saved_model.load(sys.argv[1])
  logits = [model.signatures["serving_default"](images=tf.constant(images[:n]))["logits"].numpy()
            for n in (1, len(images))]
np.save(sys.argv[3], logits[1]); np.save(sys.argv[3] + ".first", logits[0])
"""


@pytest.mark.slow
def test_exports_reload_without_the_project_and_match(tmp_path):
  model = riformer_jax.create_model("riformer_s12", **TINY, deploy=True)
  params = randomize(model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)))["params"], 1)
  pretrained.save_pretrained(tmp_path / "deploy", "riformer_s12",
                             dict(TINY, deploy=True), params)
  export.main(["--src", str(tmp_path / "deploy"), "--dst", str(tmp_path / "out" / "m"),
               "--resolution", "32", "--fused"])
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  expected = model.apply({"params": params}, images)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  for artifact in ("m.jax", "m_savedmodel"):
    result = tmp_path / f"{artifact}.npy"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "out" / artifact),
                    str(tmp_path / "images.npy"), str(result)],
                   cwd=tmp_path, env=env, check=True)  # cwd: the project is not importable
    assert relative_error(np.load(result), expected) < 1e-5, artifact
    assert relative_error(np.load(str(result) + ".first.npy"), expected[:1]) < 1e-5
