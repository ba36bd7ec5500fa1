"""Bring your own model: any ``nn.Module`` that returns logits as a cfx :class:`FeatureClassifier` (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cfx.nn.classifier import FeatureClassifier


class ModuleClassifier(FeatureClassifier):
    """A user's logits module with the FeatureClassifier interface (built by :func:`as_classifier`).

    ``forward`` is the module's own. ``forward_features`` / ``classify`` need a named ``feature_layer``: for an
    ``nn.Sequential`` the children up to and including it give the features and the remaining children are the
    head; for any other module a forward hook reads the layer's output and the submodule named ``head`` maps the
    features to logits. Stage maps are the 4-D outputs of ``stage_layers`` (read by forward hooks).

    Args:
        module: maps ``(N, C, H, W)`` images to ``(N, K)`` logits. Its state-dict keys are kept (``module.*``).
        in_channels: image channels.
        num_classes: number of logits.
        image_size: the input size the module is built for (needed with ``feature_layer``, to size the features).
        feature_layer: name of the submodule whose (flattened) output is the penultimate feature vector.
        head: name of the submodule mapping those features to logits (not needed for an ``nn.Sequential``).
        stage_layers: names of submodules whose 4-D outputs are the stage maps (for DEP).
    """

    def __init__(
        self,
        module: nn.Module,
        in_channels: int,
        num_classes: int,
        image_size: int | None = None,
        feature_layer: str | None = None,
        head: str | None = None,
        stage_layers: Sequence[str] = (),
    ):
        super().__init__()
        self.module = module
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.feature_layer, self.stage_layers = feature_layer, tuple(stage_layers)
        names = dict(module.named_modules())
        for name in (feature_layer, head, *self.stage_layers):
            if name is not None and name not in names:
                raise ValueError(f"{type(module).__name__} has no submodule {name!r}; it has {sorted(names)[1:]}")
        self._head_name = self._resolve_head(module, feature_layer, head)
        self.feature_dim, self.stage_channels = 0, ()
        if feature_layer is not None:
            if image_size is None:
                raise ValueError("as_classifier(..., feature_layer=...) needs image_size=... to size the features")
            with torch.no_grad():
                features, stage_maps = self.forward_features(torch.zeros(1, in_channels, image_size, image_size))
            self.feature_dim = features.shape[1]
            self.stage_channels = tuple(int(stage_map.shape[1]) for stage_map in stage_maps)

    @staticmethod
    def _resolve_head(module: nn.Module, feature_layer: str | None, head: str | None) -> str | None:
        if feature_layer is None or head is not None:
            return head
        if isinstance(module, nn.Sequential) and feature_layer in dict(module.named_children()):
            return None  # the children after the feature layer
        raise ValueError(
            f"with feature_layer={feature_layer!r} on a {type(module).__name__} (not a direct child of an "
            "nn.Sequential), pass head=... naming the submodule that maps the features to logits"
        )

    @property
    def head(self) -> nn.Module:
        """The module mapping features to logits (for an ``nn.Sequential``: its children after the feature layer)."""
        if self.feature_layer is None:
            raise self._no_features_error()
        if self._head_name is not None:
            return self.module.get_submodule(self._head_name)
        children = list(self.module.named_children())
        position = [name for name, _ in children].index(self.feature_layer)
        return nn.Sequential(*(child for _, child in children[position + 1 :]))

    def _no_features_error(self) -> ValueError:
        return ValueError(
            f"this {type(self.module).__name__} was adapted without a feature layer, so it gives logits only; "
            "methods that need features (DeDUCE, DISC semantic='latent', DEP) need "
            "cfx.nn.as_classifier(module, ..., feature_layer='<submodule name>', image_size=...)"
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.module(images)

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.feature_layer is None:
            raise self._no_features_error()
        outputs: dict[str, Tensor] = {}
        hooks = [
            self.module.get_submodule(name).register_forward_hook(
                lambda _module, _inputs, output, name=name: outputs.__setitem__(name, output)
            )
            for name in dict.fromkeys((self.feature_layer, *self.stage_layers))
        ]
        try:
            if self._head_name is None:  # nn.Sequential: run the children up to the feature layer only
                x = images
                for name, child in self.module.named_children():
                    x = child(x)
                    if name == self.feature_layer:
                        break
            else:
                self.module(images)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.flatten(outputs[self.feature_layer], 1), [outputs[name] for name in self.stage_layers]

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)


def as_classifier(
    module: nn.Module,
    in_channels: int,
    num_classes: int,
    image_size: int | None = None,
    feature_layer: str | None = None,
    head: str | None = None,
    stage_layers: Sequence[str] = (),
) -> ModuleClassifier:
    """Make any ``nn.Module`` returning logits a cfx classifier.

    With logits alone, JSMA, Wachter and image-space DISC work; methods that need features (DeDUCE, DISC
    ``semantic="latent"``, DEP) also need ``feature_layer`` (and ``head`` unless ``module`` is an
    ``nn.Sequential``). See :class:`ModuleClassifier` for the arguments.

    Example:
        ``as_classifier(nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(...)), 1, 10, 28, feature_layer="2")``
    """
    return ModuleClassifier(module, in_channels, num_classes, image_size, feature_layer, head, stage_layers)
