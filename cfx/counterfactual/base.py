"""The explainer interface shared by every counterfactual method."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cfx.init_args import class_path, describe, init_arguments, record_init_arguments
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
        params: the explainer that made the result, as :attr:`Explainer.params` (a fresh copy per call).
        details: the method's own per-query outputs by name, each ``(N, ...)`` with the dtype and per-query shape
            :meth:`Explainer.detail_fields` declares (e.g. GenerativeIntrospection's ``top_attributes``); empty for
            a method that declares none.
    """

    counterfactuals: Tensor
    success: Tensor
    target_probability: Tensor
    original_prediction: Tensor
    iterations: Tensor
    path: Tensor | None = None
    params: dict = field(default_factory=dict)
    details: dict[str, Tensor] = field(default_factory=dict)


def _integer_indices(
    values: Tensor | Sequence[int] | np.ndarray, name: str, count: int, device: torch.device
) -> Tensor:
    """``values`` as ``(count,)`` int64 on ``device``; ``ValueError`` unless they are ``count`` integers."""
    expected = (
        f"{name} must be {count} integer class indices" if name == "targets" else f"{name} must be {count} integers"
    )
    if not isinstance(values, Tensor):
        try:
            values = torch.as_tensor(values) if len(values) > 0 else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{expected} (a tensor, numpy array, list or tuple), got {values!r}") from error
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise ValueError(f"{expected} (an integer dtype), got dtype {values.dtype}")
    if values.shape != (count,):
        raise ValueError(f"{expected}, one per image, got shape {tuple(values.shape)}")
    return values.to(device=device, dtype=torch.long)


class Explainer(abc.ABC):
    """A counterfactual method: ``Method(classifier, ...)`` then ``method.explain(images, targets)``.

    An explainer holds its configuration only; ``explain`` keeps no state between calls, so a sample's
    result depends on nothing but the sample, its target and its dataset index.

    Every subclass's init arguments are captured when it is built (:attr:`params`), so a result records the
    explainer that made it.

    Args:
        classifier: the model to explain (used in eval mode; its parameters are not changed).

    Raises:
        TypeError: ``classifier`` is not a :class:`~cfx.nn.FeatureClassifier`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record the arguments of each explainer's outermost ``__init__`` call, for :attr:`params`."""
        super().__init_subclass__(**kwargs)
        record_init_arguments(cls)

    def __init__(self, classifier: FeatureClassifier):
        if not isinstance(classifier, FeatureClassifier):
            raise TypeError(
                f"{type(self).__name__} explains a cfx.nn.FeatureClassifier, got a {type(classifier).__name__}; "
                "wrap a plain network with cfx.nn.as_classifier(module, in_channels=..., num_classes=...)"
            )
        self.classifier = classifier

    @property
    def params(self) -> dict:
        """``{"class_path": ..., "init_args": {...}}``: every init argument but the classifier, JSON-able, a fresh copy.

        Modules, tensors and other objects given as arguments are described by their class name (tensors by
        their shape), paths by their string.
        """
        arguments = init_arguments(self)
        arguments.pop("classifier", None)
        return {"class_path": class_path(type(self)), "init_args": describe(arguments)}

    def detail_fields(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The method's per-query outputs in :attr:`CounterfactualResult.details`: ``{name: (dtype, shape)}``.

        ``shape`` is one query's (the result's tensor is ``(N, *shape)``); fixed by the explainer's settings, so a
        result store can declare them before the first batch. None by default; a method with its own outputs
        overrides this.
        """
        return {}

    @abc.abstractmethod
    def explain(
        self, images: Tensor, targets: Tensor | Sequence[int], indices: Tensor | Sequence[int] | None = None
    ) -> CounterfactualResult:
        """Find counterfactuals of ``images`` (``(N, C, H, W)`` in [0, 1]) towards ``targets`` (``(N,)``).

        Args:
            images: the queries.
            targets: the target class of each query.
            indices: dataset index of each query, seeding anything random per query (default ``arange(N)``).
        """

    def check_query(
        self,
        images: Tensor,
        targets: Tensor | Sequence[int] | np.ndarray,
        indices: Tensor | Sequence[int] | np.ndarray | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Check a batch of queries and return it normalised: ``(images, targets, indices)``.

        Args:
            images: ``(N, C, H, W)`` floating-point images in [0, 1], finite, with the channels and size the
                classifier accepts. Float dtypes other than the classifier's (float64, float16, bfloat16) are
                converted to the classifier's parameter dtype (float32 if it has none); integer images are
                refused (scale them to [0, 1] first).
            targets: ``(N,)`` integer class indices of the classifier: a tensor of any integer dtype, a numpy
                array or a list/tuple of ints.
            indices: ``(N,)`` integer dataset indices, the same types as ``targets`` (default ``arange(N)``).

        Returns:
            The images in the classifier's dtype, the targets and the indices as int64 on the images' device.

        Raises:
            TypeError: ``images`` is not a tensor.
            ValueError: anything else does not hold; the message names what was expected.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a (N, C, H, W) float tensor in [0, 1], got a {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating-point values in [0, 1] (e.g. uint8 / 255), got dtype {images.dtype}"
            )
        parameter = next(self.classifier.parameters(), None)
        images = images.to(torch.float32 if parameter is None else parameter.dtype)
        self.classifier.check_input(images)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        if ((images < 0) | (images > 1)).any():
            raise ValueError(f"images must lie in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]")
        count, device = images.shape[0], images.device
        targets = _integer_indices(targets, "targets", count, device)
        num_classes = self.classifier.num_classes
        if ((targets < 0) | (targets >= num_classes)).any():
            raise ValueError(f"targets must be classes 0..{num_classes - 1} of the classifier, got {targets.tolist()}")
        if indices is None:
            indices = torch.arange(count, device=device)
        return images, targets, _integer_indices(indices, "indices", count, device)


def check_details(
    details: dict[str, Tensor], fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], count: int, method: str
) -> None:
    """Raise ``ValueError`` unless ``details`` are exactly the declared ``fields``, each ``(count, *shape)``.

    Args:
        details: a result's :attr:`CounterfactualResult.details`.
        fields: the explainer's :meth:`Explainer.detail_fields`.
        count: the result's number of queries.
        method: the explainer's name, for the message.
    """
    if set(details) != set(fields):
        raise ValueError(f"{method} declares the details {sorted(fields)} but returned {sorted(details)}")
    for name, (dtype, shape) in fields.items():
        value = details[name]
        if not isinstance(value, Tensor) or value.dtype != dtype or tuple(value.shape) != (count, *shape):
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{method}'s detail {name!r} must be {dtype} {(count, *shape)}, got {got}")
