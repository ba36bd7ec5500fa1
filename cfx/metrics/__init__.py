"""torchmetrics classes over cfx.metrics.functional (states are sums, counts or ``cat`` lists: exact under DDP)."""

from cfx.metrics.ood import OODAUROC, evaluate_ood
from cfx.metrics.ranking import PairwiseRankingAccuracy, SpearmanCorrelation

__all__ = ["OODAUROC", "PairwiseRankingAccuracy", "SpearmanCorrelation", "evaluate_ood"]
