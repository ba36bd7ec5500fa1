"""torchmetrics classes for how well predicted per-sample losses rank the true ones (exact under DDP)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cfx.metrics.functional.ranking import pairwise_ranking_accuracy, spearman_correlation


class _PairedValues(Metric):
    """Collects ``(predicted, target)`` value pairs in ``cat`` states: all ranks' samples meet in ``compute``."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("predicted", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, predicted: Tensor, target: Tensor) -> None:
        """Add ``(N,)`` predicted and ``(N,)`` true values."""
        if predicted.ndim != 1 or predicted.shape != target.shape:
            raise ValueError(
                f"expected predicted and target values of the same shape (N,), got {tuple(predicted.shape)} and "
                f"{tuple(target.shape)}"
            )
        self.predicted.append(predicted.detach().float())
        self.target.append(target.detach().float())


class PairwiseRankingAccuracy(_PairedValues):
    """Fraction of pairs ordered alike by predicted and true values (``functional.pairwise_ranking_accuracy``)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        return pairwise_ranking_accuracy(dim_zero_cat(self.predicted), dim_zero_cat(self.target))


class SpearmanCorrelation(_PairedValues):
    """Spearman rank correlation of predicted and true values (``functional.spearman_correlation``)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        return spearman_correlation(dim_zero_cat(self.predicted), dim_zero_cat(self.target))
