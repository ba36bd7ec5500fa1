"""DEPTask: a classifier trained jointly with a loss predictor (DISC's direct error prediction)."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection

from cfx.metrics.ranking import PairwiseRankingAccuracy, SpearmanCorrelation
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.loss_predictor import LossPredictingClassifier, LossPredictor, pairwise_ranking_loss
from cfx.tasks.classification import STAGES, ClassificationTask


class DEPTask(ClassificationTask):
    """``L = ce_weight * CE + ranking_weight * ranking loss`` of the network and its :class:`LossPredictor`.

    The predictor reads the network's stage maps and learns to rank the detached per-sample cross-entropy
    (pairs formed by pairing the batch with its reverse). Besides ``{stage}/acc`` and ``{stage}/loss`` (the total
    loss) it logs ``{stage}/ce``, ``{stage}/ranking_loss``, ``{stage}/ranking_acc`` (pairwise ranking accuracy of
    predicted vs true loss) and ``{stage}/spearman``; all are exact under DDP.

    Args:
        network: the classifier (its data facts are linked by the CLI).
        optimizer: builds the optimiser over network and predictor parameters.
        lr_scheduler: optional scheduler.
        ce_weight: beta_1 (1.0 in DISC).
        ranking_weight: beta_2 (0.5 in DISC).
        margin: the ranking margin gamma (1.0).
        hidden: units per stage of the predictor (128).
    """

    def __init__(
        self,
        network: FeatureClassifier,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        ce_weight: float = 1.0,
        ranking_weight: float = 0.5,
        margin: float = 1.0,
        hidden: int = 128,
    ):
        super().__init__(network, optimizer, lr_scheduler)
        self.ce_weight, self.ranking_weight, self.margin = ce_weight, ranking_weight, margin
        self.predictor = LossPredictor(network.stage_channels, hidden)
        self.ranking_metrics = nn.ModuleDict(
            {
                f"{stage}_ranking": MetricCollection(
                    {"ranking_acc": PairwiseRankingAccuracy(), "spearman": SpearmanCorrelation()}, prefix=f"{stage}/"
                )
                for stage in STAGES
            }
        )
        self.loss_terms = nn.ModuleDict(
            {f"{stage}_{term}": MeanMetric() for stage in STAGES for term in ("ce", "ranking_loss")}
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(logits, predicted_loss)``."""
        features, stage_maps = self.network.forward_features(images)
        return self.network.classify(features), self.predictor(stage_maps)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits, predicted_loss = self(batch["image"])
        per_sample_ce = F.cross_entropy(logits, batch["label"], reduction="none")
        cross_entropy = per_sample_ce.mean()
        ranking = pairwise_ranking_loss(predicted_loss, per_sample_ce.detach(), self.margin)
        loss = self.ce_weight * cross_entropy + self.ranking_weight * ranking
        self.log_stage(stage, logits, batch["label"], loss)
        ranking_metrics = self.ranking_metrics[f"{stage}_ranking"]
        ranking_metrics.update(predicted_loss.detach(), per_sample_ce.detach())
        self.log_dict(ranking_metrics, on_epoch=True, on_step=False)
        for term, value in (("ce", cross_entropy), ("ranking_loss", ranking)):
            mean = self.loss_terms[f"{stage}_{term}"]
            mean.update(value.detach(), weight=len(per_sample_ce))
            self.log(f"{stage}/{term}", mean, on_epoch=True, on_step=False)
        return loss

    def explained_classifier(self) -> LossPredictingClassifier:
        """The network carrying its loss predictor (DISC's DEP term reads ``classifier.loss_predictor``)."""
        return LossPredictingClassifier(self.network, self.predictor)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits, predicted_loss = self(batch["image"])
        return {
            "index": batch["index"],
            "label": batch["label"],
            "logits": logits,
            "prediction": logits.argmax(1),
            "predicted_loss": predicted_loss,
        }
