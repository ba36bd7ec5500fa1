"""Any timm architecture as a cfx classifier (randomly initialised: nothing is downloaded)."""

from __future__ import annotations

import timm
from torch import Tensor

from cfx.nn.classifier import FeatureClassifier


class TimmClassifier(FeatureClassifier):
    """Wrap ``timm.create_model(name, pretrained=False, in_chans=..., num_classes=...)``.

    Stage maps come from timm's ``forward_intermediates`` where the model implements it, otherwise the
    final feature map is the only stage.

    Args:
        name: a timm model name, e.g. ``"resnet18"`` or ``"convnext_atto"``.
        in_channels: image channels.
        num_classes: number of classes.
        image_size: the input size the model is built for (passed to timm models that need it, e.g. ViTs).
        **timm_kwargs: further keyword arguments for ``timm.create_model``.
    """

    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        num_classes: int = 2,
        image_size: int | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the available names")
        if image_size is not None and "img_size" not in timm_kwargs and self._takes_img_size(name):
            timm_kwargs["img_size"] = image_size
        self.model = timm.create_model(
            name, pretrained=False, in_chans=in_channels, num_classes=num_classes, **timm_kwargs
        )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.feature_dim = self.model.num_features
        feature_info = getattr(self.model, "feature_info", None) or []
        self.stage_channels = tuple(int(info["num_chs"]) for info in feature_info)

    @staticmethod
    def _takes_img_size(name: str) -> bool:
        return any(family in name for family in ("vit", "deit", "swin", "beit", "eva", "cait", "xcit"))

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        if hasattr(self.model, "forward_intermediates"):
            final, stage_maps = self.model.forward_intermediates(images)
        else:
            final = self.model.forward_features(images)
            stage_maps = [final]
        return self.model.forward_head(final, pre_logits=True), list(stage_maps)

    def classify(self, features: Tensor) -> Tensor:
        return self.model.get_classifier()(features)
