"""Wachter et al. (2017): gradient-based counterfactuals trading a prediction loss against the distance to the query."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.counterfactual.iterative import PathRecorder, check_search_settings, evaluation_mode, target_reached
from cfx.nn.classifier import FeatureClassifier

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Wachter(Explainer):
    """Minimise ``lambda * CE(f(x'), t) + d(x', x)`` over ``x'`` in [0, 1] with Adam, growing ``lambda``.

    The prediction loss is the cross-entropy towards the target (Wachter et al. write a squared distance of the
    output to the desired one; the cross-entropy is the usual choice for a classifier's softmax and is what the
    other explainers here use). ``d`` is the L1 distance summed over pixels (no MAD weighting: all pixels share
    one scale) or the squared L2 distance. ``x'`` starts at the query; after each Adam step it is clamped to
    [0, 1] (projected Adam). ``lambda = lambda_init * lambda_growth ** stage`` with ``stage = step //
    steps_per_lambda``: a query whose target is not reached during a stage moves to the next, larger ``lambda``;
    a query that reached it (target softmax ``>= confidence``) stops at the end of that stage and returns its
    valid iterate of smallest distance. After ``max_iterations`` steps without a valid iterate it fails and
    returns its last iterate. Deterministic; every sample has its own Adam moments, so results do not depend on the
    batch.

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
    ):
        super().__init__(classifier)
        if lambda_init <= 0 or lambda_growth < 1:
            raise ValueError(f"need lambda_init > 0 and lambda_growth >= 1, got {lambda_init} and {lambda_growth}")
        if steps_per_lambda < 1:
            raise ValueError(f"steps_per_lambda must be >= 1, got {steps_per_lambda}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if distance not in ("l1", "squared_l2"):
            raise ValueError(f"distance must be 'l1' or 'squared_l2', got {distance!r}")
        check_search_settings(confidence, max_iterations, path_every)
        self.lambda_init = lambda_init
        self.lambda_growth = lambda_growth
        self.steps_per_lambda = steps_per_lambda
        self.learning_rate = learning_rate
        self.distance = distance
        self.confidence = confidence
        self.max_iterations = max_iterations
        self.path_every = path_every

    def explain(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> CounterfactualResult:
        """Optimise counterfactuals of ``images`` towards ``targets``, all queries at once.

        A query whose target is already the classifier's prediction is returned unchanged (success, 0
        iterations).

        Args:
            images: ``(N, C, H, W)`` queries in [0, 1].
            targets: ``(N,)`` target classes.
            indices: unused (the optimisation is deterministic); accepted for the common interface.
        """
        self.check_query(images, targets)
        targets = targets.to(images.device, torch.long)
        with evaluation_mode(self.classifier):
            return self._optimise(images.detach(), targets)

    def _distances(self, differences: Tensor) -> Tensor:
        if self.distance == "l1":
            return differences.abs().flatten(1).sum(dim=1)
        return differences.square().flatten(1).sum(dim=1)

    def _optimise(self, queries: Tensor, targets: Tensor) -> CounterfactualResult:
        with torch.no_grad():
            original_logits = self.classifier(queries)
        original_prediction = original_logits.argmax(dim=1)
        _, target_probability = target_reached(original_logits, targets, self.confidence)
        success = original_prediction == targets
        iterations = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
        counterfactuals = queries.clone()
        last_iterates = queries.clone()
        recorder = PathRecorder(queries, self.path_every, self.max_iterations)

        rows = torch.nonzero(~success).squeeze(1)
        row_queries, row_targets = queries.index_select(0, rows), targets.index_select(0, rows)
        iterates = row_queries.clone()
        best, best_distance = row_queries.clone(), torch.full((len(rows),), math.inf, device=queries.device)
        best_probability = target_probability.index_select(0, rows)
        first_moment, second_moment = torch.zeros_like(iterates), torch.zeros_like(iterates)
        for iteration in range(self.max_iterations + 1):
            if len(rows) == 0:
                break
            weight = self.lambda_init * self.lambda_growth ** (iteration // self.steps_per_lambda)
            with torch.enable_grad():
                leaf = iterates.detach().requires_grad_(iteration < self.max_iterations)
                logits = self.classifier(leaf)
                distance = self._distances(leaf - row_queries)
                loss = weight * F.cross_entropy(logits, row_targets, reduction="none") + distance
            reached, probability = target_reached(logits, row_targets, self.confidence)
            better = reached & (distance.detach() < best_distance)
            best = torch.where(better[:, None, None, None], iterates, best)
            best_distance = torch.where(better, distance.detach(), best_distance)
            best_probability = torch.where(better, probability, best_probability)
            stage_end = iteration > 0 and iteration % self.steps_per_lambda == 0
            done = (torch.isfinite(best_distance) & stage_end) | (iteration == self.max_iterations)
            if done.any():
                finished = rows[done]
                found = torch.isfinite(best_distance[done])
                success[finished] = found
                counterfactuals[finished] = torch.where(found[:, None, None, None], best[done], iterates[done])
                target_probability[finished] = best_probability[done]
                iterations[finished] = iteration
                last_iterates[finished] = iterates[done]
                if done.all():
                    break
            gradient = torch.autograd.grad(loss.sum(), leaf)[0]
            keep = torch.nonzero(~done).squeeze(1)
            if len(keep) < len(rows):
                rows, row_queries, row_targets = rows[keep], row_queries[keep], row_targets[keep]
                iterates, gradient, best, best_distance, best_probability = (
                    t[keep] for t in (iterates, gradient, best, best_distance, best_probability)
                )
                first_moment, second_moment = first_moment[keep], second_moment[keep]
            iterates, first_moment, second_moment = self._adam_step(
                iterates, gradient, first_moment, second_moment, iteration + 1
            )
            recorder.record(iteration + 1, rows, iterates)

        return CounterfactualResult(
            counterfactuals=counterfactuals,
            success=success,
            target_probability=target_probability,
            original_prediction=original_prediction,
            iterations=iterations,
            path=recorder.finish(last_iterates, iterations),
        )

    def _adam_step(
        self, iterates: Tensor, gradient: Tensor, first_moment: Tensor, second_moment: Tensor, step: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One Adam step (bias-corrected moments of step ``step``), then clamping to [0, 1]."""
        beta1, beta2 = ADAM_BETAS
        first_moment = beta1 * first_moment + (1 - beta1) * gradient
        second_moment = beta2 * second_moment + (1 - beta2) * gradient.square()
        update = (first_moment / (1 - beta1**step)) / ((second_moment / (1 - beta2**step)).sqrt() + ADAM_EPS)
        return (iterates - self.learning_rate * update).clamp(0, 1), first_moment, second_moment
