"""The slice-wise 2D U-Net both networks of Goncharov et al. (2021) are built on.

Section 2.2 of the paper: a 2D U-Net whose convolutions are residual blocks, applied to each
axial slice independently; section 2.4: it has 7 levels. The authors' public code fixes the rest
(checked there, written here independently): pre-activation residual blocks, max-pooling by 2
(rounding up) between levels, channels 8, 16, ..., 512 from the top level to the bottleneck,
and a decoder that upsamples bilinearly to the skip connection's size and *adds* it (no
concatenation), so the decoder output of each level has the channels of the level above it.

The decoder output of every level goes through a named no-op (:attr:`UNet2d.taps`): the
multitask classification head reads one of them, and tests hook them to prove which one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNet2d`. Channels of level l (1 = top) are ``base * 2**(l-1)``, capped."""

    levels: int = 7
    base_channels: int = 8
    max_channels: int = 512
    #: Residual blocks on the way up at the top level (the paper's lungs network has 2; the
    #: multitask backbone 1, its segmentation head adds another).
    top_decoder_blocks: int = 2

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise ValueError("a U-Net needs at least 2 levels")
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError("channels must be positive and max_channels >= base_channels")
        if self.top_decoder_blocks not in (1, 2):
            raise ValueError("top_decoder_blocks must be 1 or 2")

    def channels(self, level: int) -> int:
        """Channels inside level ``level`` (1-based)."""
        factor: int = 2 ** (level - 1)
        return min(self.base_channels * factor, self.max_channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResBlock2d(nn.Module):
    """Pre-activation residual block (He et al. 2016b): BN-ReLU-conv, BN-ReLU-conv, plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        # an nn.Identity once models.inference.fold_batchnorm has folded it into conv1
        self.bn2: nn.BatchNorm2d | nn.Identity = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        out: torch.Tensor = h + self.shortcut(x)
        return out


class PreActivationHead(nn.Module):
    """BN-ReLU-1x1 conv to per-pixel logits: the output layer of both networks."""

    def __init__(self, in_channels: int, out_channels: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.conv(F.relu(self.bn(x)))
        return logits


class UNet2d(nn.Module):
    """Residual U-Net over 2D slices (N, 1, H, W); returns every level's decoder output.

    ``forward(x)[l - 1]`` is the decoder output of level ``l``: level 1 is the top (full
    resolution, ``base_channels``), level ``levels`` the bottleneck output. Any H and W work
    (pooling rounds up, upsampling goes back to the exact skip size).
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        top = c(1)
        self.stem = nn.Conv2d(1, top, kernel_size=3, padding=1)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(1, config.levels):
            c_in = top if level == 1 else c(level - 1)
            self.encoders.append(nn.Sequential(ResBlock2d(c_in, c(level)), ResBlock2d(c(level), c(level))))
            if level == 1 and config.top_decoder_blocks == 1:
                self.decoders.append(nn.Sequential(ResBlock2d(c(1), top)))
            else:
                self.decoders.append(nn.Sequential(ResBlock2d(c(level), c(level)), ResBlock2d(c(level), c_in)))
        deepest = c(config.levels - 1)
        self.bottleneck = nn.Sequential(ResBlock2d(deepest, c(config.levels)), ResBlock2d(c(config.levels), deepest))
        #: No-ops at each level's decoder output (index l - 1 for level l), for hooks.
        self.taps = nn.ModuleList(nn.Identity() for _ in range(config.levels))

    @property
    def top_channels(self) -> int:
        return self.config.channels(1)

    def level_channels(self, level: int) -> int:
        """Channels of the decoder output of ``level`` (that of the level above; the top keeps its own)."""
        if level == 1:
            return self.config.channels(1)
        return self.config.channels(level - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        h = self.stem(x)
        for encoder in self.encoders:
            h = encoder(h)
            skips.append(h)
            h = F.max_pool2d(h, kernel_size=2, ceil_mode=True)
        h = self.taps[-1](self.bottleneck(h))
        outputs = [h]
        for level in range(len(self.encoders), 0, -1):
            skip = skips[level - 1]
            up = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = self.taps[level - 1](self.decoders[level - 1](skip + up))
            outputs.append(h)
        outputs.reverse()
        return outputs


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (what the tests pin for each architecture)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
