"""DEP (direct error prediction): a loss-prediction head over a classifier's stage maps and its ranking loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.nn.classifier import FeatureClassifier


class LossPredictor(nn.Module):
    """Predicts a classifier's per-sample loss from its per-stage feature maps.

    Each stage map is global-average-pooled and mapped by its own ``Linear(channels, hidden) + ReLU``; the
    concatenation goes through ``Linear(len(stages) * hidden, 1)``.

    Args:
        stage_channels: channels of each stage map (``FeatureClassifier.stage_channels``).
        hidden: units per stage (128 in DISC).
    """

    def __init__(self, stage_channels: Sequence[int], hidden: int = 128):
        super().__init__()
        if len(stage_channels) == 0:
            raise ValueError("the loss predictor needs at least one stage map")
        self.stage_channels = tuple(int(c) for c in stage_channels)
        self.stages = nn.ModuleList(nn.Linear(channels, hidden) for channels in self.stage_channels)
        self.output = nn.Linear(len(self.stage_channels) * hidden, 1)

    def forward(self, stage_maps: Sequence[Tensor]) -> Tensor:
        """Return the ``(N,)`` predicted losses of the ``(N, C_s, H_s, W_s)`` stage maps."""
        if len(stage_maps) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} stage maps, got {len(stage_maps)}")
        hidden = []
        for layer, stage_map, channels in zip(self.stages, stage_maps, self.stage_channels, strict=True):
            if stage_map.ndim != 4 or stage_map.shape[1] != channels:
                raise ValueError(f"expected a stage map of shape (N, {channels}, H, W), got {tuple(stage_map.shape)}")
            hidden.append(F.relu(layer(stage_map.mean(dim=(2, 3)))))
        return self.output(torch.cat(hidden, dim=1)).squeeze(1)


class LossPredictingClassifier(FeatureClassifier):
    """A classifier carrying the DEP loss predictor it was trained with (what ``DEPTask.explained_classifier`` gives).

    It classifies exactly like ``network`` (same facts, features, stage maps and logits); DISC's DEP
    manifold-consistency term reads ``loss_predictor`` from it, so a predictor is only ever paired with its own
    network. :meth:`predict_loss` gives ``(logits, predicted_loss)`` in one pass.

    Args:
        network: the classifier.
        predictor: the loss predictor over ``network``'s stage maps.
    """

    def __init__(self, network: FeatureClassifier, predictor: LossPredictor):
        super().__init__()
        if tuple(network.stage_channels) != predictor.stage_channels:
            raise ValueError(
                f"the predictor expects stage channels {predictor.stage_channels}, the network has "
                f"{tuple(network.stage_channels)}"
            )
        self.network = network
        self.loss_predictor = predictor
        self.in_channels, self.num_classes, self.image_size = (
            network.in_channels,
            network.num_classes,
            network.image_size,
        )
        self.feature_dim, self.stage_channels = network.feature_dim, tuple(network.stage_channels)

    @property
    def head(self) -> nn.Module:
        """The network's final layer."""
        return self.network.head

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.network.forward_features(images)

    def classify(self, features: Tensor) -> Tensor:
        return self.network.classify(features)

    def predict_loss(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, predicted_loss)`` of ``images``: ``(N, K)`` and ``(N,)``."""
        features, stage_maps = self.network.forward_features(images)
        return self.network.classify(features), self.loss_predictor(stage_maps)


def pairwise_ranking_loss(predicted: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """DEP's contrastive ranking loss, pairing the batch with its reverse.

    Sample ``i`` is paired with sample ``N - 1 - i`` for ``i < N // 2`` (an odd batch leaves its middle sample
    out); each pair contributes ``max(0, -sign_ij * (p_i - p_j) + margin)`` with ``sign_ij = 1`` if
    ``t_i > t_j`` else ``-1``. The result is the mean over pairs (0 for fewer than two samples).

    Args:
        predicted: ``(N,)`` predicted losses.
        target: ``(N,)`` true losses (detach them: they are targets).
        margin: the margin gamma (1 in DISC).

    Returns:
        The scalar loss.
    """
    if predicted.ndim != 1 or predicted.shape != target.shape:
        raise ValueError(
            f"expected predicted and target losses of the same shape (N,), got {tuple(predicted.shape)} "
            f"and {tuple(target.shape)}"
        )
    half = len(predicted) // 2
    if half == 0:
        return predicted.sum() * 0.0
    predicted_difference = (predicted - predicted.flip(0))[:half]
    sign = torch.where((target - target.flip(0))[:half] > 0, 1.0, -1.0).to(predicted.dtype)
    return F.relu(margin - sign * predicted_difference).mean()
