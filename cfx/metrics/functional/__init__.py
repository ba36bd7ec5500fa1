"""Pure-torch metric functions (no Lightning import)."""

from cfx.metrics.functional.anogan import anogan_score
from cfx.metrics.functional.counterfactual import (
    concentration,
    feature_nll,
    intersection_mask,
    l0_distance,
    l1_distance,
    mse,
    sort_record,
)
from cfx.metrics.functional.ood import ood_auroc
from cfx.metrics.functional.ranking import average_ranks, pairwise_ranking_accuracy, spearman_correlation

__all__ = [
    "anogan_score",
    "average_ranks",
    "concentration",
    "feature_nll",
    "intersection_mask",
    "l0_distance",
    "l1_distance",
    "mse",
    "ood_auroc",
    "pairwise_ranking_accuracy",
    "sort_record",
    "spearman_correlation",
]
