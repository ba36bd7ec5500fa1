"""Pure-torch metric functions (no Lightning import)."""

from cfx.metrics.functional.ood import ood_auroc
from cfx.metrics.functional.ranking import average_ranks, pairwise_ranking_accuracy, spearman_correlation

__all__ = ["average_ranks", "ood_auroc", "pairwise_ranking_accuracy", "spearman_correlation"]
