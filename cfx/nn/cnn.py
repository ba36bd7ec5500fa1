"""A small convolutional classifier: fast to train, for tests and quick experiments."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.nn.classifier import FeatureClassifier


class SmallCNN(FeatureClassifier):
    """Conv-ReLU-pool stages followed by a hidden linear layer.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        channels: output channels of each conv stage (each stage halves the resolution).
        hidden: size of the penultimate feature vector.
        image_size: the input size the model is built for (checked, not required by the architecture).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (16, 32),
        hidden: int = 64,
        image_size: int | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        convs = []
        previous = in_channels
        for out_channels in channels:
            convs.append(nn.Conv2d(previous, out_channels, 3, padding=1))
            previous = out_channels
        self.convs = nn.ModuleList(convs)
        self.stage_channels = tuple(channels)
        self.hidden = nn.Linear(previous, hidden)
        self.feature_dim = hidden
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = images
        stage_maps = []
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2, ceil_mode=True)
            stage_maps.append(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.relu(self.hidden(pooled)), stage_maps

    @property
    def head(self) -> nn.Linear:
        """The final layer (``fc``)."""
        return self.fc

    def classify(self, features: Tensor) -> Tensor:
        return self.fc(features)
