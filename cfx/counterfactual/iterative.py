"""Machinery shared by the iterative explainers (DeDUCE, JSMA, Wachter, DISC): batched search, per-sample stopping.

Every search here runs all queries of a batch together, but only the *active* ones: each iteration forwards the
subset of queries that have not finished (``index_select`` of the active rows), and a query leaves the
computation as soon as it reaches its target. A query's result therefore depends on nothing but the query, its
target and the method's settings (the classifier runs in eval mode, so no statistic couples the samples).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.nn.classifier import FeatureClassifier


@contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode inside the block and restore their previous modes afterwards."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in zip(modules, modes, strict=True):
            module.train(was_training)


def target_reached(logits: Tensor, targets: Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """Whether each sample is classified as its target with softmax probability ``>= confidence``.

    Args:
        logits: ``(N, K)`` classifier logits.
        targets: ``(N,)`` target classes.
        confidence: the least target probability that counts as reached.

    Returns:
        ``(reached, target_probability)``, both ``(N,)``; ``reached`` also requires the target to be the argmax
        (implied by ``confidence >= 0.5`` except for exact ties).
    """
    probabilities = logits.detach().softmax(dim=1)
    target_probability = probabilities.gather(1, targets[:, None]).squeeze(1)
    return (probabilities.argmax(dim=1) == targets) & (target_probability >= confidence), target_probability


def check_search_settings(confidence: float, max_iterations: int, path_every: int | None) -> None:
    """Raise ``ValueError`` unless the settings every iterative explainer shares are valid."""
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must lie in (0, 1], got {confidence}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    if path_every is not None and path_every < 1:
        raise ValueError(f"path_every must be None or >= 1, got {path_every}")


class PathRecorder:
    """Intermediate images of a search, every ``every`` steps.

    ``path[i, j]`` is sample ``i``'s iterate after ``min(j * every, iterations[i])`` steps, for
    ``j = 0 .. max_iterations // every``: a sample that stopped early repeats its last iterate, so the shape
    depends on the settings only, never on the rest of the batch.

    Args:
        queries: ``(N, C, H, W)`` the starting images.
        every: record every this many steps; ``None`` records nothing.
        max_iterations: the search's iteration limit.
    """

    def __init__(self, queries: Tensor, every: int | None, max_iterations: int):
        self.every = every
        self.path = None
        if every is not None:
            count = max_iterations // every + 1
            self.path = queries.detach().unsqueeze(1).repeat(1, count, *([1] * (queries.ndim - 1)))

    def record(self, step: int, rows: Tensor, iterates: Tensor) -> None:
        """Store ``iterates`` (the images of samples ``rows`` after ``step`` steps) if ``step`` is a record step."""
        if self.path is not None and step % self.every == 0:
            self.path[rows, step // self.every] = iterates.detach()

    def finish(self, last_iterates: Tensor, iterations: Tensor) -> Tensor | None:
        """The ``(N, K, C, H, W)`` path, each sample's slots after its last step filled with its last iterate."""
        if self.path is None:
            return None
        steps = torch.arange(self.path.shape[1], device=iterations.device) * self.every
        after_stop = steps[None, :] > iterations[:, None]
        after_stop = after_stop.view(*after_stop.shape, *([1] * (self.path.ndim - 2)))
        return torch.where(after_stop, last_iterates[:, None], self.path)


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


class PixelStepExplainer(Explainer):
    """Sparse pixel search: each step moves the most salient eligible pixels by ``step_size``, then clips to [0, 1].

    A query stops as soon as the classifier gives its target a softmax probability ``>= confidence`` (success),
    or after ``max_iterations`` steps (failure). Subclasses define the per-sample loss whose input gradient
    guides the search (:meth:`objective`) and how a step picks and moves pixels (:meth:`step`).

    Args:
        classifier: the model to explain.
        pixels_per_step: pixels moved per step (over the ``C * H * W`` input values).
        step_size: how far a picked pixel moves.
        confidence: target probability at which a query succeeds.
        max_iterations: steps after which a query fails.
        path_every: record the iterates every this many steps in ``CounterfactualResult.path`` (``None``: no path).
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        pixels_per_step: int,
        step_size: float,
        confidence: float,
        max_iterations: int,
        path_every: int | None,
    ):
        super().__init__(classifier)
        if pixels_per_step < 1:
            raise ValueError(f"pixels_per_step must be >= 1, got {pixels_per_step}")
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        check_search_settings(confidence, max_iterations, path_every)
        self.pixels_per_step = pixels_per_step
        self.step_size = step_size
        self.confidence = confidence
        self.max_iterations = max_iterations
        self.path_every = path_every

    @abc.abstractmethod
    def objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, loss)`` at ``images``: the ``(N, K)`` logits and the ``(N,)`` per-sample loss to decrease.

        Each sample's loss must depend on that sample only (its input gradient is the sample's own).
        """

    @abc.abstractmethod
    def initial_state(self, pixels: Tensor) -> dict[str, Tensor]:
        """The per-sample search state at the start, as ``(N, ...)`` tensors, for ``pixels`` of shape ``(N, P)``."""

    @abc.abstractmethod
    def step(self, pixels: Tensor, gradient: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One search step on flattened ``(N, P)`` pixels, given the loss gradient ``(N, P)``.

        Returns:
            The moved pixels (in [0, 1]) and the updated state.
        """

    def explain(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> CounterfactualResult:
        """Search counterfactuals of ``images`` towards ``targets``, all queries at once.

        A query whose target is already the classifier's prediction is returned unchanged (success, 0
        iterations). A query that fails returns its last iterate (``success`` False).

        Args:
            images: ``(N, C, H, W)`` queries in [0, 1].
            targets: ``(N,)`` target classes.
            indices: unused (the search is deterministic); accepted for the common interface.
        """
        self.check_query(images, targets)
        targets = targets.to(images.device, torch.long)
        with evaluation_mode(self.classifier):
            return self._search(images.detach(), targets)

    def _search(self, queries: Tensor, targets: Tensor) -> CounterfactualResult:
        with torch.no_grad():
            original_logits = self.classifier(queries)
        original_prediction = original_logits.argmax(dim=1)
        _, query_probability = target_reached(original_logits, targets, self.confidence)
        success = original_prediction == targets
        target_probability = query_probability.clone()
        iterations = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
        last_iterates = queries.clone()
        recorder = PathRecorder(queries, self.path_every, self.max_iterations)

        rows = torch.nonzero(~success).squeeze(1)
        iterates = queries.index_select(0, rows)
        row_targets = targets.index_select(0, rows)
        state = self.initial_state(iterates.flatten(1))
        for iteration in range(self.max_iterations + 1):
            if len(rows) == 0:
                break
            with torch.enable_grad():
                leaf = iterates.detach().requires_grad_(iteration < self.max_iterations)
                logits, loss = self.objective(leaf, row_targets)
            reached, probability = target_reached(logits, row_targets, self.confidence)
            done = reached | (iteration == self.max_iterations)
            if done.any():
                finished = rows[done]
                success[finished] = reached[done]
                target_probability[finished] = probability[done]
                iterations[finished] = iteration
                last_iterates[finished] = iterates[done]
                if done.all():
                    break
            gradient = torch.autograd.grad(loss.sum(), leaf)[0]
            keep = torch.nonzero(~done).squeeze(1)
            if len(keep) < len(rows):
                rows, row_targets = rows[keep], row_targets[keep]
                iterates, gradient = iterates[keep], gradient[keep]
                state = {name: value[keep] for name, value in state.items()}
            pixels, state = self.step(iterates.flatten(1), gradient.flatten(1), state)
            iterates = pixels.view_as(iterates)
            recorder.record(iteration + 1, rows, iterates)

        return CounterfactualResult(
            counterfactuals=last_iterates,
            success=success,
            target_probability=torch.where(success, target_probability, query_probability),
            original_prediction=original_prediction,
            iterations=iterations,
            path=recorder.finish(last_iterates, iterations),
        )
