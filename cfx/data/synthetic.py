"""A synthetic data set for tests: each class is a fixed random smooth pattern plus pixel noise."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from cfx.data.base import ImageDataModule, TensorImages


class SyntheticImages(ImageDataModule):
    """Deterministic, quickly learnable images of ``num_classes`` classes.

    Args:
        num_samples: total number of images (split stratified like any other data set).
        num_classes: number of classes.
        in_channels: image channels.
        image_size: height and width.
        noise: standard deviation of the per-pixel Gaussian noise.
        seed: seed of the patterns and the noise.
        **kwargs: see :class:`~cfx.data.base.ImageDataModule`.
    """

    def __init__(
        self,
        num_samples: int = 600,
        num_classes: int = 3,
        in_channels: int = 1,
        image_size: int = 16,
        noise: float = 0.1,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_samples = num_samples
        self._num_classes = num_classes
        self._in_channels = in_channels
        self._image_size = image_size
        self.noise = noise
        self.seed = seed

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def source_num_classes(self) -> int:
        return self._num_classes

    def load_source(self) -> TensorImages:
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.rand(self._num_classes, self._in_channels, 4, 4, generator=generator)
        patterns = F.interpolate(coarse, size=self._image_size, mode="bilinear", align_corners=False)
        labels = torch.arange(self.num_samples) % self._num_classes
        noise = self.noise * torch.randn(
            self.num_samples, self._in_channels, self._image_size, self._image_size, generator=generator
        )
        images = (patterns[labels] + noise).clamp(0, 1)
        return TensorImages((images * 255).round().to(torch.uint8), labels)
