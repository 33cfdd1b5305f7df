"""Multitask-Spatial-1 (Goncharov et al. 2021, section 2.4) and its Multitask-Latent baseline.

One slice-wise residual U-Net feeds two heads:

* segmentation: a residual block and a 1x1 convolution on the top (most detailed) decoder level
  of each slice -> lesion logits per pixel, used for severity;
* classification: the feature map of one decoder level of every slice, stacked along z into a
  3D map (N, C, D, h, w), pyramid max-pooled (1, 2, 4, 8 bins per axis: a fixed-length vector
  for any number of slices and any crop), two fully connected layers -> one logit per series
  (sigmoid: the COVID-19 identification probability).

Train/inference parity of the classifier: it reads at most ``classifier_slices`` slices of a
series, every k-th one (k the smallest step that keeps that many). Training draws the offset at
random (:func:`classifier_slice_indices` with an ``offset``), validation and inference take the
middle offset, so the network sees the same z-sampling it was trained on, and a 1 mm and a 5 mm
reconstruction of one chest both reach it as slices about ``coverage / classifier_slices`` apart.
A padded batch carries each series' own extent (``forward(..., extents)``): the classifier pools
each series over that extent only, and in eval mode each series runs on its own, so a series
scores the same alone and inside any batch.

Which level the classifier reads is the whole difference between the variants: ``spatial-l``
reads decoder level l (1 = the top, the paper's proposal: the classifier sees the same spatial
map the lesion mask comes from); ``latent`` reads the bottleneck (no spatial structure left in
the axial plane after 6 poolings, the Multitask-Latent baseline of Amine et al. 2020).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import PreActivationHead, ResBlock2d, UNet2d, UNetConfig

SPATIAL_1 = "spatial-1"
LATENT = "latent"
_VARIANT = re.compile(r"^(spatial-[1-9][0-9]*|latent)$")


def _multitask_backbone() -> UNetConfig:
    return UNetConfig(top_decoder_blocks=1)


@dataclass(frozen=True)
class MultitaskConfig:
    """Architecture of a :class:`MultitaskNet` (stored in checkpoints, so it can be rebuilt)."""

    variant: str = SPATIAL_1
    unet: UNetConfig = field(default_factory=_multitask_backbone)
    #: Pyramid levels; level k pools to 2**k bins per axis (4 levels: 1 + 8 + 64 + 512 bins).
    pyramid_levels: int = 4
    hidden_features: int = 1024
    dropout: float = 0.5
    #: Slices the classifier reads per series (0: all), sampled as the module docstring says.
    classifier_slices: int = 32

    def __post_init__(self) -> None:
        if not _VARIANT.match(self.variant):
            raise ValueError(f"variant must be 'spatial-<level>' or 'latent', got {self.variant!r}")
        if self.shared_level > self.unet.levels:
            raise ValueError(f"{self.variant}: the U-Net has only {self.unet.levels} levels")
        if self.pyramid_levels < 1:
            raise ValueError("pyramid_levels must be >= 1")
        if self.classifier_slices < 0:
            raise ValueError("classifier_slices must be >= 0 (0: every slice)")

    @property
    def shared_level(self) -> int:
        """U-Net level (1 = top) whose decoder output the classification head reads."""
        return self.unet.levels if self.variant == LATENT else int(self.variant.split("-")[1])

    @property
    def architecture(self) -> str:
        return f"multitask-{self.variant}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultitaskConfig:
        values = dict(data)
        values["unet"] = UNetConfig(**values.get("unet", {}))
        return cls(**values)


def latent_config() -> MultitaskConfig:
    """Multitask-Latent with a pyramid small enough for the bottleneck's 256 channels."""
    return MultitaskConfig(variant=LATENT, pyramid_levels=2)


def classifier_slice_indices(depth: int, keep: int, offset: int | None = None) -> list[int]:
    """Every k-th of ``depth`` slices, k the smallest step leaving <= ``keep`` (0: all), from
    ``offset`` (None: the middle one, ``(k - 1) // 2``, what validation and inference use)."""
    if keep <= 0 or depth <= keep:
        return list(range(depth))
    step = -(-depth // keep)
    start = (step - 1) // 2 if offset is None else offset
    return list(range(start, depth, step))[:keep]


def pyramid_bins(levels: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(levels))


def pyramid_max_pool3d(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Spatial pyramid max pooling (He et al. 2014) of (N, C, D, H, W) into (N, C * sum(b**3))."""
    return torch.cat([F.adaptive_max_pool3d(x, b).flatten(1) for b in pyramid_bins(levels)], dim=1)


class ClassificationHead(nn.Module):
    """Pyramid pooling of a stacked 3D feature map, then two fully connected layers -> logit."""

    def __init__(self, channels: int, levels: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.levels = levels
        features = channels * sum(b**3 for b in pyramid_bins(levels))
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, volume_features: torch.Tensor,
                extents: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """(N, C, D, h, w) -> logits (N,); with ``extents``, series i is pooled over its own
        ``[:d, :h, :w]`` only (the rest is padding)."""
        if extents is None:
            pooled = pyramid_max_pool3d(volume_features, self.levels)
        else:
            pooled = torch.cat([pyramid_max_pool3d(volume_features[i : i + 1, :, :d, :h, :w], self.levels)
                                for i, (d, h, w) in enumerate(extents)])
        return self.head(pooled)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, features) pooled vectors -> logits (N,): the two fully connected layers."""
        h = self.dropout(pooled)
        h = self.dropout(F.relu(self.fc1(h)))
        logits: torch.Tensor = self.fc2(h).squeeze(1)
        return logits


class SegmentationHead(nn.Module):
    """Residual block + pre-activated 1x1 convolution on the top decoder level -> lesion logits."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ResBlock2d(channels, channels)
        self.out = PreActivationHead(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(self.block(x))
        return logits


def stack_slices(per_slice: torch.Tensor, series: int) -> torch.Tensor:
    """(N*D, C, h, w) slice features -> (N, C, D, h, w): the 3D map the classifier pools."""
    nd, c, h, w = per_slice.shape
    return per_slice.reshape(series, nd // series, c, h, w).permute(0, 2, 1, 3, 4)


class MultitaskNet(nn.Module):
    """Lesion segmentation per slice and identification per series, sharing one U-Net."""

    def __init__(self, config: MultitaskConfig = MultitaskConfig()) -> None:
        super().__init__()
        self.config = config
        self.backbone = UNet2d(config.unet)
        self.seg_head = SegmentationHead(self.backbone.top_channels)
        self.cls_head = ClassificationHead(
            self.backbone.level_channels(config.shared_level), config.pyramid_levels,
            config.hidden_features, config.dropout,
        )

    @property
    def shared_tap(self) -> nn.Module:
        """The no-op module whose output the classification head reads (hook it to inspect)."""
        return self.backbone.taps[self.config.shared_level - 1]

    def slice_features(self, slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, 1, H, W) windowed slices -> lesion logits (S, 1, H, W) and shared maps (S, C, h, w)."""
        levels = self.backbone(slices)
        return self.seg_head(levels[0]), levels[self.config.shared_level - 1]

    def classify(self, volume_features: torch.Tensor) -> torch.Tensor:
        """(N, C, D, h, w) stacked shared maps -> identification logits (N,)."""
        logits: torch.Tensor = self.cls_head(volume_features)
        return logits

    def identify(self, shared: torch.Tensor) -> torch.Tensor:
        """(C, D, h, w) shared maps of every slice of one series -> its identification logit (1,),
        read from the slices validation and inference sample (the middle offset)."""
        keep = classifier_slice_indices(shared.shape[1], self.config.classifier_slices)
        return self.classify(shared[:, keep].unsqueeze(0))

    def feature_extents(self, extents: Sequence[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
        """Input extents (d, h, w) on the grid of the shared level (halved, rounding up, per level down)."""
        if extents is None:
            return None
        f = 2 ** (self.config.shared_level - 1)
        return [(d, -(-h // f), -(-w // f)) for d, h, w in extents]

    def forward(self, series: torch.Tensor, extents: Sequence[tuple[int, int, int]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, H, W) windowed series -> lesion logits (N, D, H, W) and identification logits (N,).

        ``extents``: the unpadded (d, h, w) of each series in a padded batch; the classifier then
        pools each series over its own extent only. In eval mode each series also runs through
        the U-Net on its own (exactly what it gets alone: padding cannot reach its features). In
        training the batch runs as one, as the paper's does, so batch norm sees every series; only
        features within a receptive field of a padded edge differ there (the padding is air,
        0 after the window, beyond the lungs' bounding box). Lesion logits in the padding are
        meaningless: losses must leave them out.
        """
        n, d, h, w = series.shape
        if extents is None or self.training:
            seg, shared = self.slice_features(series.reshape(n * d, 1, h, w))
            return seg.reshape(n, d, h, w), self.cls_head(stack_slices(shared, n), self.feature_extents(extents))
        seg_out = series.new_zeros((n, d, h, w))
        pooled = []
        for i, (di, hi, wi) in enumerate(extents):
            seg, shared = self.slice_features(series[i, :di, :hi, :wi].reshape(di, 1, hi, wi))
            seg_out[i, :di, :hi, :wi] = seg[:, 0]
            pooled.append(pyramid_max_pool3d(stack_slices(shared, 1), self.cls_head.levels))
        return seg_out, self.cls_head.head(torch.cat(pooled))
