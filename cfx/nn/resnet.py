"""ResNet-18 layouts (3x3 stem for small images, or the standard 7x7 stem + max-pool), optionally as in DDU."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.nn.classifier import FeatureClassifier
from cfx.nn.spectral import apply_soft_spectral_norm


class AvgPoolShortcut(nn.Module):
    """Parameter-free shortcut: average-pool to the new resolution and zero-pad the extra channels.

    Used by DDU's "modified" ResNet so that the shortcut cannot increase the Lipschitz constant.
    """

    def __init__(self, stride: int, in_channels: int, out_channels: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        # An odd-sized map is subsampled (kernel 1), an even-sized one averaged over stride x stride windows.
        kernel = 1 if x.shape[-1] % 2 else self.stride
        x = F.avg_pool2d(x, kernel, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: nn.Module, avgpool_shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.activation = activation
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif avgpool_shortcut:
            self.shortcut = AvgPoolShortcut(stride, in_channels, out_channels)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.activation(out + self.shortcut(x))


class ResNet(FeatureClassifier):
    """ResNet: a stem, then four stages of basic blocks, global average pooling and a linear head.

    With ``spectral_norm=True, activation="leaky_relu", avgpool_shortcut=True`` (3x3 stem) this is the DDU /
    DeDUCE classifier (REFERENCE.md). With ``stem="imagenet"`` and the other defaults it is the standard
    ResNet-18 (7x7 stride-2 stem and 3x3 stride-2 max-pool: a 28x28 digit is 7x7 after the stem) that the DeDUCE
    reference code trains without spectral normalisation as the classifier JSMA explains.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        width: channels of the first stage; stages have ``width * (1, 2, 4, 8)`` (64 = ResNet-18).
        blocks: basic blocks per stage ((2, 2, 2, 2) = ResNet-18).
        spectral_norm: apply soft spectral normalisation to every conv and linear layer.
        coeff: the spectral-norm bound ``c``.
        activation: ``"relu"`` or ``"leaky_relu"`` (slope 0.01).
        avgpool_shortcut: parameter-free average-pool shortcuts instead of 1x1 conv projections.
        image_size: the input size the model is built for (checked, not required by the architecture).
        stem: ``"small"`` (3x3 convolution, stride 1, no max-pool) or ``"imagenet"`` (7x7 convolution, stride 2,
            then a 3x3 max-pool of stride 2).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        spectral_norm: bool = False,
        coeff: float = 4.0,
        activation: Literal["relu", "leaky_relu"] = "relu",
        avgpool_shortcut: bool = False,
        image_size: int | None = None,
        stem: Literal["small", "imagenet"] = "small",
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1:
            raise ValueError(
                f"need in_channels >= 1, num_classes >= 2, width >= 1; got {in_channels}, {num_classes}, {width}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        if stem not in ("small", "imagenet"):
            raise ValueError(f'stem must be "small" or "imagenet", got {stem!r}')
        act: nn.Module = nn.LeakyReLU(0.01) if activation == "leaky_relu" else nn.ReLU()
        if stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), act)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), act, nn.MaxPool2d(3, 2, 1)
            )
        stages = []
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            layers = []
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride, act, avgpool_shortcut))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(width * 2**s for s in range(len(blocks)))
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)
        if spectral_norm:
            apply_soft_spectral_norm(self, coeff)

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(images)
        stage_maps = []
        for stage in self.stages:
            x = stage(x)
            stage_maps.append(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), stage_maps

    @property
    def head(self) -> nn.Linear:
        """The final layer (``fc``)."""
        return self.fc

    def classify(self, features: Tensor) -> Tensor:
        return self.fc(features)
