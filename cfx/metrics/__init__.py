"""torchmetrics classes over cfx.metrics.functional (states are sums, counts or ``cat`` lists: exact under DDP)."""

from cfx.metrics.anogan import AnoGANScore
from cfx.metrics.counterfactual import CounterfactualMetrics, intersection_table, markdown_table
from cfx.metrics.ood import OODAUROC, evaluate_ood
from cfx.metrics.ranking import PairwiseRankingAccuracy, SpearmanCorrelation

__all__ = [
    "OODAUROC",
    "AnoGANScore",
    "CounterfactualMetrics",
    "PairwiseRankingAccuracy",
    "SpearmanCorrelation",
    "evaluate_ood",
    "intersection_table",
    "markdown_table",
]
