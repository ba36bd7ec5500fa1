"""Any timm architecture as a cfx classifier (randomly initialised: nothing is downloaded)."""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from cfx.nn.classifier import FeatureClassifier

MAX_SEARCHED_SIZE = 1024  # the largest input size tried when looking for the smallest one a model runs at


class TimmClassifier(FeatureClassifier):
    """Wrap ``timm.create_model(name, pretrained=False, in_chans=..., num_classes=...)``.

    Stage maps come from timm's ``forward_intermediates`` where the model implements it, otherwise the
    final feature map is the only stage.

    Args:
        name: a timm model name, e.g. ``"resnet18"`` or ``"convnext_atto"``.
        in_channels: image channels.
        num_classes: number of classes.
        image_size: the input size the model is built for (passed to timm models that need it, e.g. ViTs).
            Given (the CLI always passes the data's size), one dummy forward at construction checks that the
            architecture runs on images of that size; if not, a ``ValueError`` names the smallest size that works.
        checkpoint_path: a file of your own weights for the model (timm's ``checkpoint_path``; nothing is
            downloaded).
        **timm_kwargs: further keyword arguments for ``timm.create_model``.
    """

    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        num_classes: int = 2,
        image_size: int | None = None,
        checkpoint_path: str | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the available names")
        if "pretrained" in timm_kwargs:
            raise ValueError(
                "TimmClassifier downloads nothing: pass your own weights as checkpoint_path=<file>, not pretrained"
            )
        if image_size is not None and "img_size" not in timm_kwargs and self._takes_img_size(name):
            timm_kwargs["img_size"] = image_size
        self.model = timm.create_model(
            name,
            pretrained=False,
            in_chans=in_channels,
            num_classes=num_classes,
            checkpoint_path=checkpoint_path or "",
            **timm_kwargs,
        )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.feature_dim = self.model.num_features
        feature_info = getattr(self.model, "feature_info", None) or []
        self.stage_channels = tuple(int(info["num_chs"]) for info in feature_info)
        if image_size is not None:
            self._check_image_size(name, image_size)

    def _runs_at(self, size: int) -> Exception | None:
        """The error of a dummy forward (eval mode, no gradient) on one ``size`` x ``size`` image, or ``None``."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self(torch.zeros(1, self.in_channels, size, size))
        except (RuntimeError, ValueError, AssertionError) as error:
            return error
        finally:
            self.train(was_training)
        return None

    def _check_image_size(self, name: str, image_size: int) -> None:
        """Raise one ``ValueError`` naming the smallest working size unless the model runs on ``image_size``."""
        error = self._runs_at(image_size)
        if error is None:
            return
        failing, working = image_size, image_size * 2
        while working <= MAX_SEARCHED_SIZE and self._runs_at(working) is not None:
            failing, working = working, working * 2
        if working > MAX_SEARCHED_SIZE:
            raise ValueError(
                f"timm model {name!r} does not run on {image_size}x{image_size} images (nor on any size up to "
                f"{MAX_SEARCHED_SIZE}): {type(error).__name__}: {error}"
            ) from error
        while working - failing > 1:  # bisect: `failing` fails, `working` works
            middle = (failing + working) // 2
            if self._runs_at(middle) is None:
                working = middle
            else:
                failing = middle
        raise ValueError(
            f"timm model {name!r} does not run on {image_size}x{image_size} images: it needs images of at least "
            f"{working}x{working} (resize the data, e.g. the DataModule's image_size, or pick another architecture)"
        ) from error

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

    @property
    def head(self) -> nn.Module:
        """The classifier layer of the timm model (``model.get_classifier()``)."""
        return self.model.get_classifier()

    def classify(self, features: Tensor) -> Tensor:
        return self.model.get_classifier()(features)
