"""Ranking agreement between predicted and true per-sample losses (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(predicted: Tensor, target: Tensor) -> None:
    if predicted.ndim != 1 or predicted.shape != target.shape:
        raise ValueError(
            f"expected predicted and target values of the same shape (N,), got {tuple(predicted.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not (torch.isfinite(predicted).all() and torch.isfinite(target).all()):
        raise ValueError("predicted and target values must be finite (no NaN or infinity)")


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    unique, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    first_rank = torch.cumsum(counts, dim=0) - counts + 1
    return (first_rank + (counts - 1) / 2)[inverse]


def spearman_correlation(predicted: Tensor, target: Tensor) -> Tensor:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN when either side is constant.

    Args:
        predicted: ``(N,)`` predicted values.
        target: ``(N,)`` true values.

    Returns:
        A float64 scalar in ``[-1, 1]``.
    """
    _check_pair(predicted, target)
    predicted_ranks = average_ranks(predicted) - (len(predicted) + 1) / 2
    target_ranks = average_ranks(target) - (len(target) + 1) / 2
    norm = predicted_ranks.norm() * target_ranks.norm()
    if norm == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=predicted.device)
    return (predicted_ranks * target_ranks).sum() / norm


def pairwise_ranking_accuracy(predicted: Tensor, target: Tensor, block_size: int = 1024) -> Tensor:
    """Fraction of pairs ``i < j`` with ``t_i != t_j`` that the prediction orders the same way.

    A pair counts 1 when ``sign(p_i - p_j) == sign(t_i - t_j)``, 1/2 when ``p_i == p_j``, else 0. Computed in
    row blocks of ``block_size`` (memory ``block_size * N``); NaN when every target is equal.

    Args:
        predicted: ``(N,)`` predicted values (e.g. DEP's predicted losses).
        target: ``(N,)`` true values (e.g. the per-sample cross-entropy).
        block_size: rows per block.

    Returns:
        A float64 scalar in ``[0, 1]``.
    """
    _check_pair(predicted, target)
    predicted, target = predicted.to(torch.float64), target.to(torch.float64)
    agreement = torch.zeros((), dtype=torch.float64, device=predicted.device)
    pairs = torch.zeros((), dtype=torch.float64, device=predicted.device)
    columns = torch.arange(len(target), device=target.device)
    for start in range(0, len(target), block_size):  # blocks of rows, not single samples
        rows = columns[start : start + block_size]
        upper = rows[:, None] < columns[None, :]
        target_sign = torch.sign(target[rows, None] - target[None, :])
        predicted_sign = torch.sign(predicted[rows, None] - predicted[None, :])
        valid = upper & (target_sign != 0)
        score = torch.where(predicted_sign == 0, 0.5, (predicted_sign == target_sign).to(torch.float64))
        agreement += (score * valid).sum()
        pairs += valid.sum()
    return agreement / pairs if pairs > 0 else torch.tensor(float("nan"), dtype=torch.float64, device=predicted.device)
