"""The batched per-query image generator interface and the TV and L2 image priors.

A :class:`BatchedGenerator` holds ``Q`` independent generators, one per query, whose parameters and buffers are
all stacked along a leading query dimension. Everything random in query ``q`` is drawn from a
``torch.Generator`` seeded with ``seeds[q]`` (a loop over queries at construction only), so a query's generator
and its outputs do not depend on the other queries in the batch. Forward and backward are fully batched.

Losses built on the outputs should be *sums* of per-query terms: then each query's gradient is its own, and
Adam (element-wise) keeps the queries independent.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cfx.seeding import torch_generator


def total_variation(images: Tensor, beta: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Per-image total variation ``sum_{c,i,j} (dh^2 + dw^2 + eps)^(beta/2) - eps^(beta/2)`` (Mahendran & Vedaldi).

    ``dh = x[c, i+1, j] - x[c, i, j]`` and ``dw = x[c, i, j+1] - x[c, i, j]`` on the ``(H-1) x (W-1)`` pixels where
    both exist. ``beta = 1`` is DISC's eq. 4 (sum of gradient magnitudes); ``beta = 2`` sums squared differences.
    ``eps`` keeps the gradient finite for ``beta < 2`` on flat regions; subtracting ``eps^(beta/2)`` makes a
    constant image cost exactly 0.

    Args:
        images: ``(N, C, H, W)`` images.
        beta: the exponent (> 0).
        eps: the smoothing constant (>= 0).

    Returns:
        ``(N,)`` total variations.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if beta <= 0 or eps < 0:
        raise ValueError(f"expected beta > 0 and eps >= 0, got beta={beta}, eps={eps}")
    dh = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
    dw = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
    terms = (dh.square() + dw.square() + eps).pow(beta / 2) - eps ** (beta / 2)
    return terms.flatten(1).sum(dim=1)


def squared_l2(images: Tensor) -> Tensor:
    """Per-image squared L2 norm ``sum_{c,i,j} x^2`` of ``(N, C, H, W)`` images, shape ``(N,)``."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    return images.square().flatten(1).sum(dim=1)


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(H, W)`` from an int (square) or a pair of positive ints."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"expected image_size to be a positive int or an (H, W) pair, got {image_size!r}")
    return size


class BatchedGenerator(nn.Module, abc.ABC):
    """Q independent generators (one per query) whose parameters are stacked along a leading query dimension.

    Subclasses create their parameters and buffers with a leading query dimension, give every module that draws
    random values an ``init_query_(q, generator)`` method and call :meth:`initialize_queries` at the end of
    ``__init__``. The regulariser is ``tv_weight * TV_beta + l2_weight * ||x||^2`` per query (0 when both weights
    are 0).

    Args:
        num_queries: Q.
        channels: image channels C.
        image_size: H (= W) or ``(H, W)``.
        seeds: ``(Q,)`` integer seeds, one per query (e.g. ``cfx.seeding.per_sample_seed(indices, seed)``).
        tv_weight: weight of the total variation.
        l2_weight: weight of the squared L2 norm.
        tv_beta: exponent beta of :func:`total_variation`.
    """

    def __init__(
        self,
        num_queries: int,
        channels: int,
        image_size: int | Sequence[int],
        seeds: Tensor,
        tv_weight: float = 0.0,
        l2_weight: float = 0.0,
        tv_beta: float = 2.0,
    ):
        super().__init__()
        if num_queries < 1 or channels < 1:
            raise ValueError(f"expected num_queries >= 1 and channels >= 1, got {num_queries} and {channels}")
        seeds = torch.as_tensor(seeds)
        if seeds.shape != (num_queries,) or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise ValueError(
                f"expected ({num_queries},) integer seeds, got dtype {seeds.dtype}, shape {tuple(seeds.shape)}"
            )
        if tv_weight < 0 or l2_weight < 0 or tv_beta <= 0:
            raise ValueError(
                f"expected tv_weight, l2_weight >= 0 and tv_beta > 0, got {tv_weight}, {l2_weight}, {tv_beta}"
            )
        self.num_queries = int(num_queries)
        self.channels = int(channels)
        self.image_size = image_size_pair(image_size)
        self.tv_weight = float(tv_weight)
        self.l2_weight = float(l2_weight)
        self.tv_beta = float(tv_beta)
        self._seeds = seeds.to(device="cpu", dtype=torch.int64)

    @abc.abstractmethod
    def forward(self) -> Tensor:
        """Return the ``(Q, C, H, W)`` images in [0, 1]."""

    @abc.abstractmethod
    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups ordered from the input to the output layer, for progressive optimisation."""

    @torch.no_grad()
    def initialize_queries(self) -> None:
        """Draw every query's random values from its own ``torch.Generator`` seeded with its seed.

        For each query, the ``init_query_(q, generator)`` methods of ``self.modules()`` are called in module
        order with that query's generator, so query ``q`` gets the same values whatever the batch.
        """
        for q, seed in enumerate(self._seeds.tolist()):
            generator = torch_generator(seed)
            for module in self.modules():
                init_query = getattr(module, "init_query_", None)
                if init_query is not None:
                    init_query(q, generator)

    def regularizer(self, images: Tensor) -> Tensor:
        """The ``(Q,)`` prior penalty ``tv_weight * TV + l2_weight * ||x||^2`` of ``(Q, C, H, W)`` images."""
        if images.ndim != 4 or images.shape[0] != self.num_queries:
            raise ValueError(f"expected images of shape ({self.num_queries}, C, H, W), got {tuple(images.shape)}")
        penalty = images.new_zeros(images.shape[0])
        if self.tv_weight > 0:
            penalty = penalty + self.tv_weight * total_variation(images, self.tv_beta)
        if self.l2_weight > 0:
            penalty = penalty + self.l2_weight * squared_l2(images)
        return penalty

    def set_trainable_groups(self, count: int) -> None:
        """Make ``layer_groups()[:count]`` trainable and freeze the rest (``requires_grad=False``)."""
        groups = self.layer_groups()
        if not 0 <= count <= len(groups):
            raise ValueError(f"expected 0 <= count <= {len(groups)} layer groups, got {count}")
        for position, group in enumerate(groups):
            for parameter in group:
                parameter.requires_grad_(position < count)

    def _check_keep(self, keep: Tensor) -> Tensor:
        if keep.dtype != torch.bool or keep.shape != (self.num_queries,):
            raise ValueError(
                f"expected a ({self.num_queries},) bool mask, got dtype {keep.dtype}, shape {tuple(keep.shape)}"
            )
        if not bool(keep.any()):
            raise ValueError("select needs at least one query to keep")
        return keep

    @torch.no_grad()
    def select(self, keep: Tensor) -> None:
        """Keep only the queries where the ``(Q,)`` bool mask ``keep`` is True, in place.

        Every parameter keeps its identity (its ``.data`` and ``.grad`` are replaced by their slices), so
        optimiser parameter groups and :meth:`layer_groups` stay valid; slice the optimiser state with
        ``cfx.counterfactual.search.narrow_optimizer_state`` (the search loop does both). Buffers are replaced
        by their slices.
        """
        keep = self._check_keep(keep)
        for module in self.modules():
            for parameter in module._parameters.values():
                if parameter is None:
                    continue
                index = keep.to(parameter.device)
                parameter.data = parameter.data[index]
                if parameter.grad is not None:
                    parameter.grad = parameter.grad[index]
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer[keep.to(buffer.device)]
        self._seeds = self._seeds[keep.cpu()]
        self.num_queries = int(keep.sum())
