"""The installable package: a wheel built from this tree, installed into a fresh virtual
environment without the training extra, used from outside the repository."""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# What only the extras bring; none may be in the base install.
EXTRAS_ONLY = ("tensorflow", "tensorflow-cpu", "tensorflow-datasets", "torch", "timm",
               "ml-collections", "onnx", "onnxruntime", "openvino", "ai-edge-litert")

# Runs in the fresh environment, from a folder outside the repository.
USE_THE_PACKAGE = textwrap.dedent("""
    import os, shutil, subprocess, sys
    import jax, numpy as np
    import riformer_jax
    from flax import traverse_util
    from riformer_jax.weights import torch_keys
    from safetensors.numpy import save_file

    assert os.path.realpath(riformer_jax.__file__).startswith(os.path.realpath(sys.prefix))
    # Create, re-parameterise, run: the training form and the fused form agree.
    tiny = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)
    model = riformer_jax.create_model("riformer_s12", **tiny)
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape, np.float32),
                          params)
    deploy = riformer_jax.create_model("riformer_s12", deploy=True, **tiny)
    fused = riformer_jax.reparameterize(params)
    out = jax.jit(model.apply)({"params": params}, images)
    assert float(np.abs(out).max()) > 0.1
    fused_out = jax.jit(deploy.apply)({"params": fused}, images)
    assert np.abs(fused_out - out).max() < 1e-4 * np.abs(out).max()
    # A timm-format safetensors file of PoolFormer-S12 through the console scripts.
    pf = riformer_jax.create_model("poolformer_s12", head="timm")
    shapes = jax.eval_shape(pf.init, jax.random.key(2), images[:1])["params"]
    pf_params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    save_file({k: np.ascontiguousarray(v) for k, v in
               torch_keys.state_dict_from_params(pf_params, "timm").items()},
              "pf.safetensors")
    def run(*argv):
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout
    print(run("riformer-convert", "--arch", "poolformer_s12", "--src", "pf.safetensors",
              "--dst", "pf"))
    _, variables = riformer_jax.load_pretrained("pf")
    loaded = traverse_util.flatten_dict(variables["params"])
    for path, value in traverse_util.flatten_dict(pf_params).items():
        assert np.array_equal(loaded[path], value), path
    print(run("riformer-export", "--src", "pf", "--dst", "out/pf", "--format", "jax"))
    with open("out/pf.jax", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    assert exported.in_avals[0].shape[1:] == (224, 224, 3)
    from PIL import Image
    pixels = (np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(48, 40, 3)
    Image.fromarray(pixels).save("x.png")
    shown = run("riformer-predict", "--model", "pf", "x.png")
    assert shown.count("%") == 5, shown
    for command in ("riformer-summary", "riformer-edge"):  # installed, not run: slow
        assert shutil.which(command), command
    for absent in ("tensorflow", "torch", "ml_collections"):
        assert absent not in sys.modules, absent
    import riformer_jax.data, riformer_jax.deploy, riformer_jax.train  # packages: light
    for module in ("riformer_jax.data.pipeline", "riformer_jax.train.trainer"):
        try:
            __import__(module)
            raise AssertionError(f"{module} imported without TensorFlow")
        except ModuleNotFoundError as e:
            assert e.name in ("tensorflow", "optax", "ml_collections"), (module, e.name)
    print("used the package")
""")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """A wheel of this tree, built from a copy (the build leaves build/ and egg-info)."""
  source = tmp_path_factory.mktemp("source")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO_ROOT / name, source)
  shutil.copytree(REPO_ROOT / "riformer_jax", source / "riformer_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  dist = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--quiet", "-w", dist, source], check=True, timeout=300)
  (path,) = dist.glob("riformer_jax-*.whl")
  return path


def requirements(wheel_path):
  with zipfile.ZipFile(wheel_path) as whl:
    (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(whl.read(name).decode())
  return metadata.get_all("Requires-Dist"), metadata.get_all("Provides-Extra")


def test_the_wheel_declares_a_light_base_and_the_extras(wheel):
  required, extras = requirements(wheel)
  base = [r.split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("_", "-")
          for r in required if "extra ==" not in r]
  assert {"jax", "flax", "orbax-checkpoint", "numpy", "safetensors",
          "huggingface-hub"} <= set(base)
  assert not set(base) & set(EXTRAS_ONLY)
  assert {"train", "torch", "edge", "dev"} <= set(extras)
  assert any(r.startswith("tensorflow-cpu") and 'extra == "train"' in r for r in required)
  with zipfile.ZipFile(wheel) as whl:
    names = whl.namelist()
    entry_points = whl.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  assert "riformer_jax/deploy/imagenet_classes.txt" in names
  for script, module in (("convert", "weights.convert"), ("predict", "deploy.predict"),
                         ("export", "deploy.export"), ("edge", "deploy.runtimes"),
                         ("summary", "models.summary")):
    assert f"riformer-{script} = riformer_jax.{module}:main" in entry_points


# What the base install's modules import, in a fresh interpreter of this environment
# (which has every extra): the console commands' modules, the pure functions on params.
BASE_IMPORTS = textwrap.dedent("""
    import sys
    import numpy as np
    import riformer_jax
    from riformer_jax.deploy import export, predict, runtimes
    from riformer_jax.models import summary
    from riformer_jax.weights import convert, hub, store
    import riformer_jax.data, riformer_jax.train, riformer_jax.bench  # packages: light
    model = riformer_jax.create_model("riformer_s12", depths=(1, 1, 1, 1),
                                      dims=(8, 8, 8, 8), num_classes=3)
    import jax
    params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3)))
    riformer_jax.reparameterize(jax.tree.map(np.ones_like, params["params"]))
    print(sorted({m.split(".")[0] for m in sys.modules}))
""")


def test_the_base_modules_import_no_extra():
  """The base install's promise, in this environment: the package, its console
  commands and its pure functions load neither TensorFlow, torch, ml_collections nor
  a runtime (the fresh venv below, behind `slow`, checks the install itself)."""
  done = subprocess.run([sys.executable, "-c", BASE_IMPORTS], capture_output=True,
                        text=True, timeout=300, cwd=REPO_ROOT)
  assert done.returncode == 0, done.stderr
  loaded = set(eval(done.stdout.strip().splitlines()[-1]))  # noqa: S307 (our own print)
  assert "riformer_jax" in loaded and "jax" in loaded
  extras = {"tensorflow", "tensorflow_datasets", "torch", "timm", "ml_collections", "onnx",
            "onnxruntime", "openvino", "ai_edge_litert"}
  assert not loaded & extras, loaded & extras


@pytest.mark.slow  # a fresh venv (45 s); the default suite: test_the_base_modules_import_no_extra
def test_a_fresh_environment_without_the_training_extra_uses_the_package(wheel, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
  python = venv / "bin" / "python"
  # The lock file as constraints: the versions this suite tests, from pip's cache.
  subprocess.run([python, "-m", "pip", "install", "--quiet", "-c",
                  REPO_ROOT / "requirements.txt", wheel], check=True, timeout=900)
  listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True,
                          capture_output=True, text=True).stdout.lower().replace("_", "-")
  installed = {line.split("==")[0] for line in listed.splitlines()}
  assert "riformer-jax" in installed and "jax" in installed
  assert not installed & set(EXTRAS_ONLY), installed & set(EXTRAS_ONLY)
  work = tmp_path / "elsewhere"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
  done = subprocess.run([python, "-c", USE_THE_PACKAGE], cwd=work, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "used the package" in done.stdout


def test_the_repository_cites_only_its_own_documents():
  tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO_ROOT, check=True, capture_output=True,
                           text=True).stdout.split()
  reference = (REPO_ROOT / "docs" / "reference.md").read_text()
  sections = set(re.findall(r"^## (\d+)\. ", reference, re.MULTILINE))
  assert sections == {"1", "2", "3", "4"}
  cited = set()
  for name in tracked:
    path = REPO_ROOT / name
    if path.suffix not in (".py", ".md", ".txt", ".toml", ".ipynb", ".cfg", ".ini", "") \
        or not path.is_file():
      continue
    text = path.read_text(errors="replace")
    # Spelt in pieces, so that this file does not cite them itself.
    for outside in ("REFERENCE" + ".md", "../" + "shared", "seeds" + "/00"):
      assert outside not in text, f"{name} cites {outside}, which is not in the repository"
    cited |= set(re.findall(r"reference\.md section (\d)", text))
  assert cited and cited <= sections  # every citation names a section that exists
