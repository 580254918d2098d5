"""The wide residual network of FixMatch / AdaMatch (WRN-28-2 and its smaller siblings), built with nn.BatchNorm2d.

Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), in the pre-activation
form used by the AdaMatch authors (google-research/adamatch, shared/zoo/wideresnet.py):
a 3x3 stem conv with 16 filters, three stages of (depth - 4) / 6 blocks with
16 x widen, 32 x widen and 64 x widen filters (strides 1, 2, 2), then
BatchNorm -> leaky ReLU (slope 0.1) -> global average pool -> linear. Every norm
is a plain ``nn.BatchNorm2d``, so :func:`ctxnorm_hf.convert_norms` can swap them
all for context layers.

    model = WideResNet(depth=28, widen_factor=2, in_chans=3, num_classes=10)   # WRN-28-2, 1.47 M parameters
    logits = model(images)                                                      # (N, 3, 32, 32) -> (N, 10)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["WideResNet", "check_depth"]

LEAKY_SLOPE = 0.1


def check_depth(depth: int) -> int:
    """Blocks per stage, (depth - 4) / 6; a depth that is not 6n + 4 with n >= 1 raises ValueError."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"a wide ResNet's depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
    return (depth - 4) // 6


class WideBasicBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(bn(conv(act(bn(x)))))), 1x1 conv shortcut when the width changes.

    ``activate_before_residual`` (first block of the network) feeds the shortcut
    with the activated input, as in the reference implementation.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int, activate_before_residual: bool, bn_momentum: float) -> None:
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.bn1 = nn.BatchNorm2d(in_chans, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.shortcut = nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False) if in_chans != out_chans or stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, out_chans, H / stride, W / stride)."""
        activated = self.act(self.bn1(x))
        residual = self.conv2(self.act(self.bn2(self.conv1(activated))))
        return self.shortcut(activated if self.activate_before_residual else x) + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for small images (32 x 32 in the paper; any size >= 4 works).

    Args:
        depth: 6n + 4 layers (28 in the paper); n blocks per stage.
        widen_factor: width multiplier k (2 in the paper).
        in_chans: image channels.
        num_classes: logits out.
        bn_momentum: torch momentum of the BatchNorms (the reference uses 0.001, i.e. 0.999 in Keras terms).
        drop_rate: dropout before the classifier.

    Shape: (N, in_chans, H, W) -> logits (N, num_classes).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        in_chans: int = 3,
        num_classes: int = 10,
        bn_momentum: float = 0.001,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        blocks_per_stage = check_depth(depth)
        widths = [16 * widen_factor * 2**stage for stage in range(3)]
        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        blocks = []
        channels = 16
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                first = index == 0
                blocks.append(
                    WideBasicBlock(channels, width, 2 if first and stage else 1, first and stage == 0, bn_momentum)
                )
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal convs (fan-out), Xavier linear head, zero biases; BatchNorm as torch initialises it."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> pooled features (N, num_features)."""
        return self.act(self.bn(self.blocks(self.stem(x)))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> logits (N, num_classes)."""
        return self.head(self.drop(self.forward_features(x)))
