"""Wachter et al. (2017): gradient-based counterfactuals trading a prediction loss against the distance to the query."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.counterfactual.search import ActiveSearch, Evaluation, SearchExplainer
from cfx.nn.classifier import FeatureClassifier


class Wachter(SearchExplainer):
    """Minimise ``lambda * CE(f(x'), t) + d(x', x)`` over ``x'`` in [0, 1] with Adam, growing ``lambda``.

    The prediction loss is the cross-entropy towards the target (Wachter et al. write a squared distance of the
    output to the desired one; the cross-entropy is the usual choice for a classifier's softmax and is what the
    other explainers here use). ``d`` is the L1 distance summed over pixels (no MAD weighting: all pixels share one
    scale) or the squared L2 distance. ``x'`` starts at the query; after each Adam step it is clamped to [0, 1]
    (projected Adam: ``torch.optim.Adam`` with its default betas and eps over a per-row leaf tensor).
    ``lambda = lambda_init * lambda_growth ** stage`` with ``stage = step // steps_per_lambda``: a query whose target
    is not reached during a stage moves to the next, larger ``lambda``; a query that reached it (target softmax ``>=
    confidence``) stops at the end of that stage and returns its valid iterate of smallest distance. After
    ``max_iterations`` steps without a valid iterate it fails and returns its last iterate. A query already
    predicted as the target with ``confidence`` is returned unchanged after 0 iterations. Deterministic (``indices``
    are unused); every sample has its own Adam moments, so results do not depend on the batch.

    Args:
        classifier: the model to explain.
        lambda_init: weight of the prediction loss in the first stage.
        lambda_growth: factor applied to ``lambda`` at each new stage.
        steps_per_lambda: Adam steps per stage.
        learning_rate: Adam's step size.
        distance: ``"l1"`` (default) or ``"squared_l2"``.
        confidence: target probability at which an iterate is valid.
        max_iterations: Adam steps after which a query fails.
        path_every: record the iterates every this many steps in the result's ``path``.
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        lambda_init: float = 1.0,
        lambda_growth: float = 2.0,
        steps_per_lambda: int = 50,
        learning_rate: float = 0.05,
        distance: Literal["l1", "squared_l2"] = "l1",
        confidence: float = 0.5,
        max_iterations: int = 1000,
        path_every: int | None = None,
        stop_check_every: int = 1,
    ):
        super().__init__(classifier, confidence, max_iterations, path_every, stop_check_every=stop_check_every)
        if lambda_init <= 0 or lambda_growth < 1:
            raise ValueError(f"need lambda_init > 0 and lambda_growth >= 1, got {lambda_init} and {lambda_growth}")
        if steps_per_lambda < 1:
            raise ValueError(f"steps_per_lambda must be >= 1, got {steps_per_lambda}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if distance not in ("l1", "squared_l2"):
            raise ValueError(f"distance must be 'l1' or 'squared_l2', got {distance!r}")
        self.lambda_init = lambda_init
        self.lambda_growth = lambda_growth
        self.steps_per_lambda = steps_per_lambda
        self.learning_rate = learning_rate
        self.distance = distance

    def _distances(self, differences: Tensor) -> Tensor:
        if self.distance == "l1":
            return differences.abs().flatten(1).sum(dim=1)
        return differences.square().flatten(1).sum(dim=1)

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """The iterates (an Adam leaf starting at the queries) and each row's best valid iterate so far (none)."""
        iterates = nn.Parameter(queries.clone())
        search.track(iterates=iterates, optimizer=torch.optim.Adam([iterates], lr=self.learning_rate))
        search.state.update(
            queries=queries,
            best=queries.clone(),
            best_distance=torch.full((len(queries),), math.inf, device=queries.device),
            best_probability=torch.zeros(len(queries), device=queries.device),
        )

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """``lambda * CE(f(x'), t) + d(x', x)`` of the iterates, ``lambda`` growing by stage."""
        weight = self.lambda_init * self.lambda_growth ** (iteration // self.steps_per_lambda)
        iterates = search.tracked["iterates"]
        with torch.set_grad_enabled(not last):
            logits = self.classifier(iterates)
            distance = self._distances(iterates - search.state["queries"])
            loss = weight * F.cross_entropy(logits, search.targets, reduction="none") + distance
        return Evaluation(iterates.detach(), logits, loss, (iterates,), {"distance": distance.detach()})

    def stopping(
        self,
        search: ActiveSearch,
        iteration: int,
        last: bool,
        evaluation: Evaluation,
        reached: Tensor,
        probability: Tensor,
    ) -> Tensor:
        """Keep each row's closest valid iterate; stop at the end of the first stage that found one, or at the end."""
        state, distance = search.state, evaluation.values["distance"]
        better = reached & (distance < state["best_distance"])
        state["best"] = torch.where(better[:, None, None, None], evaluation.iterates, state["best"])
        state["best_distance"] = torch.where(better, distance, state["best_distance"])
        state["best_probability"] = torch.where(better, probability, state["best_probability"])
        found = torch.isfinite(state["best_distance"])
        stage_end = iteration > 0 and iteration % self.steps_per_lambda == 0
        done = (found & stage_end) | last
        counterfactuals = torch.where(found[:, None, None, None], state["best"], evaluation.iterates)
        target_probability = torch.where(found, state["best_probability"], probability)
        search.finish(done, iteration, evaluation.iterates, found, target_probability, counterfactuals)
        return done

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """One Adam step on the iterates, then clamping to [0, 1]."""
        iterates, optimizer = search.tracked["iterates"], search.tracked["optimizer"]
        iterates.grad = gradients[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            iterates.clamp_(0, 1)
