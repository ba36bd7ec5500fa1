"""The explainer interface shared by every counterfactual method."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor

from cfx.nn.classifier import FeatureClassifier


@dataclass(frozen=True)
class CounterfactualResult:
    """What one ``explain`` call returns; made fresh by every call.

    Attributes:
        counterfactuals: ``(N, C, H, W)`` images in [0, 1]: the method's valid counterfactual where ``success``,
            else the final iterate of its search (so a failure can be inspected; metrics count successes only).
        success: ``(N,)`` bool, the classifier reaches the target with the method's confidence criterion.
        target_probability: ``(N,)`` softmax probability of the target class at the counterfactual.
        original_prediction: ``(N,)`` the classifier's prediction on the query.
        iterations: ``(N,)`` int64, optimisation steps each sample took (0 if the query already had the target).
        path: optional ``(N, K, C, H, W)`` intermediate images recorded every few steps.
    """

    counterfactuals: Tensor
    success: Tensor
    target_probability: Tensor
    original_prediction: Tensor
    iterations: Tensor
    path: Tensor | None = None


class Explainer(abc.ABC):
    """A counterfactual method: ``Method(classifier, ...)`` then ``method.explain(images, targets)``.

    An explainer holds its configuration only; ``explain`` keeps no state between calls, so a sample's
    result depends on nothing but the sample, its target and its dataset index.

    Args:
        classifier: the model to explain (used in eval mode; its parameters are not changed).
    """

    def __init__(self, classifier: FeatureClassifier):
        self.classifier = classifier

    @abc.abstractmethod
    def explain(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> CounterfactualResult:
        """Find counterfactuals of ``images`` (``(N, C, H, W)`` in [0, 1]) towards ``targets`` (``(N,)``).

        Args:
            images: the queries.
            targets: the target class of each query.
            indices: dataset index of each query, seeding anything random per query (default ``arange(N)``).
        """

    def check_query(self, images: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` and ``targets`` are a valid batch of queries for the classifier."""
        self.classifier.check_input(images)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"images must lie in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]")
        if targets.shape != (images.shape[0],) or targets.is_floating_point():
            raise ValueError(
                f"targets must be {images.shape[0]} integer class indices, got {targets.dtype} {tuple(targets.shape)}"
            )
        num_classes = self.classifier.num_classes
        if ((targets < 0) | (targets >= num_classes)).any():
            raise ValueError(f"targets must be classes 0..{num_classes - 1} of the classifier, got {targets.tolist()}")
