"""DEPTask: a classifier trained jointly with a loss predictor (DISC's direct error prediction)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.utilities.distributed import gather_all_tensors

from cfx.metrics.ranking import PairwiseRankingAccuracy, SpearmanCorrelation
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.evaluation import evaluation_mode
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


@torch.no_grad()
def target_loss_quantiles(
    classifier: LossPredictingClassifier, loader: Iterable[dict[str, Tensor]], quantile: float, num_classes: int
) -> Tensor:
    """DISC's target loss ``s*`` per class: the ``quantile`` of the DEP predictor's values on real images of the class.

    The DEP predictor is trained by ranking only, so its scale belongs to the checkpoint; a quantile of its values
    on the real training images of class ``k`` says "as typical as that share of the real ``k``s" in that scale
    (``DISC(target_loss=<this>)`` indexes it by each query's target class). Classes are the images' labels.
    Under ``torch.distributed`` each rank passes its own share of the data (e.g.
    ``datamodule.eval_dataloader("train")``: disjoint, unpadded, evaluation transforms); the values of every rank
    are gathered, an image seen by several ranks (same dataset index) counts once, and every rank returns the
    quantiles of the whole split, exactly those of a one-process run.

    Args:
        classifier: a classifier carrying its DEP ``loss_predictor`` (evaluated in eval mode; its mode is restored).
        loader: yields cfx dict batches with ``"image"``, ``"label"`` and ``"index"``.
        quantile: in [0, 1] (``torch.quantile``, linear interpolation).
        num_classes: number of classes ``K``.

    Returns:
        ``(K,)`` float32 on the CPU.

    Raises:
        ValueError: a bad ``quantile`` or ``num_classes``, a classifier without loss predictor, a batch without
            those keys, a label outside ``0..K-1`` or a class without images.
    """
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    predictor = getattr(classifier, "loss_predictor", None)
    if not isinstance(predictor, nn.Module):
        raise ValueError(
            f"target_loss_quantiles needs a classifier carrying its DEP loss_predictor (a LossPredictingClassifier, "
            f"what cfx.tasks.load_classifier gives for a DEPTask checkpoint), got a {type(classifier).__name__}"
        )
    device = next(classifier.parameters()).device
    values, labels, indices = [], [], []
    with evaluation_mode(classifier):
        for batch in loader:
            missing = {"image", "label", "index"} - set(batch)
            if missing:
                raise ValueError(f"expected batches with 'image', 'label' and 'index', missing {sorted(missing)}")
            _, stage_maps = classifier.forward_features(batch["image"].to(device))
            values.append(predictor(stage_maps).double())
            labels.append(batch["label"].to(device=device, dtype=torch.long))
            indices.append(batch["index"].to(device=device, dtype=torch.long))
    values, labels, indices = (
        torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)
        for pieces, dtype in ((values, torch.float64), (labels, torch.long), (indices, torch.long))
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values, labels, indices = (torch.cat(gather_all_tensors(tensor)) for tensor in (values, labels, indices))
    order = torch.argsort(indices, stable=True)
    values, labels, indices = values[order], labels[order], indices[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    values, labels = values[first], labels[first]
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"labels must be classes 0..{num_classes - 1}, got {labels.unique().tolist()}")
    quantiles = []
    for k in range(num_classes):
        of_class = values[labels == k]
        if len(of_class) == 0:
            raise ValueError(f"no images of class {k}: s* of a class needs real images of it")
        quantiles.append(torch.quantile(of_class, quantile))
    return torch.stack(quantiles).float().cpu()
