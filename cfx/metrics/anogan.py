"""The AnoGAN realism score as a torchmetrics class (sum and count states: exact under DDP)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cfx.metrics.functional.anogan import ANOGAN_SETTINGS, anogan_score, check_anogan_settings


class AnoGANScore(Metric):
    """Mean AnoGAN score (``cfx.metrics.functional.anogan.anogan_score``) of every image seen; lower = more realistic.

    ``update(images, indices)`` scores a batch (each image's restarts seeded by its dataset index, so a score does
    not depend on the batch or the process); ``compute()`` returns the float64 mean over all processes' images
    (``sum`` and ``count`` states). With ``keep_scores`` the per-image scores and indices are kept too (``cat``
    states) and :meth:`scores` returns them, e.g. for an AUROC against out-of-distribution images.

    Args:
        generator: the WGAN generator (:class:`cfx.nn.generative.WGANGenerator`).
        critic: its critic (:class:`cfx.nn.generative.WGANCritic`).
        keep_scores: also keep every image's score.
        **settings: the settings of ``anogan_score`` (``steps``, ``step_size``, ``decay_fraction``,
            ``decay_factor``, ``restarts``, ``feature_weight``, ``seed``); any other keyword goes to
            ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, generator: nn.Module, critic: nn.Module, keep_scores: bool = False, **settings: Any):
        metric_kwargs = {key: value for key, value in settings.items() if key not in ANOGAN_SETTINGS}
        super().__init__(**metric_kwargs)
        self.settings = {key: value for key, value in settings.items() if key in ANOGAN_SETTINGS}
        check_anogan_settings(self.settings)
        self.keep_scores = keep_scores
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        if keep_scores:
            self.add_state("image_scores", default=[], dist_reduce_fx="cat")
            self.add_state("indices", default=[], dist_reduce_fx="cat")  # float64: exact for indices < 2**53
        self.set_dtype(torch.float64)  # an empty process sends its share in this dtype (before the networks join)
        self.generator, self.critic = generator, critic  # submodules: ``.to(device)`` moves them with the states

    def update(self, images: Tensor, indices: Tensor) -> None:
        """Score ``(N, C, H, W)`` images in ``[0, 1]`` with their ``(N,)`` dataset indices."""
        scores = anogan_score(images, indices, self.generator, self.critic, **self.settings).detach()
        self.total += scores.to(torch.float64).sum()
        self.count += len(scores)
        if self.keep_scores:
            self.image_scores.append(scores.to(torch.float64))
            self.indices.append(indices.detach().to(device=self.device, dtype=torch.float64))

    def compute(self) -> Tensor:
        """The mean score (NaN before any image)."""
        return self.total / self.count

    def scores(self) -> tuple[Tensor, Tensor]:
        """``(scores, indices)`` of every image of every process, ordered by dataset index (needs ``keep_scores``)."""
        if not self.keep_scores:
            raise ValueError("AnoGANScore keeps per-image scores only when built with keep_scores=True")
        sync = self._to_sync and not self._is_synced
        with self.sync_context(should_sync=sync, should_unsync=sync):
            states = [self.image_scores, self.indices]
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            scores, indices = (dim_zero_cat(state) if len(state) else empty for state in states)
        order = torch.argsort(indices, stable=True)
        return scores[order], indices[order].long()
