"""A PyTorch reference of the original MetaFormer baselines (sail-sg/metaformer,
`metaformer_baselines.py`) for RandFormer and PoolFormerV2, written for these tests.

The original is a script, not a package, so it cannot be imported here. This module
follows its facts, checked against that file: the module names (so a state dict has
the original checkpoint's keys: `downsample_layers.{i}.{pre_norm,conv,post_norm}`,
`stages.{i}.{j}.{norm1,token_mixer,res_scale1,norm2,mlp,res_scale2}`, `norm`, `head`),
channels-last tensors inside the stages, norms without bias normalising over C (the
downsampling) or over (H, W, C) (the blocks), eps 1e-6, the StarReLU MLP without
biases, residual scales in stages 3 and 4, no layer scale, an `nn.LayerNorm` before a
linear head, and RandomMixing's frozen `softmax(rand(N, N), -1)` applied as
`einsum('mn,bnc->bmc')`.
"""

import torch
from torch import nn


class NoBiasNorm(nn.Module):
  """x - mean, over `dims`, divided by sqrt(var + eps), times a per-channel weight."""

  def __init__(self, channels, dims=(-1,), eps=1e-6):
    super().__init__()
    self.dims, self.eps = dims, eps
    self.weight = nn.Parameter(torch.ones(channels))

  def forward(self, x):
    centred = x - x.mean(self.dims, keepdim=True)
    variance = centred.pow(2).mean(self.dims, keepdim=True)
    return centred / torch.sqrt(variance + self.eps) * self.weight


class Downsampling(nn.Module):
  """NHWC in, NHWC out: [norm over C], conv, [norm over C]."""

  def __init__(self, in_channels, out_channels, kernel, stride, padding, first):
    super().__init__()
    self.pre_norm = nn.Identity() if first else NoBiasNorm(in_channels)
    self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
    self.post_norm = NoBiasNorm(out_channels) if first else nn.Identity()
    self.first = first

  def forward(self, x):
    x = self.pre_norm(x)
    x = self.conv(x if self.first else x.permute(0, 3, 1, 2))
    return self.post_norm(x.permute(0, 2, 3, 1))


class Scale(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(channels))

  def forward(self, x):
    return x * self.scale


class StarReLU(nn.Module):
  def __init__(self):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(1))
    self.bias = nn.Parameter(torch.zeros(1))

  def forward(self, x):
    return self.scale * torch.relu(x) ** 2 + self.bias


class RandomMixing(nn.Module):
  def __init__(self, num_tokens):
    super().__init__()
    self.random_matrix = nn.Parameter(
        torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1), requires_grad=False)

  def forward(self, x):
    batch, height, width, channels = x.shape
    mixed = torch.einsum("mn,bnc->bmc", self.random_matrix,
                         x.reshape(batch, height * width, channels))
    return mixed.reshape(batch, height, width, channels)


class Pooling(nn.Module):
  def __init__(self):
    super().__init__()
    self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

  def forward(self, x):
    return self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) - x


class Mlp(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.fc1 = nn.Linear(channels, 4 * channels, bias=False)
    self.act = StarReLU()
    self.fc2 = nn.Linear(4 * channels, channels, bias=False)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, channels, mixer, res_scale):
    super().__init__()
    self.norm1 = NoBiasNorm(channels, dims=(1, 2, 3))
    self.token_mixer = mixer
    self.res_scale1 = Scale(channels) if res_scale else nn.Identity()
    self.norm2 = NoBiasNorm(channels, dims=(1, 2, 3))
    self.mlp = Mlp(channels)
    self.res_scale2 = Scale(channels) if res_scale else nn.Identity()

  def forward(self, x):
    x = self.res_scale1(x) + self.token_mixer(self.norm1(x))
    return self.res_scale2(x) + self.mlp(self.norm2(x))


class MetaFormer(nn.Module):
  """`mixer` "random" (RandFormer: identity in stages 1-2, random mixing at the grids
  `tokens` gives for stages 3-4) or "pooling" (PoolFormerV2)."""

  def __init__(self, depths, dims, mixer, num_classes=1000, tokens=(196, 49)):
    super().__init__()
    ins = (3,) + tuple(dims[:-1])
    self.downsample_layers = nn.ModuleList(
        [Downsampling(ins[0], dims[0], 7, 4, 2, first=True)] +
        [Downsampling(ins[i], dims[i], 3, 2, 1, first=False) for i in range(1, 4)])

    def token_mixer(stage):
      if mixer == "pooling":
        return Pooling()
      return nn.Identity() if stage < 2 else RandomMixing(tokens[stage - 2])
    self.stages = nn.ModuleList(
        nn.Sequential(*[Block(dims[i], token_mixer(i), res_scale=i >= 2)
                        for _ in range(depths[i])]) for i in range(4))
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.head = nn.Linear(dims[-1], num_classes)

  def forward(self, images_nchw):
    x = images_nchw
    for downsample, stage in zip(self.downsample_layers, self.stages):
      x = stage(downsample(x))
    return self.head(self.norm(x.mean((1, 2))))

