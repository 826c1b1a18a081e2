"""Weights by name: hf-hub: repositories read from a hub cache laid out as huggingface_hub
lays it out (HF_HUB_OFFLINE=1), and URLs served by a local HTTP server, with the sha256
check, the cache and interrupted downloads."""

import hashlib
import http.server
import os
import pathlib
import re
import subprocess
import sys
import threading

import huggingface_hub
import numpy as np
import pytest
import torch

import convert
import riformer_jax
from riformer_jax.weights import hub, store

from conftest import relative_error
import torch_reference as ref  # before timm: its torchvision workaround
from timm.models import save_for_hf  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HUB_NAME = "hf-hub:timm/poolformer_s12.sail_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data):
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_hub_cache(cache, repo_id, files, commit=COMMIT):
  """Puts `files` ({name: path}) into `cache` as huggingface_hub stores a download:
  blobs named by their etag (sha256 for LFS files, the git blob sha1 for others),
  snapshots/COMMIT/NAME symlinks to them, refs/main holding the commit."""
  repo = pathlib.Path(cache) / f"models--{repo_id.replace('/', '--')}"
  for name, path in files.items():
    data = pathlib.Path(path).read_bytes()
    etag = (hashlib.sha256(data).hexdigest() if name.endswith((".safetensors", ".bin"))
            else git_blob_sha1(data))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / etag).write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.join("..", "..", "blobs", etag))
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
  """timm's poolformer_s12.sail_in1k, written by timm's own save_for_hf (what its
  hub repository holds), in a hub cache; the torch model for comparison."""
  torch_model = ref.randomize_(ref.timm_poolformer("s12"), seed=3)
  with torch.no_grad():  # clear rankings, for predict's test
    torch_model.head.fc.weight.mul_(4)
  torch_model.pretrained_cfg = dict(ref.timm.models.get_pretrained_cfg(
      "poolformer_s12.sail_in1k").to_dict())
  saved = tmp_path_factory.mktemp("save_for_hf")
  save_for_hf(torch_model, saved, safe_serialization=True)
  cache = tmp_path_factory.mktemp("hf_cache")
  lay_out_hub_cache(cache, "timm/poolformer_s12.sail_in1k",
                    {"config.json": saved / "config.json",
                     "model.safetensors": saved / "model.safetensors"})
  return cache, torch_model


@pytest.fixture
def offline_hub(hub_cache, tmp_path, monkeypatch):
  cache, torch_model = hub_cache
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("RIFORMER_JAX_CACHE", str(tmp_path / "riformer_cache"))
  return cache, torch_model


def same_logits(torch_model, model, variables, size=64):
  images = np.random.default_rng(0).standard_normal((2, size, size, 3), np.float32)
  return relative_error(model.apply(variables, images), ref.forward_nhwc(torch_model, images))


def test_the_test_lays_the_cache_out_as_huggingface_hub_does(hub_cache):
  cache, _ = hub_cache
  info = huggingface_hub.scan_cache_dir(cache)
  assert not info.warnings
  (repo,) = info.repos
  assert repo.repo_id == "timm/poolformer_s12.sail_in1k" and set(repo.refs) == {"main"}
  (revision,) = repo.revisions
  assert revision.commit_hash == COMMIT
  assert {f.file_name for f in revision.files} == {"config.json", "model.safetensors"}


@pytest.mark.heavy  # a convert.py process: not in `make check`
def test_convert_py_imports_a_timm_hub_name_offline(hub_cache, tmp_path):
  cache, torch_model = hub_cache
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache),
             RIFORMER_JAX_CACHE=str(tmp_path / "unused"))
  done = subprocess.run([sys.executable, "convert.py", "--src", HUB_NAME, "--dst",
                         tmp_path / "pf"], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "poolformer_s12" in done.stdout
  manifest = store.read_manifest(tmp_path / "pf")
  assert manifest["model"] == "poolformer_s12" and manifest["format"] == "timm"
  assert manifest["kwargs"] == {"head": "timm", "num_classes": 1000}
  assert manifest["source"] == HUB_NAME and manifest["revision"] == COMMIT
  # The repository's pretrained_cfg is the preprocessing predict and export use.
  assert manifest["preprocessing"] == {
      "input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic",
      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
  model, variables = riformer_jax.load_pretrained(tmp_path / "pf")
  assert same_logits(torch_model, model, variables) < 1e-5


def test_load_pretrained_of_a_hub_name_converts_once_into_the_cache(offline_hub, tmp_path):
  _, torch_model = offline_hub
  model, variables = riformer_jax.load_pretrained(HUB_NAME)
  assert same_logits(torch_model, model, variables) < 1e-5
  (converted,) = (tmp_path / "riformer_cache" / "converted").iterdir()
  assert converted.name == f"hf-hub--timm--poolformer_s12.sail_in1k--{COMMIT}--poolformer_s12"
  written = (converted / "manifest.json").stat().st_mtime_ns
  model, variables = riformer_jax.load_pretrained(HUB_NAME)
  assert (converted / "manifest.json").stat().st_mtime_ns == written  # not converted again
  assert same_logits(torch_model, model, variables) < 1e-5


def test_hub_names_that_do_not_resolve_are_named(offline_hub, tmp_path, capsys):
  assert convert.main(["--src", "hf-hub:timm/poolformer_s24.sail_in1k", "--dst",
                       str(tmp_path / "a")]) == 1
  error = capsys.readouterr().err
  assert "hf-hub:timm/poolformer_s24.sail_in1k" in error and "not in the hub cache" in error
  assert "HF_HUB_OFFLINE is set" in error
  assert convert.main(["--src", "hf-hub:poolformer_s12", "--dst", str(tmp_path / "b")]) == 1
  assert "expected hf-hub:OWNER/NAME" in capsys.readouterr().err
  assert convert.main(["--src", HUB_NAME, "--arch", "riformer_s12", "--dst",
                       str(tmp_path / "c")]) == 1
  assert "holds a poolformer_s12, not a riformer_s12" in capsys.readouterr().err
  assert not any((tmp_path / d).exists() for d in "abc")


class _Server:
  """Files from a folder on 127.0.0.1; paths under /cut/ send half the file and hang up
  (the announced Content-Length stays the whole size); /f/NAME/?dl=1 sends NAME with a
  Content-Disposition, as cloud drives' links do."""

  def __init__(self, folder):
    self.requests = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (http.server's name)
        server.requests.append(self.path)
        cut = self.path.startswith("/cut/")
        drive = re.fullmatch(r"/f/([^/]+)/\?dl=1", self.path)
        name = drive.group(1) if drive else self.path.removeprefix("/cut/").lstrip("/")
        path = pathlib.Path(folder) / name
        if not path.is_file():
          self.send_error(404)
          return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if drive:
          self.send_header("Content-Disposition", f'attachment; filename="{name}"')
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if cut else data)
        if cut:
          self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """An MMPreTrain RIFormer-S12 checkpoint, written by MMPreTrain's model and
  torch.save, served under a name carrying its sha256 prefix (as MMPreTrain's do)."""
  torch_model = ref.randomize_(ref.mmpretrain_riformer("s12"), seed=5)
  folder = tmp_path_factory.mktemp("www")
  plain = folder / "riformer-s12.pth"
  torch.save({"meta": {}, "state_dict": torch_model.state_dict()}, plain)
  digest = hashlib.sha256(plain.read_bytes()).hexdigest()
  named = folder / f"riformer-s12_32xb128_in1k_20230406-{digest[:8]}.pth"
  named.write_bytes(plain.read_bytes())
  (folder / "riformer-s12_in1k-deadbeef.pth").write_bytes(plain.read_bytes())
  (folder / "ckpt-20240101.pth").write_bytes(plain.read_bytes())  # a date, not a hash
  server = _Server(folder)
  yield server, torch_model, digest, named.name
  server.close()


def cached_files(root):
  return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*")
                if p.is_file()) if os.path.isdir(root) else []


def test_a_url_downloads_once_checked_by_the_hash_in_its_name(served, tmp_path, monkeypatch,
                                                              capsys):
  server, torch_model, digest, name = served
  monkeypatch.setenv("RIFORMER_JAX_CACHE", str(tmp_path / "cache"))
  url = f"{server.url}/{name}"
  before = len(server.requests)
  assert convert.main(["--src", url, "--arch", "riformer_s12", "--dst",
                       str(tmp_path / "out")]) == 0
  assert "warning" not in capsys.readouterr().err  # the name's hash was checked
  manifest = store.read_manifest(tmp_path / "out")
  assert manifest["source"] == url and manifest["sha256"] == digest
  model, variables = riformer_jax.load_pretrained(tmp_path / "out")
  assert same_logits(torch_model, model, variables) < 1e-5
  # load_pretrained of the same URL reuses the download and converts into the cache.
  model, variables = riformer_jax.load_pretrained(url, arch="riformer_s12")
  assert same_logits(torch_model, model, variables) < 1e-5
  assert len(server.requests) == before + 1
  downloads = [f for f in cached_files(tmp_path / "cache") if f.startswith("downloads")]
  assert len(downloads) == 1 and downloads[0].endswith(name)
  # Without --arch nothing says which model a .pth holds.
  with pytest.raises(SystemExit):
    convert.main(["--src", url, "--dst", str(tmp_path / "x")])
  assert "--arch is required" in capsys.readouterr().err


def test_a_wrong_or_interrupted_download_leaves_nothing(served, tmp_path, monkeypatch,
                                                        capsys):
  server, _, digest, name = served
  cache = tmp_path / "cache"
  monkeypatch.setenv("RIFORMER_JAX_CACHE", str(cache))
  wrong = "0" * 64
  assert convert.main(["--src", f"{server.url}/{name}", "--arch", "riformer_s12",
                       "--sha256", wrong, "--dst", str(tmp_path / "a")]) == 1
  error = capsys.readouterr().err
  assert f"sha256 {digest} does not match the expected {wrong}" in error
  # The hash in the file name is checked when no --sha256 is given.
  assert convert.main(["--src", f"{server.url}/riformer-s12_in1k-deadbeef.pth", "--arch",
                       "riformer_s12", "--dst", str(tmp_path / "b")]) == 1
  assert "does not match the expected deadbeef..." in capsys.readouterr().err
  assert convert.main(["--src", f"{server.url}/cut/{name}", "--arch", "riformer_s12",
                       "--dst", str(tmp_path / "c")]) == 1
  assert "the download stopped after" in capsys.readouterr().err
  assert convert.main(["--src", f"{server.url}/missing-0123abcd.pth", "--arch",
                       "riformer_s12", "--dst", str(tmp_path / "d")]) == 1
  assert "download failed (HTTP Error 404" in capsys.readouterr().err
  assert cached_files(cache) == []
  assert not any((tmp_path / d).exists() for d in "abcd")


def test_a_url_without_a_hash_is_downloaded_with_a_warning_naming_its_sha256(
    served, tmp_path, monkeypatch, capsys):
  server, _, digest, _ = served
  monkeypatch.setenv("RIFORMER_JAX_CACHE", str(tmp_path / "cache"))
  fetched = hub.fetch(f"{server.url}/riformer-s12.pth")
  assert f"no sha256 to check against (pass --sha256); it downloaded as sha256 {digest}" \
      in capsys.readouterr().err
  assert hashlib.sha256(pathlib.Path(fetched.path).read_bytes()).hexdigest() == digest
  # Decimal digits after a dash are a date or a step, not a hash prefix: fetched, with
  # the same warning (it was refused as a hash mismatch before).
  dated = hub.fetch(f"{server.url}/ckpt-20240101.pth")
  assert os.path.basename(dated.path) == "ckpt-20240101.pth"
  assert "no sha256 to check against" in capsys.readouterr().err
  # A link without a file name: the server's Content-Disposition names it.
  drive = hub.fetch(f"{server.url}/f/riformer-s12.pth/?dl=1", sha256=digest)
  assert os.path.basename(drive.path) == "riformer-s12.pth" and drive.path != fetched.path
  # A cached file that no longer matches is fetched again.
  pathlib.Path(fetched.path).write_bytes(b"rotten")
  again = hub.fetch(f"{server.url}/riformer-s12.pth", sha256=digest)
  assert hashlib.sha256(pathlib.Path(again.path).read_bytes()).hexdigest() == digest


def test_a_teacher_and_an_export_may_name_a_hub_checkpoint(offline_hub, tmp_path):
  from riformer_jax.deploy import export  # noqa: PLC0415
  from riformer_jax.train import faults, trainer  # noqa: PLC0415

  model, _ = trainer.load_model_dir(HUB_NAME, "config.teachers.logit")
  assert model.head == "timm" and model.num_classes == 1000
  with pytest.raises(faults.RunError, match=r"config.teachers.logit='hf-hub:timm/x.y': "
                     r"hf-hub:timm/x.y: not in the hub cache"):
    trainer.load_model_dir("hf-hub:timm/x.y", "config.teachers.logit")
  with pytest.raises(SystemExit) as failure:  # offline, and not in the cache
    export.main(["--src", "hf-hub:timm/x.y", "--dst", str(tmp_path / "n")])
  assert "export: hf-hub:timm/x.y: not in the hub cache" in str(failure.value)
  module, params, manifest = export.load_for_export(HUB_NAME)
  assert manifest["source"] == HUB_NAME and manifest["revision"] == COMMIT
  assert "head" in params and module.head == "timm"
  # The artifact's manifest names the hub model, not a path under the current
  # directory (it recorded os.path.abspath("hf-hub:...") before).
  record = export.export(HUB_NAME, str(tmp_path / "m"), ("jax",), resolution=32,
                         log=lambda _: None)
  assert record["source"] == HUB_NAME
