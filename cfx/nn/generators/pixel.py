"""The pixel "generator": each query's image is itself the parameter, regularised by TV + L2 (DISC's weak prior)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cfx.nn.generators.base import BatchedGenerator


class PixelGenerator(BatchedGenerator):
    """Per-query images as parameters ``(Q, C, H, W)`` with the ``tv_weight * TV + l2_weight * ||x||^2`` prior.

    The initial images are drawn from U(0, 1) with each query's seed (``fit_reconstruction`` / :meth:`set_images`
    replace them by the query exactly). ``forward`` clamps to [0, 1] with a straight-through gradient: the value
    is ``clamp(p, 0, 1)`` and the gradient passes unchanged, so a pixel pushed past 0 or 1 can come back.
    The paper gives no prior weights; the defaults suit 28x28 images in [0, 1] and are meant to be tuned.

    Args:
        num_queries: Q.
        channels: image channels C.
        image_size: H (= W) or ``(H, W)``.
        seeds: ``(Q,)`` integer seeds.
        tv_weight: weight of the total variation.
        l2_weight: weight of the squared L2 norm.
        tv_beta: TV exponent (2: squared differences; 1: DISC's eq. 4).
    """

    def __init__(
        self,
        num_queries: int,
        channels: int,
        image_size: int | Sequence[int],
        seeds: Tensor,
        tv_weight: float = 1e-2,
        l2_weight: float = 1e-3,
        tv_beta: float = 2.0,
    ):
        super().__init__(num_queries, channels, image_size, seeds, tv_weight, l2_weight, tv_beta)
        self.image = nn.Parameter(torch.empty(num_queries, channels, *self.image_size))
        self.initialize_queries()

    def init_query_(self, q: int, generator: torch.Generator) -> None:
        self.image.data[q].uniform_(0.0, 1.0, generator=generator)

    def forward(self) -> Tensor:
        return self.image + (self.image.clamp(0.0, 1.0) - self.image).detach()

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return [[self.image]]

    @torch.no_grad()
    def set_images(self, images: Tensor) -> None:
        """Set the parameters to ``(Q, C, H, W)`` images in [0, 1] (an exact reconstruction)."""
        if images.shape != self.image.shape:
            raise ValueError(f"expected images of shape {tuple(self.image.shape)}, got {tuple(images.shape)}")
        self.image.copy_(images)
