"""The per-query terms of DISC's objective (eq. 5): semantics preservation, manifold consistency, class term.

Every function returns one value per query, shape ``(Q,)``, so a batch of queries can be optimised by summing
independent losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor
from torch.nn import functional as F

from cfx.nn.duq import kernel_margin_loss


def image_space_distance(images: Tensor, queries: Tensor) -> Tensor:
    """ISO semantic term ``||x_bar - x||_2^2`` (sum over every pixel and channel) per query.

    Args:
        images: ``(Q, C, H, W)`` counterfactual candidates ``x_bar``.
        queries: ``(Q, C, H, W)`` queries ``x``.

    Returns:
        ``(Q,)`` squared distances.
    """
    if images.shape != queries.shape:
        raise ValueError(
            f"images and queries must have the same shape, got {tuple(images.shape)} and {tuple(queries.shape)}"
        )
    return (images - queries).square().flatten(1).sum(dim=1)


def latent_space_distance(representations: Sequence[Tensor], query_representations: Sequence[Tensor]) -> Tensor:
    """LSO semantic term ``sum_l mean(||Psi_l(x_bar) - Psi_l(x)||^2)`` per query.

    Each layer's squared distance is the mean over its entries (channels and positions), so stage maps of
    different sizes weigh alike whatever their resolution and width (the paper's eq. 5 sums ``d(Psi_l(x_bar),
    Psi_l(x))`` over layers without saying how each ``d`` is scaled); the layer terms are summed.

    Args:
        representations: the chosen classifier layers ``Psi_l`` of the candidates, each ``(Q, ...)``.
        query_representations: the same layers of the queries.

    Returns:
        ``(Q,)`` per-entry mean squared distances summed over layers.
    """
    if len(representations) == 0 or len(representations) != len(query_representations):
        raise ValueError(
            f"expected the same non-zero number of layers for candidates and queries, got {len(representations)} "
            f"and {len(query_representations)}"
        )
    total = None
    for candidate, query in zip(representations, query_representations, strict=True):
        if candidate.shape != query.shape:
            raise ValueError(f"layer shapes differ: {tuple(candidate.shape)} vs {tuple(query.shape)}")
        term = (candidate - query).square().flatten(1).mean(dim=1)
        total = term if total is None else total + term
    return total


def dep_consistency(
    predicted_loss: Tensor, target_loss: Tensor | float, form: Literal["absolute", "hinge"] = "absolute"
) -> Tensor:
    """DEP manifold-consistency term per query: ``|G(x_bar) - s*|`` (eq. 8) or ``max(0, G(x_bar) - s*)``.

    The absolute form is the paper's: it pulls the predicted loss to ``s*`` from either side, so a candidate that
    already looks more typical than ``s*`` is pushed to look less so. The one-sided hinge only penalises
    predicted losses above ``s*``.

    Args:
        predicted_loss: ``(Q,)`` loss predicted by the DEP loss predictor ``G`` for the candidates.
        target_loss: the target loss ``s*`` (a low loss), a number or ``(Q,)`` one per query.
        form: ``"absolute"`` (eq. 8) or ``"hinge"``.

    Returns:
        ``(Q,)`` penalties.
    """
    if predicted_loss.ndim != 1:
        raise ValueError(f"expected (Q,) predicted losses, got shape {tuple(predicted_loss.shape)}")
    if form == "absolute":
        return (predicted_loss - target_loss).abs()
    if form == "hinge":
        return (predicted_loss - target_loss).clamp(min=0)
    raise ValueError(f"form must be 'absolute' or 'hinge', got {form!r}")


def duq_consistency(kernel_values: Tensor, source: Tensor, target: Tensor, margin: float = 0.5) -> Tensor:
    """DUQ manifold-consistency term (eq. 9) ``max(K(x_bar, y) - K(x_bar, y_bar) + tau, 0)`` per query.

    Args:
        kernel_values: ``(Q, K)`` DUQ kernel similarities of the candidates to every class centroid.
        source: ``(Q,)`` the query classes ``y``.
        target: ``(Q,)`` the target classes ``y_bar``.
        margin: the margin ``tau`` (0.5 in DISC).

    Returns:
        ``(Q,)`` hinge values.
    """
    return kernel_margin_loss(kernel_values, source, target, margin)


def class_consistency(logits: Tensor, target: Tensor) -> Tensor:
    """Functional-consistency term ``CE(F(x_bar), y_bar)`` per query.

    Args:
        logits: ``(Q, K)`` classifier logits of the candidates.
        target: ``(Q,)`` target classes.

    Returns:
        ``(Q,)`` cross-entropies.
    """
    return F.cross_entropy(logits, target, reduction="none")
