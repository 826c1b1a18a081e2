"""convert.py and load_pretrained on checkpoint files written by the original PyTorch code."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

import convert
import riformer_jax
from riformer_jax.weights import store
from conftest import relative_error
import torch_reference as ref


def run_convert(*args):
  return convert.main([str(a) for a in args])


def same_logits(torch_model, directory, size=64, seed=0, jit=False):
  """Relative logit error of the converted model; `jit`: one compilation instead of
  one per operation (for a model no other test here runs at this size, where eager
  operations cannot reuse earlier compilations)."""
  model, variables = riformer_jax.load_pretrained(directory)
  images = np.random.default_rng(seed).standard_normal((2, size, size, 3), np.float32)
  apply = jax.jit(model.apply) if jit else model.apply
  return relative_error(apply(variables, images), ref.forward_nhwc(torch_model, images))


@pytest.fixture(scope="module")
def riformer_pth(tmp_path_factory):
  """An MMPreTrain RIFormer-S12 checkpoint as MMPreTrain writes it, and its model."""
  torch_model = ref.randomize_(ref.mmpretrain_riformer("s12"), seed=0)
  path = tmp_path_factory.mktemp("mmpretrain") / "riformer-s12.pth"
  torch.save({"meta": {"epoch": 300}, "state_dict": torch_model.state_dict()}, path)
  return path, torch_model


def test_mmpretrain_riformer_imports_exactly_and_records_its_source(riformer_pth, tmp_path):
  path, torch_model = riformer_pth
  assert run_convert("--arch", "riformer_s12", "--src", path, "--dst", tmp_path / "out") == 0
  assert same_logits(torch_model, tmp_path / "out") < 1e-5
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["model"] == "riformer_s12"
  assert manifest["kwargs"] == {"num_classes": 1000}
  assert manifest["format"] == "mmpretrain"
  assert manifest["source"] == str(path)
  assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_mmpretrain_deploy_checkpoint_is_recognised(tmp_path):
  torch_model = ref.randomize_(ref.mmpretrain_riformer("s12"), seed=1)
  torch_model.backbone.switch_to_deploy()
  path = tmp_path / "deploy.pth"
  torch.save({"state_dict": torch_model.state_dict()}, path)
  assert run_convert("--arch", "riformer_s12", "--src", path, "--dst", tmp_path / "out") == 0
  model, _ = riformer_jax.load_pretrained(tmp_path / "out")
  assert model.deploy
  assert same_logits(torch_model, tmp_path / "out") < 1e-5


@pytest.mark.parametrize("name,suffix", [("poolformer_s12", ".safetensors"),
                                         ("caformer_s18", ".bin")])
def test_timm_hub_files_import_exactly(name, suffix, tmp_path):
  torch_model = ref.randomize_(ref.timm.create_model(name).eval(), seed=2)
  path = tmp_path / f"model{suffix}"
  if suffix == ".safetensors":
    safetensors.torch.save_file(torch_model.state_dict(), path)
  else:
    torch.save(torch_model.state_dict(), path)
  assert run_convert("--arch", name, "--src", path, "--dst", tmp_path / "out") == 0
  manifest = store.read_manifest(tmp_path / "out")
  assert manifest["format"] == "timm"
  assert same_logits(torch_model, tmp_path / "out", jit=name == "caformer_s18") < 1e-5


def test_sail_poolformer_tar_imports_exactly(tmp_path):
  torch_model = ref.randomize_(ref.mmpretrain_poolformer("s12"), seed=3)
  # sail-sg's release: a bare state dict with the original (un-prefixed) key names.
  sail = {k.removeprefix("backbone.").replace("norm6.", "norm.").replace("head.fc.", "head."): v
          for k, v in torch_model.state_dict().items()}
  path = tmp_path / "poolformer_s12.pth.tar"
  torch.save(sail, path)
  assert run_convert("--arch", "poolformer_s12", "--src", path, "--dst", tmp_path / "out") == 0
  assert store.read_manifest(tmp_path / "out")["format"] == "sail"
  assert same_logits(torch_model, tmp_path / "out") < 1e-5


def test_num_classes_replaces_only_the_classifier(riformer_pth, tmp_path):
  path, torch_model = riformer_pth
  assert run_convert("--arch", "riformer_s12", "--src", path, "--dst", tmp_path / "a",
                     "--num-classes", 37) == 0
  model, variables = riformer_jax.load_pretrained(tmp_path / "a")
  assert model.num_classes == 37
  params = variables["params"]
  assert params["head"]["fc"]["kernel"].shape == (512, 37)
  assert np.all(params["head"]["fc"]["bias"] == 0)
  assert 0.01 < np.std(params["head"]["fc"]["kernel"]) < 0.03  # trunc_normal(.02)
  # Everything before the classifier is the checkpoint's.
  features = riformer_jax.create_model("riformer_s12", num_classes=0)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3), np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    expected = torch_model.backbone(x)[-1].mean((-2, -1)).numpy()
  assert relative_error(features.apply(variables, images), expected) < 1e-5


def test_export_loads_strictly_into_mmpretrain_in_both_forms(riformer_pth, tmp_path):
  path, torch_model = riformer_pth
  run_convert("--arch", "riformer_s12", "--src", path, "--dst", tmp_path / "jax")
  images = np.random.default_rng(1).standard_normal((2, 64, 64, 3), np.float32)
  expected = ref.forward_nhwc(torch_model, images)
  for deploy in (False, True):
    out = tmp_path / f"exported_{deploy}.pth"
    args = ["--to-torch", "--src", tmp_path / "jax", "--dst", out] + ["--deploy"] * deploy
    assert run_convert(*args) == 0
    checkpoint = torch.load(out, weights_only=True)
    reloaded = ref.mmpretrain_riformer("s12", deploy=deploy)
    reloaded.load_state_dict(checkpoint["state_dict"], strict=True)
    assert relative_error(ref.forward_nhwc(reloaded, images), expected) < 1e-5


def test_jax_torch_jax_round_trip_is_bit_exact(riformer_pth, tmp_path):
  path, _ = riformer_pth
  run_convert("--arch", "riformer_s12", "--src", path, "--dst", tmp_path / "first")
  run_convert("--to-torch", "--src", tmp_path / "first", "--dst", tmp_path / "back.pth")
  run_convert("--arch", "riformer_s12", "--src", tmp_path / "back.pth",
              "--dst", tmp_path / "second")
  _, first = riformer_jax.load_pretrained(tmp_path / "first")
  _, second = riformer_jax.load_pretrained(tmp_path / "second")
  assert jax.tree.all(jax.tree.map(np.array_equal, first, second))


def test_failures_leave_nothing_behind_and_name_the_problem(riformer_pth, tmp_path, capsys):
  path, _ = riformer_pth
  dst = tmp_path / "out"
  # The wrong size: every missing/unexpected key is counted, a few are named.
  assert run_convert("--arch", "riformer_s24", "--src", path, "--dst", dst) == 1
  error = capsys.readouterr().err
  assert "missing" in error and "backbone.network.0.2.norm1.weight" in error
  assert len(error) < 2000
  # A format that cannot hold the architecture.
  assert run_convert("--arch", "convformer_s18", "--src", path, "--dst", dst) == 1
  assert "mmpretrain checkpoint holds riformer, poolformer" in capsys.readouterr().err
  # Not a checkpoint at all, and no file.
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"\x00not a pickle")
  assert run_convert("--arch", "riformer_s12", "--src", garbage, "--dst", dst) == 1
  assert "garbage.pth: not a readable PyTorch checkpoint" in capsys.readouterr().err
  assert run_convert("--arch", "riformer_s12", "--src", tmp_path / "nope.pth",
                     "--dst", dst) == 1
  assert "nope.pth: no such checkpoint file" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["garbage.pth"]  # no dst, no staging dirs

  # An existing destination is left alone without --overwrite.
  dst.mkdir()
  (dst / "keep").write_text("x")
  assert run_convert("--arch", "riformer_s12", "--src", path, "--dst", dst) == 1
  assert "exists" in capsys.readouterr().err and os.listdir(dst) == ["keep"]
  assert run_convert("--arch", "riformer_s12", "--src", path, "--dst", dst,
                     "--overwrite") == 0
  assert sorted(os.listdir(dst)) == ["manifest.json", "variables"]


def test_export_refuses_what_mmpretrain_cannot_load(tmp_path, capsys):
  torch_model = ref.randomize_(ref.timm.create_model("poolformer_s12").eval(), seed=4)
  safetensors.torch.save_file(torch_model.state_dict(), tmp_path / "pf.safetensors")
  run_convert("--arch", "poolformer_s12", "--src", tmp_path / "pf.safetensors",
              "--dst", tmp_path / "pf")
  assert run_convert("--to-torch", "--src", tmp_path / "pf", "--dst", tmp_path / "x.pth") == 1
  assert "timm's head" in capsys.readouterr().err
  assert not (tmp_path / "x.pth").exists()


def test_load_pretrained_names_what_is_wrong(riformer_pth, tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    riformer_jax.load_pretrained(tmp_path)
  path, _ = riformer_pth
  run_convert("--arch", "riformer_s12", "--src", path, "--dst", tmp_path / "out")
  manifest = tmp_path / "out" / "manifest.json"
  record = json.loads(manifest.read_text())
  record["model"] = "riformer_s24"  # a manifest that does not match its variables
  manifest.write_text(json.dumps(record))
  with pytest.raises(ValueError, match="params do not fit the model: missing"):
    riformer_jax.load_pretrained(tmp_path / "out")


@pytest.mark.parametrize("train_size", [224, 384])
def test_gfnet_checkpoint_imports_at_its_training_resolution(train_size, tmp_path):
  import torch_gfnet  # noqa: PLC0415
  torch_model = torch_gfnet.GFNet(img_size=train_size, embed_dim=256, depth=12).eval()
  ref.randomize_(torch_model, seed=5)
  path = tmp_path / "gfnet_ti.pth"
  torch.save({"model": torch_model.state_dict(), "epoch": 300}, path)
  assert run_convert("--arch", "gfnet_ti", "--src", path, "--dst", tmp_path / "out") == 0
  manifest = store.read_manifest(tmp_path / "out")
  assert manifest["format"] == "gfnet"
  assert manifest["kwargs"] == {"img_size": train_size, "num_classes": 1000}
  assert same_logits(torch_model, tmp_path / "out", size=train_size, jit=True) < 1e-5


def test_an_overwrite_that_fails_keeps_the_old_model_whole(tmp_path, monkeypatch):
  """`save_pretrained(..., overwrite=True)` (convert.py --overwrite, a run's final
  student/ and deploy/) moves the old copy aside until the new one is in place: a rename
  that fails puts it back (the old copy was deleted first before)."""
  kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=4)
  _, abstract = store.build_model("poolformer_s12", kwargs)
  def params(value):
    return jax.tree.map(lambda a: np.full(a.shape, value, np.float32), abstract)
  destination = tmp_path / "m"
  store.save_pretrained(destination, "poolformer_s12", kwargs, params(1.0))
  real_rename = os.rename
  def failing_rename(src, dst):
    if os.path.basename(str(src)).startswith(".m.") and not str(src).endswith(".replaced"):
      raise OSError(28, "No space left on device")
    return real_rename(src, dst)
  monkeypatch.setattr(os, "rename", failing_rename)
  with pytest.raises(OSError, match="No space left"):
    store.save_pretrained(destination, "poolformer_s12", kwargs, params(2.0), overwrite=True)
  monkeypatch.setattr(os, "rename", real_rename)
  _, variables = store.load_directory(destination)
  assert all(np.all(np.asarray(leaf) == 1.0) for leaf in jax.tree.leaves(variables))
  assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging copy left behind
  store.save_pretrained(destination, "poolformer_s12", kwargs, params(2.0), overwrite=True)
  _, variables = store.load_directory(destination)
  assert all(np.all(np.asarray(leaf) == 2.0) for leaf in jax.tree.leaves(variables))
  assert sorted(os.listdir(tmp_path)) == ["m"]
