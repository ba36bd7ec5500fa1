"""Out-of-distribution detection scores (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor

from cfx.metrics.functional.ranking import average_ranks


def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> Tensor:
    """AUROC of a score that should be higher for out-of-distribution samples.

    Equals ``P(s_out > s_in) + P(s_out == s_in) / 2`` over all in/out pairs (the Mann-Whitney statistic).

    Args:
        in_scores: ``(N_in,)`` scores of in-distribution samples.
        out_scores: ``(N_out,)`` scores of OOD samples.

    Returns:
        A float64 scalar in ``[0, 1]``; 1 means every OOD sample scores above every in-distribution sample.
    """
    if in_scores.ndim != 1 or out_scores.ndim != 1:
        raise ValueError(f"expected 1-D scores, got shapes {tuple(in_scores.shape)} and {tuple(out_scores.shape)}")
    if len(in_scores) == 0 or len(out_scores) == 0:
        raise ValueError(f"need in-distribution and OOD scores, got {len(in_scores)} and {len(out_scores)}")
    scores = torch.cat([in_scores, out_scores]).to(torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite (no NaN or infinity)")
    num_out = len(out_scores)
    rank_sum = average_ranks(scores)[len(in_scores) :].sum()
    return (rank_sum - num_out * (num_out + 1) / 2) / (len(in_scores) * num_out)
