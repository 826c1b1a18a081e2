"""Checkpoints by name: `hf-hub:` repositories and plain URLs, fetched into caches.

    hf-hub:timm/poolformer_s12.sail_in1k[@revision]
        huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads
        only the cache). timm's repositories hold `config.json` (architecture,
        pretrained_cfg) and `model.safetensors` (or `pytorch_model.bin`).
    https://download.openmmlab.com/.../riformer-s12_..._20230406-6741ce71.pth
        RIFORMER_JAX_CACHE/downloads (default ~/.cache/riformer_jax), checked against a
        sha256: the one given, or else the hex prefix torch.hub's convention puts at the
        end of the file name (MMPreTrain's names carry one).

`fetch(source)` returns the local weights file and what the source says about it;
`pretrained.load_pretrained` converts each source once into RIFORMER_JAX_CACHE/converted.
"""

import dataclasses
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

HF_PREFIX = "hf-hub:"
# Preferred first: safetensors needs no PyTorch to read.
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# torch.hub's check_hash convention: NAME-<first hex digits of the sha256>.EXT. A group
# of decimal digits only is a date or a step (ckpt-20240101.pth), not a hash: 8 hex
# digits of a real digest are all decimal 2.3% of the time, and such a file is then
# only unchecked (with the warning that says so), never refused.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]*[a-f][0-9a-f]*)\.[A-Za-z.]+$")


@dataclasses.dataclass
class Fetched:
  path: str                      # the local weights file
  source: str                    # as the user wrote it
  cache_key: str                 # names the converted model in the cache
  arch: str | None = None        # the model's architecture name, when the source says
  preprocessing: dict | None = None
  class_names: list | None = None
  revision: str | None = None    # the hub commit the files come from
  sha256: str | None = None      # of the file, where the fetch computed it


def is_remote(source):
  return str(source).startswith((HF_PREFIX, "http://", "https://"))


def cache_dir():
  default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "riformer_jax")
  return os.environ.get("RIFORMER_JAX_CACHE", default)


def fetch(source, sha256=None):
  """Downloads (or finds in its cache) the checkpoint that `source` names."""
  if source.startswith(HF_PREFIX):
    if sha256:
      raise ValueError(f"{source}: --sha256 applies to URLs; the hub checks its own files")
    return _fetch_hf_hub(source)
  return _fetch_url(source, sha256)


def _fetch_hf_hub(source):
  # Imported here: `import riformer_jax` stays as light as the models need.
  import huggingface_hub  # noqa: PLC0415
  from huggingface_hub import errors  # noqa: PLC0415

  repo_id, _, revision = source[len(HF_PREFIX):].partition("@")
  if repo_id.count("/") != 1:
    raise ValueError(f"{source}: expected hf-hub:OWNER/NAME[@revision], e.g. "
                     "hf-hub:timm/poolformer_s12.sail_in1k")

  def download(filename):
    try:
      return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None)
    except errors.EntryNotFoundError:  # not in the repository, or not cached offline
      raise
    except errors.RepositoryNotFoundError as e:
      raise ValueError(f"{source}: no such repository on the hub ({e})") from e
    except errors.RevisionNotFoundError as e:
      raise ValueError(f"{source}: no revision {revision!r} ({e})") from e
    except (errors.HfHubHTTPError, OSError) as e:
      raise OSError(f"{source}: {filename}: {e}") from e

  try:
    with open(download("config.json")) as f:
      config = json.load(f)
  except errors.EntryNotFoundError:
    config = {}  # not a timm repository: the caller's arch says what it holds
  except json.JSONDecodeError as e:
    raise ValueError(f"{source}: its config.json is not valid JSON ({e})") from e
  for filename in _HF_WEIGHTS:
    try:
      path = download(filename)
      break
    except errors.EntryNotFoundError as e:
      not_found = e
  else:
    if isinstance(not_found, errors.LocalEntryNotFoundError):
      why = ("HF_HUB_OFFLINE is set" if huggingface_hub.constants.is_offline_mode()
             else "the hub could not be reached")
      raise OSError(f"{source}: not in the hub cache "
                    f"({huggingface_hub.constants.HF_HUB_CACHE}) and {why} (looked for "
                    f"{' and '.join(_HF_WEIGHTS)})")
    raise FileNotFoundError(f"{source}: the repository has neither "
                            f"{' nor '.join(_HF_WEIGHTS)}")
  # hf_hub_download returns CACHE/models--OWNER--NAME/snapshots/COMMIT/FILE.
  commit = os.path.basename(os.path.dirname(path))
  cfg = config.get("pretrained_cfg", {})
  preprocessing = None
  if {"input_size", "mean", "std"} <= set(cfg):
    preprocessing = {"input_size": list(cfg["input_size"]),
                     "crop_pct": cfg.get("crop_pct", 0.875),
                     "interpolation": cfg.get("interpolation", "bicubic"),
                     "mean": list(cfg["mean"]), "std": list(cfg["std"])}
  return Fetched(path=path, source=source, arch=config.get("architecture"),
                 cache_key=f"hf-hub--{repo_id.replace('/', '--')}--{commit}",
                 preprocessing=preprocessing, class_names=config.get("label_names"),
                 revision=commit)


def sha256_of(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _expected_hash(filename, sha256):
  if sha256:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
      raise ValueError(f"--sha256 {sha256!r}: expected 64 hex digits")
    return sha256.lower()
  match = _HASH_IN_NAME.search(filename)
  return match.group(1) if match and 8 <= len(match.group(1)) <= 64 else None


def _check(digest, url, expected):
  if expected is not None and not digest.startswith(expected):
    whence = ("" if len(expected) == 64 else
              "... (the hex digits that end the file name; --sha256 overrides them)")
    raise ValueError(f"{url}: sha256 {digest} does not match the expected {expected}"
                     f"{whence}; the download is discarded")


def _fetch_url(url, sha256=None):
  """Downloads `url` once into the cache, checked against its sha256.

  Written with urllib rather than a download library (pooch would add requests and
  its own cache policy): the whole job is a stream into a temporary file in the cache,
  a hash check, and a rename, so an interrupted or wrong download leaves nothing.
  """
  folder = os.path.join(cache_dir(), "downloads",
                        hashlib.sha256(url.encode()).hexdigest()[:16])
  cached = [f for f in os.listdir(folder) if not f.startswith(".")] \
      if os.path.isdir(folder) else []
  if cached:
    path = os.path.join(folder, cached[0])
    digest = sha256_of(path)
    try:
      _check(digest, url, _expected_hash(cached[0], sha256))  # a cached file may rot
    except ValueError as e:
      print(f"warning: {e}; downloading it again", file=sys.stderr)
      os.remove(path)
      cached = []
  if not cached:
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".download.", suffix=".part", dir=folder)
    try:
      with os.fdopen(handle, "wb") as out, \
          urllib.request.urlopen(url, timeout=60) as response:
        filename = _file_name(response.url, response.headers.get_filename())
        size = int(response.headers.get("Content-Length") or -1)
        written = 0
        while chunk := response.read(1 << 20):
          out.write(chunk)
          written += len(chunk)
      if size >= 0 and written != size:
        raise OSError(f"{url}: the download stopped after {written} of {size} bytes")
      digest = sha256_of(partial)
      _check(digest, url, _expected_hash(filename, sha256))
      path = os.path.join(folder, filename)
      os.replace(partial, path)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
      raise OSError(f"{url}: download failed ({e})") from e
    except http.client.IncompleteRead as e:
      raise OSError(f"{url}: the download stopped after {len(e.partial)} bytes "
                    f"({e})") from e
    finally:
      if os.path.exists(partial):
        os.remove(partial)
      if not os.listdir(folder):
        os.rmdir(folder)
  if _expected_hash(os.path.basename(path), sha256) is None:
    print(f"warning: {url}: no sha256 to check against (pass --sha256); "
          f"it downloaded as sha256 {digest}", file=sys.stderr)
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path))
  return Fetched(path=path, source=url, cache_key=f"url--{stem}--{digest[:16]}",
                 sha256=digest)


def _file_name(url, announced):
  """The server's Content-Disposition name, else the last path part of the URL the
  redirects ended at; a name without a checkpoint suffix is taken as a .pth."""
  name = os.path.basename(announced or "") or os.path.basename(
      urllib.parse.urlparse(url).path) or "checkpoint"
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
  if not name.endswith((".pth", ".pth.tar", ".pt", ".bin", ".safetensors")):
    name += ".pth"
  return name
