"""Sparse pixel-step search shared by DeDUCE and JSMA (on the shared active-set loop of :mod:`.search`)."""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from cfx.counterfactual.search import ActiveSearch, Evaluation, SearchExplainer
from cfx.nn.classifier import FeatureClassifier


def select_pixels(saliency: Tensor, eligible: Tensor, count: int) -> Tensor:
    """A ``(N, P)`` 0/1 mask of the ``count`` most salient eligible pixels of each row.

    Args:
        saliency: ``(N, P)`` non-negative scores (larger = picked first).
        eligible: ``(N, P)`` bool, the pixels that may be picked.
        count: pixels picked per row (fewer where fewer are eligible).
    """
    scores = saliency.masked_fill(~eligible, -torch.inf)
    values, positions = scores.topk(min(count, scores.shape[1]), dim=1)
    return torch.zeros_like(saliency).scatter_(1, positions, (values > -torch.inf).to(saliency.dtype))


class PixelStepExplainer(SearchExplainer):
    """Sparse pixel search: each step moves the most salient eligible pixels by ``step_size``, then clips to [0, 1].

    A query stops as soon as the classifier predicts its target with softmax probability ``>= confidence``
    (success), or after ``max_iterations`` steps (failure). Subclasses define the per-sample loss whose input
    gradient guides the search (:meth:`objective`) and how a step picks and moves pixels (:meth:`move`).
    Deterministic: ``indices`` are accepted for the common interface and unused.

    Args:
        classifier: the model to explain.
        pixels_per_step: pixels moved per step (over the ``C * H * W`` input values).
        step_size: how far a picked pixel moves.
        confidence: target probability at which a query succeeds.
        max_iterations: steps after which a query fails.
        path_every: record the iterates every this many steps in ``CounterfactualResult.path`` (``None``: no path).
        acceleration: the fast-path options of :class:`~cfx.counterfactual.search.SearchExplainer`
            (``fold_batch_norm``, ``channels_last``, ``compile``, ``bfloat16``, ``stop_check_every``).
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        pixels_per_step: int,
        step_size: float,
        confidence: float,
        max_iterations: int,
        path_every: int | None,
        **acceleration: bool | int,
    ):
        super().__init__(classifier, confidence, max_iterations, path_every, **acceleration)
        if pixels_per_step < 1:
            raise ValueError(f"pixels_per_step must be >= 1, got {pixels_per_step}")
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.pixels_per_step = pixels_per_step
        self.step_size = step_size

    @abc.abstractmethod
    def objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, loss)`` at ``images``: the ``(N, K)`` logits and the ``(N,)`` per-sample loss to decrease.

        Each sample's loss must depend on that sample only (its input gradient is the sample's own).
        """

    @abc.abstractmethod
    def initial_state(self, pixels: Tensor) -> dict[str, Tensor]:
        """The method's per-sample state at the start, as ``(N, ...)`` tensors, for ``pixels`` of shape ``(N, P)``.

        Its entries live in ``ActiveSearch.state`` beside ``"iterates"`` and ``"targets"`` (use other names).
        """

    @abc.abstractmethod
    def move(self, pixels: Tensor, gradient: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One search step on flattened ``(N, P)`` pixels, given the loss gradient ``(N, P)``.

        ``state`` is the search's per-row state (the method's entries from :meth:`initial_state` among others).

        Returns:
            The moved pixels (in [0, 1]) and the method's updated entries.
        """

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """The iterates start at the queries, with the method's :meth:`initial_state` beside them."""
        search.state.update(self.initial_state(queries.flatten(1)), iterates=queries)

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """The iterates, their logits and the :meth:`objective` loss with respect to the iterates."""
        leaf = self.search_input(search.state["iterates"]).detach().requires_grad_(not last)
        logits, loss = self.objective(leaf, search.targets)
        return Evaluation(search.state["iterates"], logits, loss, (leaf,))

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """:meth:`move` the pixels of the iterates along the input gradient."""
        iterates = search.state["iterates"]
        pixels, updates = self.move(iterates.flatten(1), gradients[0].flatten(1), search.state)
        search.state.update(updates, iterates=pixels.view_as(iterates))
