"""The PyTorch side of `riformer_jax.bench.throughput`: the original implementations, timed alike.

timm's PoolFormer v1 and MMPreTrain's RIFormer in deploy form (backbone, global
average pool, linear head: MMPreTrain's ImageClassifier), eager or `torch.compile`d,
in float32 or half precision. torch, timm and mmpretrain are development dependencies
(requirements-dev.txt); `riformer_jax.bench.throughput` imports this module only when torch is
importable.
"""

import gc
import sys
import time

import numpy as np
import torch

from riformer_jax.weights import torch_keys

_LIBRARIES = []  # torch.library registrations must outlive the call that made them


def _import_torchvision():
  """`import torchvision`, working around a CUDA-only torchvision on CPU torch.

  timm and mmpretrain import torchvision. On a CPU-only torch whose only matching
  torchvision is a CUDA build, that import fails while attaching fake kernels to
  `torchvision::nms`, an operator its C++ library never got to define. Defining the
  two operator schemas ourselves lets the import finish; the models timed here never
  call these operators. Where torchvision imports cleanly (GPU hosts) nothing is
  registered, so its own operators stay in place.
  """
  try:
    import torchvision  # noqa: F401,PLC0415
    return
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
    del sys.modules[name]  # the half-imported package, so that it imports afresh
  library = torch.library.Library("torchvision", "DEF")
  library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
  _LIBRARIES.append(library)
  import torchvision  # noqa: F401,PLC0415


_import_torchvision()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device():
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtypes():
  """float32 and the accelerator's half precision; float32 only on CPU, where
  PyTorch's bfloat16 convolutions are not the fast path."""
  return ("float32", "bfloat16") if device().type == "cuda" else ("float32",)


class RIFormerClassifier(torch.nn.Module):
  """MMPreTrain's ImageClassifier around RIFormer: backbone (its last stage, normed by
  `norm6`), global average pool, `head.fc`, under MMPreTrain's state-dict names."""

  def __init__(self, arch, num_classes, deploy=True):
    super().__init__()
    # Imported here: a host may have timm without mmpretrain (the bench says so).
    from mmpretrain.models.backbones.riformer import RIFormer  # noqa: PLC0415
    self.backbone = RIFormer(arch, deploy=deploy)
    self.head = torch.nn.Module()
    self.head.fc = torch.nn.Linear(arch["embed_dims"][-1], num_classes)

  def forward(self, x):
    return self.head.fc(self.backbone(x)[-1].mean((-2, -1)))


def riformer_deploy(depths, dims, num_classes, layer_scale_init_value=1e-5):
  """MMPreTrain's RIFormer in deploy form (norm_reparam, no mixer) with its head."""
  arch = dict(layers=list(depths), embed_dims=list(dims), mlp_ratios=[4] * len(depths),
              layer_scale_init_value=layer_scale_init_value)
  return RIFormerClassifier(arch, num_classes).eval()


def timm_poolformer(size, num_classes, depths=None, dims=None):
  """timm's PoolFormer v1: the registered `poolformer_{size}`, or for another shape
  timm's MetaFormer class with the arguments that function passes."""
  import timm  # noqa: PLC0415 (after the torchvision workaround)
  from timm.models import metaformer as timm_metaformer  # noqa: PLC0415
  if depths is None:
    return timm.create_model(f"poolformer_{size}", num_classes=num_classes).eval()
  return timm_metaformer.MetaFormer(
      depths=list(depths), dims=list(dims), num_classes=num_classes,
      downsample_norm=None, mlp_act=torch.nn.GELU, mlp_bias=True,
      norm_layers=timm_metaformer.GroupNorm1, layer_scale_init_values=1e-5,
      res_scale_init_values=None, use_mlp_head=False).eval()


def load_params(module, params):
  """Our (deploy) RIFormer params into `RIFormerClassifier`, strict key matching."""
  tensors = torch_keys.state_dict_from_params(params, "mmpretrain")
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                         strict=True)
  return module


def forward_nhwc(module, images_nhwc):
  """Logits (numpy) of an NCHW PyTorch model on NHWC numpy images."""
  with torch.inference_mode():
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2))))
    return module(x).float().numpy()


def synchronize(_=None):
  """Waits for the accelerator's queue (PyTorch on CPU runs synchronously)."""
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def release():
  """Returns the memory of models no longer referenced to the device."""
  gc.collect()  # compiled modules hold reference cycles
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def prepare(module, batch, resolution, dtype, mode, channels_last=True):
  """(forward thunk, compile seconds or None, peak bytes of a call or None on CPU).

  channels_last (the default; False keeps PyTorch's NCHW): cuDNN's tensor-core convolutions and oneDNN's CPU ones are NHWC
  kernels, and in NCHW PyTorch converts layouts around them (timm PoolFormer-S12 on
  2 CPU cores: 25 img/s NCHW, 37.5 channels_last; docs/reference.md section 4).
  """
  dev = device()
  torch_dtype = DTYPES[dtype]
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  module = module.to(dev, torch_dtype, memory_format=memory_format)
  images = torch.randn(batch, 3, resolution, resolution, device=dev, dtype=torch_dtype)
  images = images.contiguous(memory_format=memory_format)
  if mode == "compile":
    module = torch.compile(module)
  elif mode != "eager":
    raise ValueError(f"mode {mode!r}: expected 'eager' or 'compile'")

  def forward():
    with torch.inference_mode():
      return module(images)

  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  # torch.compile compiles on the first call: that call's time is its compile time.
  start = time.perf_counter()
  synchronize(forward())
  compile_s = time.perf_counter() - start if mode == "compile" else None
  peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
  return forward, compile_s, peak


def configure(threads=None):
  """float32 matmuls on TF32 tensor cores, like JAX's default precision on GPUs (and
  like PyTorch's own convolutions already): the float32 rows compare like with like.
  `threads` sets PyTorch's CPU threads (default: one per core)."""
  torch.set_float32_matmul_precision("high")
  if threads:
    torch.set_num_threads(threads)


def cpu_threads():
  return torch.get_num_threads()
