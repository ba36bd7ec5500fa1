"""The interface every cfx classifier implements: logits plus the features explainers need."""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor, nn

from cfx.init_args import class_path, init_arguments, is_plain, record_init_arguments


class FeatureClassifier(nn.Module, abc.ABC):
    """A classifier that exposes its penultimate features and its per-stage feature maps.

    Subclasses implement :meth:`forward_features` and :meth:`classify`; ``forward`` returns logits.
    DEP reads ``stage_maps`` (one map per residual stage), DDU and DUQ read ``features``, DISC's latent-space
    semantics read either.

    Attributes:
        in_channels: image channels the network expects.
        num_classes: number of logits.
        feature_dim: size of the penultimate feature vector.
        stage_channels: channels of each stage map, in order.
        image_size: the input size the network was built for, or ``None`` if any size works.
        head: the final layer, the module ``classify`` applies to the features (``ResNet.fc``, ``SmallCNN.fc``,
            timm's classifier); DUQ freezes it.
    """

    in_channels: int
    num_classes: int
    feature_dim: int
    stage_channels: tuple[int, ...]
    image_size: int | None = None
    head: nn.Module

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record the arguments of each classifier's outermost ``__init__`` call, for :attr:`init_config`."""
        super().__init_subclass__(**kwargs)
        record_init_arguments(cls)

    @property
    def init_config(self) -> dict[str, Any] | None:
        """``{"class_path": ..., "init_args": {...}}`` that rebuilds this network (untrained), or ``None``.

        ``None`` when an init argument is not plain data (e.g. a user's module wrapped by ``as_classifier``):
        such a network is saved as the object itself.
        """
        arguments = init_arguments(self)
        if not is_plain(arguments):
            return None
        return {"class_path": class_path(type(self)), "init_args": arguments}

    @abc.abstractmethod
    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return ``(features, stage_maps)``: the ``(N, feature_dim)`` vector and the per-stage maps."""

    @abc.abstractmethod
    def classify(self, features: Tensor) -> Tensor:
        """Map penultimate features to logits."""

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.forward_features(images)[0])

    def check_input(self, images: Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is an ``(N, C, H, W)`` float batch this network accepts."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} image channel(s), got {images.shape[1]} "
                f"(images of shape {tuple(images.shape)})"
            )
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size}x{self.image_size} images, "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")
