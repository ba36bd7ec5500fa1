"""DeDUCE (Höltgen et al.): sparse pixel steps guided by the classifier loss and the target-class feature density."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.counterfactual.iterative import PixelStepExplainer, select_pixels
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.gaussian import ClassGaussians


class DeDUCE(PixelStepExplainer):
    """Deep Deterministic Uncertainty-based Counterfactual Explanations.

    Each step computes, per sample, the input gradient of
    ``CE(f(x'), t) / CE + (-log p_t(z)) / |log p_t(z)|`` (each term divided by its own detached value;
    ``z`` the classifier's features, ``p_t`` the DDU Gaussian of the target class), accumulates it with
    momentum (``v_k = g_k + momentum * v_{k-1}``), picks the ``pixels_per_step`` values (over ``C * H * W``)
    with the largest raw ``|g_k|`` among those changed fewer than ``max_changes`` times, moves them by
    ``step_size`` against ``sign(v_k)`` and clips to [0, 1]. A query stops when its target softmax reaches
    ``confidence`` (success) or after ``max_iterations`` steps (failure; the last iterate is returned).

    Args:
        classifier: the model to explain (a spectrally normalised ResNet in the paper).
        gaussians: the class Gaussians fitted to the classifier's training features, or the path of a file
            written by :meth:`ClassGaussians.save`.
        pixels_per_step: pixels moved per step.
        step_size: the pixel change ``delta``.
        max_changes: how often one pixel may be moved.
        momentum: momentum of the accumulated gradient.
        confidence: target probability at which a query succeeds.
        max_iterations: steps after which a query fails.
        path_every: record the iterates every this many steps in the result's ``path``.
        fold_batch_norm: search on a copy of the classifier with eval-mode batch norms folded into the
            convolutions (and soft spectral norm baked in): the same function up to rounding, faster.
        channels_last: channels-last copy and inputs (mainly for GPUs).
        compile: ``torch.compile`` the copy (dynamic shapes; pays a compilation on the first call).
        bfloat16: the copy under bfloat16 autocast (GPUs; counterfactuals change).
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).

    Raises:
        ValueError: the Gaussians do not match the classifier's classes and feature size, or a setting is invalid.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        gaussians: ClassGaussians | str | Path,
        pixels_per_step: int = 1,
        step_size: float = 0.2,
        max_changes: int = 5,
        momentum: float = 0.6,
        confidence: float = 0.5,
        max_iterations: int = 700,
        path_every: int | None = None,
        fold_batch_norm: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        bfloat16: bool = False,
        stop_check_every: int = 1,
    ):
        super().__init__(
            classifier,
            pixels_per_step,
            step_size,
            confidence,
            max_iterations,
            path_every,
            fold_batch_norm=fold_batch_norm,
            channels_last=channels_last,
            compile=compile,
            bfloat16=bfloat16,
            stop_check_every=stop_check_every,
        )
        if not isinstance(gaussians, ClassGaussians):
            gaussians = ClassGaussians.load(gaussians)
        if (gaussians.feature_dim, gaussians.num_classes) != (classifier.feature_dim, classifier.num_classes):
            raise ValueError(
                "explainer given a density fitted for another feature size: the Gaussians cover "
                f"{gaussians.num_classes} classes over {gaussians.feature_dim} features, the classifier has "
                f"{classifier.num_classes} classes and {classifier.feature_dim} features"
            )
        if max_changes < 1:
            raise ValueError(f"max_changes must be >= 1, got {max_changes}")
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        self.gaussians = gaussians
        self.max_changes = max_changes
        self.momentum = momentum

    def auxiliary_modules(self) -> list[nn.Module]:
        """The Gaussians (moved to the queries' device by ``explain``)."""
        return [self.gaussians]

    def objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, CE / detached CE - log p_t(z) / |detached log p_t(z)|)`` per sample."""
        features = self.search_network.forward_features(images)[0]
        logits = self.search_network.classify(features)
        cross_entropy = F.cross_entropy(logits, targets, reduction="none")
        log_density = self.gaussians.log_prob(features).gather(1, targets[:, None]).squeeze(1)
        tiny = torch.finfo(cross_entropy.dtype).tiny
        classification_term = cross_entropy / cross_entropy.detach().clamp_min(tiny)
        density_term = -log_density / log_density.detach().abs().clamp_min(tiny)
        return logits, classification_term + density_term

    def initial_state(self, pixels: Tensor) -> dict[str, Tensor]:
        """Zero momentum and zero change counts per pixel."""
        return {"velocity": torch.zeros_like(pixels), "changes": torch.zeros_like(pixels, dtype=torch.long)}

    def move(self, pixels: Tensor, gradient: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Move the pixels of largest raw ``|gradient|`` with budget left against the sign of the momentum gradient."""
        velocity = gradient + self.momentum * state["velocity"]
        chosen = select_pixels(gradient.abs(), state["changes"] < self.max_changes, self.pixels_per_step)
        moved = (pixels - self.step_size * velocity.sign() * chosen).clamp(0, 1)
        return moved, {"velocity": velocity, "changes": state["changes"] + chosen.long()}
