"""Feature networks in PyTorch that load other projects' checkpoints unchanged, cut after the last
layer the pack taps:

- `ResNetFeatures`: torchvision's ResNet/Wide-ResNet state_dict layout (`conv1`, `layer1.0.conv1`,
  `layer2.0.downsample.0`, ...), up to layer3.
- `EfficientNetLiteFeatures`: timm's `efficientnet_lite0/1/2` layout (`conv_stem`, `blocks.S.B.conv_pw`,
  ...), PyTorch-style symmetric padding, batch-norm epsilon 1e-5, ReLU6.
- `VitFeatures`: timm's `vit_small_patch14_dinov2` layout (also the facebookresearch dinov2 hub
  checkpoints, which are the same names plus `mask_token`), pre-norm blocks with LayerScale,
  LayerNorm epsilon 1e-6; the position embeddings are resampled once, at build time, to the export
  grid (bicubic with antialiasing, as timm does for a new image size).

Each network's `forward` returns the list of tapped layer outputs; the pack's aggregation is in
`export.backbones`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- ResNet (torchvision layout)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, width: int):
        super().__init__()
        mid = planes * width // 64
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)  # torchvision v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(c_in, planes * 4, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(c_in: int, c_out: int, stride: int):
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNetFeatures(nn.Module):
    """Stem, layer1..layer3 of a torchvision ResNet; forward -> [layer2 (stride 8), layer3 (stride 16)]."""

    def __init__(self, block, repeats: list[int], width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256), repeats[:3])):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, 2 if (i > 0 and j == 0) else 1, width))
                c_in = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.channels = [128 * block.expansion, 256 * block.expansion]
        self.strides = [8, 16]
        self.names = ["layer2", "layer3"]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        f2 = self.layer2(x)
        return [f2, self.layer3(f2)]


# ---------------------------------------------------------------- EfficientNet-Lite (timm layout)

LITE_STAGES = [  # (kernel, stride, expand) per stage; repeats and widths per variant below
    (3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6),
]
LITE_VARIANTS = {  # repeats per stage, output channels per stage (timm's rounding already applied)
    "efficientnet_lite0": ([1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320]),
    "efficientnet_lite1": ([1, 3, 3, 4, 4, 5, 1], [16, 24, 40, 80, 112, 192, 320]),
    "efficientnet_lite2": ([1, 3, 3, 4, 4, 5, 1], [16, 24, 48, 88, 120, 208, 352]),
}
LITE_TAP_STAGES = (2, 4, 5)  # last block of each: stride 8, 16, 32 (the default pack's 4, 10, 14 on Lite0)
LITE_BN_EPS = 1e-5


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=LITE_BN_EPS)


class DepthwiseSeparable(nn.Module):
    def __init__(self, kernel: int, stride: int, c_in: int, c_out: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(c_in, c_in, kernel, stride, kernel // 2, groups=c_in, bias=False)
        self.bn1 = _bn(c_in)
        self.conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return y + x if self.skip else y


class InvertedResidual(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.conv_pw = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv_dw = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn2 = _bn(mid)
        self.conv_pwl = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.skip else y


class EfficientNetLiteFeatures(nn.Module):
    """Stem and stages 0..5; forward -> outputs of stages 2, 4, 5 (strides 8, 16, 32)."""

    def __init__(self, variant: str):
        super().__init__()
        repeats, widths = LITE_VARIANTS[variant]
        self.conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = _bn(32)
        stages, c_in = [], 32
        for s, ((kernel, stride, expand), n, c_out) in enumerate(zip(LITE_STAGES, repeats, widths)):
            if s > max(LITE_TAP_STAGES):
                break
            blocks = []
            for j in range(n):
                st = stride if j == 0 else 1
                blocks.append(DepthwiseSeparable(kernel, st, c_in, c_out) if expand == 1
                              else InvertedResidual(kernel, st, expand, c_in, c_out))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.channels = [widths[s] for s in LITE_TAP_STAGES]
        self.strides = [8, 16, 32]
        self.names = [f"blocks.{s}" for s in LITE_TAP_STAGES]

    def forward(self, x):
        x = F.relu6(self.bn1(self.conv_stem(x)))
        out = []
        for s, stage in enumerate(self.blocks):
            x = stage(x)
            if s in LITE_TAP_STAGES:
                out.append(x)
        return out


# ---------------------------------------------------------------- ViT-S/14 DINOv2 (timm / hub layout)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """1 x (1 + g*g) x C position embeddings -> 1 x (1 + grid*grid) x C, the patch part resized
    bicubically with antialiasing (what timm's resample_abs_pos_embed does for a new image size)."""
    n = pos_embed.shape[1] - 1
    old = int(round(math.sqrt(n)))
    if old * old != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    c = patches.shape[-1]
    patches = patches.reshape(1, old, old, c).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, c)], dim=1)


class VitFeatures(nn.Module):
    """Patch embedding and blocks 0..max(taps) of a ViT-S/14; forward -> the tapped blocks' outputs,
    N x (1 + h*w) x 384 each (CLS first). `pos_embed` is resampled to `grid` by `set_grid`."""

    def __init__(self, taps: tuple[int, ...], dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 14,
                 pos_grid: int = 37):
        super().__init__()
        self.taps = tuple(taps)
        self.patch = patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.depth = depth
        self.grid_pos = None

    def set_grid(self, grid: int) -> None:
        with torch.no_grad():
            self.grid_pos = resample_pos_embed(self.pos_embed.detach(), grid)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = self.grid_pos if self.grid_pos is not None else self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        out = []
        for i, block in enumerate(self.blocks[: max(self.taps) + 1]):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out
