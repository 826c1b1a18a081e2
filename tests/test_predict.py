"""riformer_jax.deploy.predict: timm's evaluation transform, the top classes and their names."""

import re

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import riformer_jax
from riformer_jax.deploy import predict
from riformer_jax.weights import store
import timm.data  # noqa: E402
from test_hub import HUB_NAME, hub_cache  # noqa: F401 (a fixture)
from conftest import random_params

LINE = re.compile(r"  (\d)\. +([\d.]+)%  (.+)  \(class (\d+)\)")


def write_image(path, width, height, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth gradients plus noise: resizing filters matter, as on a photograph.
  y, x = np.mgrid[:height, :width]
  base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
  pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path)
  return path


def printed(output):
  return [(float(p), name, int(k)) for _, p, name, k in LINE.findall(output)]


@pytest.mark.parametrize("size,crop_pct,interpolation,image_size", [
    (224, 0.9, "bicubic", (300, 260)),
    (224, 0.95, "bicubic", (200, 333)),
    (64, 1.0, "bilinear", (64, 64)),
    (96, 0.875, "bicubic", (97, 131)),
])
def test_preprocessing_is_timms_evaluation_transform(tmp_path, size, crop_pct, interpolation,
                                                     image_size):
  config = store.preprocessing_record(size, crop_pct, interpolation)
  transform = timm.data.create_transform(
      input_size=tuple(config["input_size"]), crop_pct=crop_pct,
      interpolation=interpolation, mean=config["mean"], std=config["std"])
  path = write_image(tmp_path / "x.png", *image_size)
  with Image.open(path) as image:
    ours = predict.preprocess(image, config)
    theirs = transform(image.convert("RGB")).permute(1, 2, 0).numpy()
  assert ours.shape == (size, size, 3)
  assert np.abs(ours - theirs).max() < 1e-5
  assert np.abs(ours).mean() > 0.3  # an image, not zeros


def test_a_hub_model_names_imagenet_classes_as_timm_ranks_them(hub_cache, tmp_path,
                                                               monkeypatch, capsys):
  cache, torch_model = hub_cache
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("RIFORMER_JAX_CACHE", str(tmp_path / "cache"))
  images = [write_image(tmp_path / "a.jpg", 320, 240, seed=1),
            write_image(tmp_path / "b.png", 180, 260, seed=2)]
  assert predict.main(["--model", HUB_NAME, *map(str, images)]) == 0
  output = capsys.readouterr().out
  # timm's own evaluation: its transform from the model's pretrained_cfg, its forward.
  config = timm.data.resolve_data_config({}, model=torch_model)
  transform = timm.data.create_transform(**config)
  with torch.no_grad():
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    probabilities = torch.softmax(torch_model(batch), -1).numpy()
  names = timm.data.ImageNetInfo()
  for image, p, block in zip(images, probabilities,
                             output.split(f"{images[1]}:")):
    rows = printed(block)
    expected = np.argsort(-p)[:5]
    assert str(image) in output and len(rows) == 5
    assert [k for _, _, k in rows] == list(expected)
    assert p[expected[0]] > 2 * p[expected[4]]  # a ranking, not a near-tie
    for shown, name, k in rows:
      assert abs(shown - 100 * p[k]) <= 0.006
      assert name == names.index_to_description(k)


def test_a_model_trained_on_folders_prints_its_folders_names(tmp_path, capsys):
  model = riformer_jax.create_model("riformer_s12", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
                                    num_classes=3)
  # Far from init (numpy draws: compiling init's random numbers costs seconds).
  params = random_params(model, jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32), 1)
  store.save_pretrained(tmp_path / "m", "riformer_s12",
                             dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3),
                             params, preprocessing=store.preprocessing_record(32, None),
                             class_names=["cat", "dog", "wombat"])
  image = write_image(tmp_path / "x.png", 40, 32)
  assert predict.main(["--model", str(tmp_path / "m"), "--top", "3", str(image)]) == 0
  rows = printed(capsys.readouterr().out)
  with Image.open(image) as pil:
    x = predict.preprocess(pil, store.preprocessing_record(32, None))
  p = np.asarray(jax.nn.softmax(jax.jit(model.apply)({"params": params}, x[None])))[0]
  assert [(name, k) for _, name, k in rows] == [
      (["cat", "dog", "wombat"][k], k) for k in np.argsort(-p)]
  assert sum(shown for shown, _, _ in rows) == pytest.approx(100, abs=0.02)


def test_bad_input_is_named(tmp_path, capsys):
  (tmp_path / "notes.jpg").write_text("not an image")
  not_an_image = str(tmp_path / "notes.jpg")
  assert predict.main(["--model", str(tmp_path / "nowhere"), not_an_image]) == 1
  assert "nowhere: not a converted model" in capsys.readouterr().err
  model = riformer_jax.create_model("poolformer_s12", depths=(1, 1, 1, 1),
                                    dims=(8, 8, 16, 16), num_classes=1000)
  params = random_params(model, jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32), 0)
  store.save_pretrained(tmp_path / "m", "poolformer_s12",
                             dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16)), params)
  assert predict.main(["--model", str(tmp_path / "m"), not_an_image]) == 1
  error = capsys.readouterr().err
  assert "notes.jpg: not a readable image" in error
  # No recorded preprocessing: ImageNet's defaults, said so; 1000 classes: ImageNet's names.
  assert "records no preprocessing" in error
  image = write_image(tmp_path / "x.png", 40, 32)
  with pytest.raises(SystemExit):  # printed no class at all before
    predict.main(["--model", str(tmp_path / "m"), "--top", "0", str(image)])
  assert "--top 0: expected at least 1" in capsys.readouterr().err
  assert predict.main(["--model", str(tmp_path / "m"), str(image)]) == 0
  names = {name for _, name, _ in printed(capsys.readouterr().out)}
  assert names <= set(predict.imagenet_class_names()) and len(names) == 5
