"""The batched early-exit search loop every iterative explainer runs (DeDUCE, JSMA, Wachter, DISC, ...).

All queries of a batch are searched together, but only the *active* ones: each iteration evaluates the rows that
have not finished, and a row leaves the computation (its per-row tensors, parameters and optimiser state are
indexed down) as soon as the method's stopping rule says so (or, with ``stop_check_every = k``, at the next k-th
step, its results written when it stopped). A query's result therefore depends on nothing but
the query, its target, its dataset index and the method's settings (the classifier runs in eval mode, so no
statistic couples the rows).

A method subclasses :class:`SearchExplainer` and writes only its step: :meth:`~SearchExplainer.start` (the
per-row state, registered on the :class:`ActiveSearch`), :meth:`~SearchExplainer.evaluate` (the current iterates,
their logits and the loss to decrease) and :meth:`~SearchExplainer.step` (the update from the loss gradient).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.evaluation import evaluation_mode
from cfx.nn.folding import inference_copy

UNBOUNDED = 1e10  # alibi's initial upper bound of a bisected weight; a bound >= 1e9 counts as "none found yet"


def bisection_step(c: Tensor, lower: Tensor, upper: Tensor, found: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(c, lower, upper)`` after a search round: the bisection of a per-query loss weight (alibi's rules; VLK, GCI).

    Found a counterfactual in the round: ``upper = min(upper, c)``, then ``c = (lower + upper) / 2``.
    None found: ``lower = max(lower, c)``, then ``c = (lower + upper) / 2`` if an upper bound is known
    (``upper < 1e9``), else ``c = 10 c``.
    """
    upper = torch.where(found, torch.minimum(upper, c), upper)
    lower = torch.where(found, lower, torch.maximum(lower, c))
    bounded = upper < 1e9
    c = torch.where(bounded, (lower + upper) / 2, torch.where(found, c, 10 * c))
    return c, lower, upper


def target_reached(logits: Tensor, targets: Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """Whether each sample is classified as its target with softmax probability ``>= confidence``.

    Args:
        logits: ``(N, K)`` classifier logits.
        targets: ``(N,)`` target classes.
        confidence: the least target probability that counts as reached.

    Returns:
        ``(reached, target_probability)``, both ``(N,)``; ``reached`` also requires the target to be the argmax
        (implied by ``confidence > 0.5`` except for exact ties).
    """
    probabilities = logits.detach().float().softmax(dim=1)
    target_probability = probabilities.gather(1, targets[:, None]).squeeze(1)
    return (probabilities.argmax(dim=1) == targets) & (target_probability >= confidence), target_probability


def check_search_settings(
    confidence: float, max_iterations: int, path_every: int | None, stop_check_every: int = 1
) -> None:
    """Raise ``ValueError`` unless the settings every iterative explainer shares are valid."""
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must lie in (0, 1], got {confidence}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    if path_every is not None and path_every < 1:
        raise ValueError(f"path_every must be None or >= 1, got {path_every}")
    if stop_check_every < 1:
        raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")


@torch.no_grad()
def narrow_optimizer_state(optimizer: torch.optim.Optimizer, keep: Tensor) -> None:
    """Index every per-row state tensor of ``optimizer`` (leading dimension ``len(keep)``) by the bool ``keep``.

    Adam's ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``, SGD's ``momentum_buffer``: every state tensor with
    a leading dimension of ``len(keep)`` keeps its rows where ``keep`` is True, so the moments follow the rows
    that stay. Scalar entries (Adam's ``step``, shared by all rows) are left alone. The parameters themselves are
    narrowed by their owner (:meth:`ActiveSearch.narrow`, ``BatchedGenerator.select``).

    Args:
        optimizer: an optimiser over parameters with a leading row dimension.
        keep: ``(R,)`` bool mask of the rows that stay.
    """
    if keep.dtype != torch.bool or keep.ndim != 1:
        raise ValueError(f"expected a (R,) bool mask, got dtype {keep.dtype}, shape {tuple(keep.shape)}")
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == keep.shape[0]:
                state[name] = value[keep.to(value.device)]


def _in_bfloat16(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run under bfloat16 autocast, its floating-point outputs returned as float32."""

    def run(images: Tensor) -> Any:
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
            outputs = method(images)
        return tree_map(lambda value: value.float() if isinstance(value, Tensor) else value, outputs)

    return run


def search_classifier(
    classifier: FeatureClassifier,
    fold_batch_norm: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    bfloat16: bool = False,
) -> FeatureClassifier:
    """The network a search evaluates: ``classifier`` itself, or a faster frozen copy of it.

    Any option makes a copy (:func:`~cfx.nn.folding.inference_copy`: parametrisations such as soft spectral norm
    baked in as constants); the user's module is never changed.

    Args:
        classifier: the model to explain.
        fold_batch_norm: fold eval-mode batch norms into the convolutions before them (fewer passes over
            memory; rounding changes at the 1e-6 level).
        channels_last: store the copy's 4-D weights channels-last (helps GPUs with tensor cores and oneDNN on
            some CPUs; changes the order of floating-point sums).
        compile: ``torch.compile`` the copy's ``forward`` and ``forward_features`` with dynamic shapes, so that
            the shrinking active set does not recompile (the first calls pay the compilation).
        bfloat16: run the copy's convolutions and matrix products under bfloat16 autocast (for GPUs and CPUs
            with bfloat16 units; about 3 significant digits, so counterfactuals change), outputs in float32 --
            anything downstream (DeDUCE's Gaussians, the losses) stays float32.
    """
    if not (fold_batch_norm or channels_last or compile or bfloat16):
        return classifier
    network = inference_copy(classifier, fold_batch_norm=fold_batch_norm)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    if compile:
        network.forward = torch.compile(network.forward, dynamic=True)
        network.forward_features = torch.compile(network.forward_features, dynamic=True)
    if bfloat16:
        network.forward = _in_bfloat16(network.forward)
        network.forward_features = _in_bfloat16(network.forward_features)
    return network


class PathRecorder:
    """Intermediate images of a search, every ``every`` steps.

    ``path[i, j]`` is sample ``i``'s iterate after ``min(j * every, iterations[i])`` steps, for
    ``j = 0 .. max_iterations // every`` (``path[:, 0]`` is the query): a sample that stopped early repeats its
    last iterate, so the shape depends on the settings only, never on the rest of the batch.

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
        """Store ``iterates`` (the images of samples ``rows`` after ``step >= 1`` steps) if it is a record step."""
        if self.path is not None and step > 0 and step % self.every == 0:
            self.path[rows, step // self.every] = iterates.detach()

    def finish(self, last_iterates: Tensor, iterations: Tensor) -> Tensor | None:
        """The ``(N, K, C, H, W)`` path, each sample's slots after its last step filled with its last iterate."""
        if self.path is None:
            return None
        steps = torch.arange(self.path.shape[1], device=iterations.device) * self.every
        after_stop = steps[None, :] > iterations[:, None]
        after_stop = after_stop.view(*after_stop.shape, *([1] * (self.path.ndim - 2)))
        return torch.where(after_stop, last_iterates[:, None], self.path)


class ActiveSearch:
    """The rows of a batched search still running, their per-row state, and the full-size results.

    At the start every query whose target is already reached (:func:`target_reached` with the method's
    confidence) is finished: success, 0 iterations, the query unchanged. The others are the active ``rows``.
    A method keeps its per-row tensors in :attr:`state` (``(R, ...)``, row ``r`` belonging to query
    ``rows[r]``) and registers with :meth:`track` any optimiser, leaf parameter or module (with a
    ``select(keep)`` method, e.g. a ``BatchedGenerator``) holding per-row values (:attr:`tracked`);
    :meth:`narrow` then indexes all of them together. The full-size :attr:`details` (``(N, ...)`` per-query
    method outputs, :meth:`Explainer.detail_fields`) start at ``details`` (what a query finished at the start
    gets) and :meth:`finish` writes the finished rows' values. Everything lives for one ``explain`` call.

    Args:
        queries: ``(N, C, H, W)`` the queries.
        targets: ``(N,)`` int64 target classes.
        logits: ``(N, K)`` the classifier's logits of the queries.
        confidence: target probability at which a row counts as reached.
        path_every: record the iterates every this many steps (``None``: no path).
        max_iterations: the search's iteration limit.
        details: ``(N, ...)`` initial value of each per-query detail (copied; default none).
    """

    def __init__(
        self,
        queries: Tensor,
        targets: Tensor,
        logits: Tensor,
        confidence: float,
        path_every: int | None,
        max_iterations: int,
        details: Mapping[str, Tensor] | None = None,
    ):
        reached, probability = target_reached(logits, targets, confidence)
        self.original_prediction = logits.argmax(dim=1)
        self.counterfactuals = queries.clone()
        self.last_iterates = queries.clone()
        self.success = reached.clone()
        self.target_probability = probability.clone()
        self.iterations = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
        self.recorder = PathRecorder(queries, path_every, max_iterations)
        self.rows = torch.nonzero(~reached).squeeze(1)
        self.written = torch.zeros(len(self.rows), dtype=torch.bool, device=queries.device)
        self.state: dict[str, Tensor] = {"targets": targets.index_select(0, self.rows)}
        self.tracked: dict[str, torch.optim.Optimizer | nn.Parameter | nn.Module] = {}
        self.details: dict[str, Tensor] = {name: value.clone() for name, value in (details or {}).items()}
        short = {name: tuple(value.shape) for name, value in self.details.items() if len(value) != len(queries)}
        if short:
            raise ValueError(f"details must have one row per query ({len(queries)}), got shapes {short}")

    @property
    def targets(self) -> Tensor:
        """``(R,)`` the target classes of the active rows."""
        return self.state["targets"]

    def track(self, **items: torch.optim.Optimizer | nn.Parameter | nn.Module) -> None:
        """Register optimisers, leaf parameters and ``select``-able modules holding per-row values, by name.

        They stay the same objects (the method reads them back from :attr:`tracked`); :meth:`narrow` indexes
        their per-row values in place.
        """
        for name, item in items.items():
            if not isinstance(item, torch.optim.Optimizer | Tensor) and not callable(getattr(item, "select", None)):
                raise TypeError(
                    f"cannot narrow {name}, a {type(item).__name__}: expected an optimiser, tensor or module"
                )
            self.tracked[name] = item

    def record(self, step: int, iterates: Tensor) -> None:
        """Record the ``(R, C, H, W)`` iterates of the active rows after ``step`` steps into the path."""
        self.recorder.record(step, self.rows, iterates)

    def finish(
        self,
        done: Tensor,
        iteration: int,
        iterates: Tensor,
        success: Tensor,
        target_probability: Tensor,
        counterfactuals: Tensor | None = None,
        details: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Write the outputs of the active rows where ``done`` into the full-size results, once per row.

        A row's first write is final: a row finished earlier but still in the computation (the loop narrows every
        ``stop_check_every`` iterations) keeps its results. The writes index with :attr:`rows` and select with
        ``torch.where``, so they never wait for the device.

        Args:
            done: ``(R,)`` bool, the rows that stop now.
            iteration: the steps those rows took.
            iterates: ``(R, C, H, W)`` their current (last) iterates.
            success: ``(R,)`` whether each row found a counterfactual.
            target_probability: ``(R,)`` the target probability at each row's counterfactual.
            counterfactuals: ``(R, C, H, W)`` the returned images (default ``iterates``).
            details: ``(R, ...)`` the rows' values of some of :attr:`details` (the others keep their values).
        """
        unknown = sorted(set(details or {}) - set(self.details))
        if unknown:
            raise KeyError(f"no detail {unknown[0]!r} in this search (it has {sorted(self.details)})")
        new = done & ~self.written
        self.written = self.written | done
        rows = self.rows

        def write(full: Tensor, values: Tensor) -> None:
            mask = new.view(-1, *([1] * (values.ndim - 1)))
            full[rows] = torch.where(mask, values.detach().to(full.dtype), full[rows])

        write(self.last_iterates, iterates)
        write(self.counterfactuals, iterates if counterfactuals is None else counterfactuals)
        write(self.success, success)
        write(self.target_probability, target_probability)
        write(self.iterations, torch.full_like(rows, iteration))
        for name, value in (details or {}).items():
            write(self.details[name], value)

    @torch.no_grad()
    def narrow(self, keep: Tensor, tensors: Sequence[Tensor | None] = ()) -> list[Tensor | None]:
        """Keep only the active rows where the ``(R,)`` bool ``keep`` is True, everywhere.

        Indexes :attr:`rows`, every :attr:`state` tensor, the tracked parameters (``.data`` and ``.grad``, so
        they keep their identity in optimisers), the tracked modules (``select(keep)``) and the tracked
        optimisers' per-row state (:func:`narrow_optimizer_state`).

        Args:
            keep: the rows that stay.
            tensors: more per-row tensors to index (e.g. gradients); ``None`` entries stay ``None``.

        Returns:
            ``tensors`` indexed by ``keep``.
        """
        index = torch.nonzero(keep).squeeze(1)
        self.rows = self.rows[index]
        self.written = self.written[index]
        self.state = {name: value[index] for name, value in self.state.items()}
        for item in self.tracked.values():
            if isinstance(item, torch.optim.Optimizer):
                narrow_optimizer_state(item, keep)
            elif isinstance(item, Tensor):
                item.data = item.data[index]
                if item.grad is not None:
                    item.grad = item.grad[index]
            else:
                item.select(keep)
        return [None if tensor is None else tensor[index] for tensor in tensors]

    def result(self, params: dict) -> CounterfactualResult:
        """The full-size :class:`CounterfactualResult` (call once every row has finished)."""
        return CounterfactualResult(
            counterfactuals=self.counterfactuals,
            success=self.success,
            target_probability=self.target_probability,
            original_prediction=self.original_prediction,
            iterations=self.iterations,
            path=self.recorder.finish(self.last_iterates, self.iterations),
            params=params,
            details=dict(self.details),
        )


@dataclass(frozen=True)
class Evaluation:
    """One iteration's view of the active rows, returned by :meth:`SearchExplainer.evaluate`.

    Attributes:
        iterates: ``(R, C, H, W)`` the current images.
        logits: ``(R, K)`` the classifier's logits of ``iterates``.
        loss: ``(R,)`` per-row loss whose gradient with respect to ``inputs`` drives the step (``None`` on the
            last iteration, where no step follows).
        inputs: the tensors to differentiate ``loss`` by, each with a leading row dimension.
        values: other ``(R, ...)`` values of the iterates that the method's :meth:`SearchExplainer.stopping` reads.
    """

    iterates: Tensor
    logits: Tensor
    loss: Tensor | None = None
    inputs: Sequence[Tensor] = ()
    values: dict[str, Tensor] = field(default_factory=dict)


class SearchExplainer(Explainer):
    """An iterative explainer: evaluate the active rows, stop the finished ones, step the others.

    Every iteration ``k = 0 .. max_iterations`` evaluates the active rows' iterates (after ``k`` steps), applies
    the stopping rule (:meth:`stopping`; by default a row stops at its first iterate that reaches the target,
    :func:`target_reached`, or after ``max_iterations`` steps), writes the finished rows' results, drops them
    from every per-row tensor and optimiser (every ``stop_check_every`` iterations), and takes one step on the
    rest from the gradient of their loss. A
    query already at its target (argmax and confidence) is returned unchanged after 0 iterations, with no step.

    Args:
        classifier: the model to explain.
        confidence: target probability at which a query succeeds, in (0, 1].
        max_iterations: steps after which a query fails (>= 0).
        path_every: record the iterates every this many steps in ``CounterfactualResult.path`` (``None``: no
            path).
        fold_batch_norm, channels_last, compile, bfloat16: evaluate a faster copy of the classifier
            (:func:`search_classifier`, :attr:`search_network`); a method's :meth:`evaluate` uses it.
        stop_check_every: drop the finished rows from the computation every this many iterations (1: at once).
            The results are the same for any value -- a finished row's outputs are written when it stops and
            its later steps are discarded -- but between checks the loop never waits for the device (for
            GPUs); the price is up to ``stop_check_every - 1`` wasted steps per row.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        confidence: float,
        max_iterations: int,
        path_every: int | None,
        *,
        fold_batch_norm: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        bfloat16: bool = False,
        stop_check_every: int = 1,
    ):
        super().__init__(classifier)
        check_search_settings(confidence, max_iterations, path_every, stop_check_every)
        self.stop_check_every = stop_check_every
        self.confidence = confidence
        self.max_iterations = max_iterations
        self.path_every = path_every
        self.channels_last = channels_last
        self.search_network = search_classifier(classifier, fold_batch_norm, channels_last, compile, bfloat16)

    def auxiliary_modules(self) -> list[nn.Module]:
        """Modules besides the classifier that the search evaluates (kept in eval mode, moved to the queries)."""
        return []

    def initial_details(self, queries: Tensor, targets: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """The ``(N, ...)`` details of every query before the search: what a query finished at the start keeps.

        Called in eval mode without gradients. By default zeros of each :meth:`~Explainer.detail_fields` entry
        (none for most methods); a method with details overrides this to say what an unchanged query reports.
        """
        return {
            name: torch.zeros(len(queries), *shape, dtype=dtype, device=queries.device)
            for name, (dtype, shape) in self.detail_fields().items()
        }

    def search_input(self, images: Tensor) -> Tensor:
        """``images`` in the memory layout :attr:`search_network` expects (channels-last if so configured)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @abc.abstractmethod
    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """Set up the per-row state of the active rows in ``search`` from their ``(R, ...)`` queries and indices."""

    @abc.abstractmethod
    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """The active rows' iterates after ``iteration`` steps, their logits and (unless ``last``) their loss."""

    @abc.abstractmethod
    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """Take step ``iteration + 1`` of the (already narrowed) active rows from their loss ``gradients``."""

    def stopping(
        self,
        search: ActiveSearch,
        iteration: int,
        last: bool,
        evaluation: Evaluation,
        reached: Tensor,
        probability: Tensor,
    ) -> Tensor:
        """Finish the rows that stop after ``iteration`` steps (``search.finish``) and return the ``(R,)`` done mask.

        The default rule: a row stops at its first iterate that reaches the target (success) or at the last
        iteration (failure, the last iterate returned).
        """
        done = reached | last
        search.finish(done, iteration, evaluation.iterates, reached, probability)
        return done

    def explain(
        self, images: Tensor, targets: Tensor | Sequence[int], indices: Tensor | Sequence[int] | None = None
    ) -> CounterfactualResult:
        """Search counterfactuals of ``images`` towards ``targets``, all queries at once.

        A query already classified as its target with ``confidence`` is returned unchanged (success, 0
        iterations). A query that fails returns its last iterate (``success`` False).

        Args:
            images: ``(N, C, H, W)`` queries in [0, 1] (see :meth:`Explainer.check_query`).
            targets: ``(N,)`` integer target classes.
            indices: ``(N,)`` integer dataset indices seeding anything random per query (default ``arange(N)``).
        """
        images, targets, indices = self.check_query(images, targets, indices)
        auxiliary = [module.to(images.device) for module in self.auxiliary_modules()]
        if self.search_network is not self.classifier:
            self.search_network.to(images.device)  # the search's own frozen copy
        with evaluation_mode(self.classifier, *auxiliary):
            return self._search(images.detach(), targets, indices)

    def _search(self, queries: Tensor, targets: Tensor, indices: Tensor) -> CounterfactualResult:
        with torch.no_grad():
            if len(queries) > 0:
                logits = self.search_network(self.search_input(queries))
            else:
                logits = queries.new_zeros(0, self.classifier.num_classes)
        with torch.no_grad():
            details = self.initial_details(queries, targets, indices)
        search = ActiveSearch(
            queries, targets, logits, self.confidence, self.path_every, self.max_iterations, details=details
        )
        if len(search.rows) > 0:
            with torch.enable_grad():
                self._run(search, queries.index_select(0, search.rows), indices.index_select(0, search.rows))
        return search.result(self.params)

    def _run(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        self.start(search, queries, indices)
        leaving = torch.zeros_like(search.written)
        for iteration in range(self.max_iterations + 1):
            last = iteration == self.max_iterations
            evaluation = self.evaluate(search, iteration, last)
            search.record(iteration, evaluation.iterates)
            reached, probability = target_reached(evaluation.logits, search.targets, self.confidence)
            leaving = leaving | self.stopping(search, iteration, last, evaluation, reached, probability)
            check = last or (iteration + 1) % self.stop_check_every == 0
            any_leaving = check and bool(leaving.any())  # the loop's only host syncs, at a check
            if any_leaving and bool(leaving.all()):
                return
            gradients = list(torch.autograd.grad(evaluation.loss.sum(), evaluation.inputs, allow_unused=True))
            del evaluation  # release the graph before narrowing: a live graph pins the leaves' old shapes
            if any_leaving:
                gradients = search.narrow(~leaving, gradients)
                leaving = torch.zeros_like(search.written)
            self.step(search, gradients, iteration)
