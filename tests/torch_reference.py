"""The original PyTorch models (timm, MMPreTrain) as references for parity tests."""

import numpy as np
import torch

import riformer_jax
from riformer_jax.models import counting
from riformer_jax.weights import torch_keys
from conftest import relative_error


def _register_torchvision_ops():
  """Make `import torchvision` (pulled in by timm and mmpretrain) work on CPU torch.

  The only torchvision that accepts torch 2.13.0 is a CUDA build whose C++ ops do not
  load on the CPU wheel, and its import fails while registering fake kernels for
  `torchvision::nms`. Declaring the two op schemas first lets the import finish; the
  model code used here never calls those ops. Test-only workaround (docs/reference.md
  section 4).
  """
  try:
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
  except RuntimeError:  # already defined by a working torchvision build
    return
  _register_torchvision_ops.library = library  # keep the registration alive


_register_torchvision_ops()
torch.set_num_threads(2)

import timm  # noqa: E402
from mmpretrain.models.backbones.poolformer import PoolFormer  # noqa: E402
from mmpretrain.models.backbones.riformer import RIFormer  # noqa: E402


class MMPreTrainClassifier(torch.nn.Module):
  """MMPreTrain's ImageClassifier for these backbones: backbone, global pool, `head.fc`."""

  def __init__(self, backbone, num_classes):
    super().__init__()
    self.backbone = backbone
    self.head = torch.nn.Module()
    self.head.fc = torch.nn.Linear(backbone.norm6.num_channels, num_classes)

  def forward(self, x):
    features = self.backbone(x)[-1]
    return self.head.fc(features.mean((-2, -1)))


def mmpretrain_riformer(arch, num_classes=1000, deploy=False):
  return MMPreTrainClassifier(RIFormer(arch, deploy=deploy), num_classes).eval()


def mmpretrain_poolformer(arch, num_classes=1000):
  return MMPreTrainClassifier(PoolFormer(arch), num_classes).eval()


def timm_poolformer(arch, num_classes=1000):
  return timm.create_model(f"poolformer_{arch}", num_classes=num_classes).eval()


def randomize_(module, seed):
  """Overwrite every parameter with values far from their init (norm scales, layer
  scales and affine weights away from 0/1), so that parity cannot pass by accident."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      if param.ndim <= 1 or name.endswith("affine.weight"):
        param.copy_(torch.rand(param.shape, generator=generator) * 1.5 - 0.25)
      else:
        fan_in = param[0].numel()
        param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
  return module


def numpy_state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def forward_nhwc(module, images_nhwc):
  """Runs a PyTorch NCHW model on NHWC numpy images; returns numpy logits."""
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    return module(x).numpy()


def load_into_flax(torch_model, name, fmt, **overrides):
  """Our model `name` and `torch_model`'s weights converted from its `fmt` state dict."""
  model = riformer_jax.create_model(name, **overrides)
  abstract = counting.abstract_variables(model, 64)["params"]
  params = torch_keys.params_from_state_dict(numpy_state_dict(torch_model), abstract, fmt)
  return model, params


def assert_same_logits(torch_model, model, params, resolutions, seed=0):
  """The two models' logits agree (relative 1e-5) on random images of each size."""
  rng = np.random.default_rng(seed)
  for height, width in resolutions:
    images = rng.standard_normal((2, height, width, 3), dtype=np.float32)
    expected = forward_nhwc(torch_model, images)
    actual = model.apply({"params": params}, images)
    assert relative_error(actual, expected) < 1e-5, (height, width)


def timm_baseline(family, depths, dims, num_classes=10):
  """A timm MetaFormer-baselines model of any shape, built the way timm's registered
  `poolformerv2_*`, `convformer_*` and `caformer_*` functions build theirs."""
  from timm.models import metaformer as tm  # noqa: PLC0415 (after the workaround)
  family_kwargs = {
      "poolformerv2": dict(norm_layers=tm.GroupNorm1NoBias, use_mlp_head=False),
      "convformer": dict(token_mixers=tm.SepConv, norm_layers=tm.LayerNorm2dNoBias),
      "caformer": dict(token_mixers=[tm.SepConv] * 2 + [tm.Attention] * 2,
                       norm_layers=[tm.LayerNorm2dNoBias] * 2 + [tm.LayerNormNoBias] * 2),
  }[family]
  return tm.MetaFormer(depths=depths, dims=dims, num_classes=num_classes,
                       **family_kwargs).eval()
