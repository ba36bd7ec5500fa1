"""DUQTask: a feature extractor trained with a DUQ RBF head (van Amersfoort et al., as used by DISC)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.nn import functional as F

from cfx.nn.classifier import FeatureClassifier
from cfx.nn.duq import DUQClassifier, DUQFeatureClassifier, DUQHead, duq_uncertainty, gradient_penalty
from cfx.nn.evaluation import evaluation_mode
from cfx.tasks.classification import ClassificationTask, load_task


class DUQTask(ClassificationTask):
    """``L = BCE(K, one-hot) + penalty_weight * two-sided gradient penalty``; centroids updated after each step.

    After every training batch (``on_train_batch_end``: once per optimiser step unless gradients are accumulated)
    the batch is embedded again under the updated weights (no gradient, eval mode) and the head's moving averages
    of class-wise embedding sums and counts take one step (all-reduced under DDP). The centroid
    statistics are buffers, so checkpoints hold them. Accuracy is that of ``argmax_c K_c``; ``{stage}/loss`` is
    the BCE plus, in training, the penalty.

    Args:
        network: the feature extractor (its final layer ``network.head`` is unused and frozen).
        optimizer: builds the optimiser over network and head parameters.
        lr_scheduler: optional scheduler.
        embedding_dim: size of the class embeddings (defaults to the network's feature_dim).
        length_scale: RBF sigma (0.5 in DISC).
        penalty_weight: weight lambda of the gradient penalty (0.5 in DISC; 0 disables it).
        gamma: centroid moving-average decay (0.999).
    """

    def __init__(
        self,
        network: FeatureClassifier,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        embedding_dim: int | None = None,
        length_scale: float = 0.5,
        penalty_weight: float = 0.5,
        gamma: float = 0.999,
    ):
        super().__init__(network, optimizer, lr_scheduler)
        self.penalty_weight = penalty_weight
        self.head = DUQHead(network.feature_dim, network.num_classes, embedding_dim, length_scale, gamma)
        # DUQ never calls the network's own final layer, and DDP needs a gradient for every trainable parameter.
        network.head.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C)`` kernel similarities."""
        return self.head(self.network.forward_features(images)[0])

    def explained_classifier(self) -> DUQFeatureClassifier:
        """The network with its DUQ head, predicting ``argmax_c K_c`` (its own ``classify`` layer is untrained)."""
        return DUQFeatureClassifier(self.network, self.head)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        images, labels = batch["image"], batch["label"]
        penalise = stage == "train" and self.penalty_weight > 0
        if penalise:
            images = images.detach().requires_grad_(True)
        kernel_values = self(images)
        one_hot = F.one_hot(labels, self.head.num_classes).to(kernel_values.dtype)
        loss = F.binary_cross_entropy(kernel_values, one_hot)
        if penalise:
            loss = loss + self.penalty_weight * gradient_penalty(images, kernel_values)
        self.log_stage(stage, kernel_values.detach(), labels, loss)
        return loss

    def on_train_batch_end(self, outputs, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Move the centroids towards the batch's class embeddings under the just-updated weights."""
        with evaluation_mode(self.network), torch.no_grad():
            embeddings = self.head.embed(self.network.forward_features(batch["image"])[0])
        self.head.update_centroids(embeddings, F.one_hot(batch["label"], self.head.num_classes))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        kernel_values = self(batch["image"])
        return {
            "index": batch["index"],
            "label": batch["label"],
            "kernel": kernel_values,
            "prediction": kernel_values.argmax(1),
            "uncertainty": duq_uncertainty(kernel_values),
        }


def load_duq_classifier(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> DUQClassifier:
    """Load a DUQTask checkpoint as a frozen :class:`~cfx.nn.duq.DUQClassifier` in eval mode (centroids included).

    Args:
        checkpoint: path of a ``.ckpt`` written by ``cfx fit`` with a DUQTask config.
        map_location: device to load onto.

    Returns:
        ``model(images) -> (N, C)`` kernel similarities; ``model.uncertainty(images)`` gives ``-max_c K_c``.
    """
    task = load_task(checkpoint, map_location, DUQTask)
    model = DUQClassifier(task.network, task.head).eval()
    model.requires_grad_(False)
    return model
