"""A PyTorch GFNet / GFNet-H of our own, as the reference for the parity tests.

GFNet has no package, so this is written from the original code's facts
(raoyongming/GFNet, `gfnet.py` and the `--finetune` loader of `main_gfnet.py`), not
copied from it. Module names follow the original so that `state_dict()` keys equal
those of the released checkpoints (`ckpt["model"]`). Like the original, a model only
runs at the `img_size` it is built for; `finetune_state_dict` adapts a state dict to
another one the way the original's fine-tuning loader does.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):

  def __init__(self, dim, hidden, drop=0.0):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()  # exact (erf)
    self.fc2 = nn.Linear(hidden, dim)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GlobalFilter(nn.Module):
  """Tokens as (B, H, W, C); the filter must have the size (H, W // 2 + 1)."""

  def __init__(self, dim, h, w):
    super().__init__()
    self.complex_weight = nn.Parameter(torch.randn(h, w, dim, 2) * 0.02)

  def forward(self, x):
    height, width = x.shape[1:3]
    spectrum = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho")
    spectrum = spectrum * torch.view_as_complex(self.complex_weight)
    return torch.fft.irfft2(spectrum, s=(height, width), dim=(1, 2), norm="ortho")


class DropPath(nn.Module):

  def __init__(self, rate):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
  """One residual: `x + drop_path(gamma * mlp(norm2(filter(norm1(x)))))`."""

  def __init__(self, dim, h, w, mlp_ratio=4.0, drop=0.0, drop_path=0.0, init_values=None):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.filter = GlobalFilter(dim, h, w)
    self.drop_path = DropPath(drop_path)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
    if init_values is not None:
      self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))
    else:
      self.gamma = None

  def forward(self, x):
    y = self.mlp(self.norm2(self.filter(self.norm1(x))))
    return x + self.drop_path(y if self.gamma is None else self.gamma * y)


class PatchEmbed(nn.Module):
  """Conv with kernel = stride = `patch`, NCHW in, (B, H, W, C) out."""

  def __init__(self, in_dim, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(in_dim, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).permute(0, 2, 3, 1)


def _ramp(rate, total):
  """torch.linspace(0, rate, total), in Python so that models build on the meta device."""
  return [rate * k / max(total - 1, 1) for k in range(total)]


class GFNet(nn.Module):

  def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=768,
               depth=12, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0):
    super().__init__()
    self.img_size = img_size
    grid = img_size // patch_size
    self.patch_embed = PatchEmbed(3, embed_dim, patch_size)
    self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, embed_dim) * 0.02)
    self.pos_drop = nn.Dropout(drop_rate)
    self.blocks = nn.ModuleList([
        Block(embed_dim, grid, grid // 2 + 1, mlp_ratio, drop_rate, rate)
        for rate in _ramp(drop_path_rate, depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()

  def forward(self, x):
    assert x.shape[-2:] == (self.img_size, self.img_size), x.shape
    x = self.patch_embed(x)
    x = self.pos_drop(x + self.pos_embed.reshape(1, *x.shape[1:]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean((1, 2)))


class GFNetPyramid(nn.Module):

  def __init__(self, img_size=224, patch_size=4, num_classes=1000,
               embed_dim=(64, 128, 256, 512), depth=(2, 2, 10, 4), mlp_ratio=(4,) * 4,
               drop_rate=0.0, drop_path_rate=0.0, init_values=1e-3, no_layerscale=False):
    super().__init__()
    self.img_size = img_size
    sizes = [img_size // patch_size >> i for i in range(4)]
    self.patch_embed = nn.ModuleList(
        [PatchEmbed(3, embed_dim[0], patch_size)] +
        [PatchEmbed(embed_dim[i], embed_dim[i + 1], 2) for i in range(3)])
    self.pos_embed = nn.Parameter(torch.randn(1, sizes[0] ** 2, embed_dim[0]) * 0.02)
    rates = iter(_ramp(drop_path_rate, sum(depth)))
    gamma = None if no_layerscale else init_values
    self.blocks = nn.ModuleList([
        nn.Sequential(*[Block(embed_dim[i], sizes[i], sizes[i] // 2 + 1, mlp_ratio[i],
                              drop_rate, next(rates), gamma) for _ in range(depth[i])])
        for i in range(4)])
    self.norm = nn.LayerNorm(embed_dim[-1], eps=1e-6)
    self.head = nn.Linear(embed_dim[-1], num_classes)

  def forward(self, x):
    assert x.shape[-2:] == (self.img_size, self.img_size), x.shape
    for i in range(4):
      x = self.patch_embed[i](x if i == 0 else x.permute(0, 3, 1, 2))
      if i == 0:  # the original has a pos_drop here but never applies it
        x = x + self.pos_embed.reshape(1, *x.shape[1:])
      x = self.blocks[i](x)
    return self.head(self.norm(x).mean((1, 2)))


def finetune_state_dict(state_dict, input_size, patch_size):
  """The original's `--finetune` resizing of a state dict to `input_size` (square).

  pos_embed: bicubic, align_corners=False, to the new patch grid; every
  complex_weight, as a 2C-channel image: bicubic, align_corners=True, to
  (h * new // orig, that // 2 + 1).
  """
  out = dict(state_dict)
  pos_embed = state_dict["pos_embed"]
  dim = pos_embed.shape[-1]
  orig = math.isqrt(pos_embed.shape[1])
  new = input_size // patch_size
  grid = pos_embed.reshape(1, orig, orig, dim).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
  out["pos_embed"] = grid.permute(0, 2, 3, 1).flatten(1, 2)
  for key, weight in state_dict.items():
    if key.endswith("complex_weight"):
      h, w, channels = weight.shape[:3]
      new_h = h * new // orig
      image = weight.reshape(1, h, w, channels * 2).permute(0, 3, 1, 2)
      image = F.interpolate(image, size=(new_h, new_h // 2 + 1), mode="bicubic",
                            align_corners=True)
      out[key] = image.permute(0, 2, 3, 1).reshape(new_h, new_h // 2 + 1, channels, 2)
  return out


def forward_nhwc(model, images):
  """float32 NHWC numpy images -> numpy logits."""
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)).numpy()
