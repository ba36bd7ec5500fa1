"""Out-of-distribution AUROC as a torchmetrics class, and an evaluation helper over two DataModules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cfx.data.base import ImageDataModule
from cfx.metrics.functional.ood import ood_auroc


class OODAUROC(Metric):
    """AUROC of a score that is higher for out-of-distribution samples; ``cat`` states, exact under DDP.

    ``update(scores, is_ood)`` takes ``(N,)`` scores and an ``(N,)`` boolean mask of the OOD samples.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        if scores.ndim != 1 or is_ood.shape != scores.shape:
            raise ValueError(
                f"expected scores (N,) and an OOD mask (N,), got {tuple(scores.shape)} and {tuple(is_ood.shape)}"
            )
        self.scores.append(scores.detach().to(torch.float64))
        self.is_ood.append(is_ood.detach().to(torch.float64))

    def compute(self) -> Tensor:
        scores, is_ood = dim_zero_cat(self.scores), dim_zero_cat(self.is_ood).bool()
        return ood_auroc(scores[~is_ood], scores[is_ood])


@torch.no_grad()
def evaluate_ood(
    scorer: Callable[[Tensor], Tensor],
    in_distribution: ImageDataModule,
    out_of_distribution: ImageDataModule,
    split: str = "test",
    device: str | torch.device = "cpu",
) -> float:
    """AUROC of ``scorer`` separating ``out_of_distribution`` from ``in_distribution`` samples.

    Under ``torch.distributed`` each rank scores its unpadded share of both splits and the metric gathers all
    scores, so every rank returns the AUROC of the whole data.

    Args:
        scorer: maps an ``(N, C, H, W)`` image batch to ``(N,)`` scores, higher = more likely OOD (e.g.
            ``DUQClassifier.uncertainty`` or the negative DDU log-density).
        in_distribution: the in-distribution DataModule.
        out_of_distribution: the OOD DataModule (same image shape).
        split: which split of both to score.
        device: where the images are sent.

    Returns:
        The AUROC in ``[0, 1]``.
    """
    if (in_distribution.in_channels, in_distribution.image_size) != (
        out_of_distribution.in_channels,
        out_of_distribution.image_size,
    ):
        raise ValueError(
            f"the OOD images ({out_of_distribution.in_channels} x {out_of_distribution.image_size} px) differ in shape "
            f"from the in-distribution ones ({in_distribution.in_channels} x {in_distribution.image_size} px)"
        )
    metric = OODAUROC().to(device)
    for datamodule, ood in ((in_distribution, False), (out_of_distribution, True)):
        for batch in datamodule.eval_dataloader(split):
            scores = scorer(batch["image"].to(device))
            metric.update(scores, torch.full_like(scores, ood, dtype=torch.bool))
    return metric.compute().item()
