"""Generative counterfactual introspection (Liu, Kailkhura, Loveland, Han; seeds/001), batched.

A query is explained by editing it through a generative model: a GAN latent (``mode="latent"``, the DCGAN of the
paper's MNIST experiment) or the attribute vector an AttGAN is conditioned on (``mode="attributes"``, the paper's
CelebA experiment), minimising ``lambda * CE(C(G(a)), t) + ||x - G(a)||_1`` with a bisection on ``lambda`` for the
smallest change. A *criticism* reaches another class; a *prototype* makes the classifier more confident of the
query's own class. The optimisation path and the most-changed attributes are the explanation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.counterfactual.revise import check_image_model
from cfx.counterfactual.search import UNBOUNDED, ActiveSearch, Evaluation, SearchExplainer, bisection_step
from cfx.metrics.functional.anogan import initial_latents
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.evaluation import evaluation_mode

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, here with per-row step counts (reset each round)
ADAM_EPSILON = 1e-8


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """The ``(R,)`` ``mask`` shaped to broadcast over the rows of ``like`` (``(R, ...)``)."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


def _check_generator(generator: nn.Module, classifier: FeatureClassifier) -> None:
    """Raise unless ``generator`` maps ``(N, latent_dim)`` latents to images of the classifier's channels and size."""
    facts = {name: getattr(generator, name, None) for name in ("latent_dim", "out_channels", "image_size")}
    if not isinstance(generator, nn.Module) or not all(isinstance(value, int) for value in facts.values()):
        raise TypeError(
            "generator must be a GAN generator module with integer latent_dim, out_channels and image_size (a GAN "
            f"checkpoint's .generator, e.g. cfx.nn.generative.WGANGenerator), got a {type(generator).__name__} with "
            f"{facts}"
        )
    if facts["out_channels"] != classifier.in_channels:
        raise ValueError(
            f"the generator makes {facts['out_channels']}-channel images, the classifier takes "
            f"{classifier.in_channels}-channel ones"
        )
    if classifier.image_size is not None and facts["image_size"] != classifier.image_size:
        raise ValueError(
            f"the generator makes {facts['image_size']}x{facts['image_size']} images, the classifier takes "
            f"{classifier.image_size}x{classifier.image_size} ones"
        )


def _check_attgan(attgan: nn.Module, classifier: FeatureClassifier) -> int:
    """Raise unless ``attgan`` is an AttGAN whose images fit the classifier; its number of attributes."""
    generator, discriminator = getattr(attgan, "generator", None), getattr(attgan, "discriminator", None)
    count = getattr(attgan, "num_attributes", None)
    if not isinstance(attgan, nn.Module) or not isinstance(discriminator, nn.Module) or not isinstance(count, int):
        raise TypeError(
            "attgan must be an AttGAN (cfx.nn.attgan.AttGAN: .generator with encode and decode, .discriminator, "
            f"integer num_attributes), got a {type(attgan).__name__}"
        )
    if count < 1:
        raise ValueError(f"the AttGAN must have at least one attribute, it has {count}")
    check_image_model(generator, "attgan.generator", ("encode", "decode"), classifier)
    return count


class GenerativeIntrospection(SearchExplainer):
    """Counterfactual prototypes and criticisms through a GAN latent or an AttGAN attribute vector.

    Each query ``x`` minimises, over an edit vector ``a``,

    ``lambda * CE(C(G(a)), t) + ||x - G(a)||_1``

    (the L1 summed over pixels, ``G(a)`` clamped to [0, 1]) by Adam steps on ``a`` (learning rate
    ``learning_rate``, torch's default betas and epsilon, each row with its own moments and step count).

    Modes. ``latent``: ``G`` is a GAN generator and ``a`` its latent, starting at the query's *inversion*: ``a``
    minimising ``||x - G(a)||_1`` by ``inversion_steps`` Adam steps (``inversion_learning_rate``) from
    ``inversion_restarts`` ``N(0, I)`` draws seeded by the query's dataset index and ``seed``
    (:func:`cfx.metrics.functional.anogan.initial_latents`), the restart of smallest final L1 kept -- all queries
    and restarts in one tensor. ``attributes``: ``G(a) = attgan.generator.decode(encode(x), a)`` and ``a`` the
    attribute vector, starting at the query's own attributes: ``attribute_table[index]`` (the data's 0/1
    attributes by dataset index) or, without a table, the AttGAN discriminator's attribute head thresholded at
    0.5 (``logit > 0``). The attributes move continuously in the box ``attribute_range`` (clamped after every
    step; AttGAN's edits at test time reach beyond 0/1 -- its ``test_int`` -- so a wider box such as
    ``(-0.5, 1.5)`` is allowed). ``held_fixed`` attributes (or latent dimensions) never change: their gradient is
    masked and their start value restored after every step (the paper holds Young fixed on CelebA).

    Kinds. ``criticism``: any target (normally another class); an iterate is *valid* when the classifier predicts
    the target with probability ``>= confidence``. ``prototype``: the target must be the classifier's prediction
    of the query (else ``ValueError``); an iterate is valid when that class's probability reaches
    ``prototype_confidence`` -- success is exactly that; a query already at it is returned unchanged.

    Bisection on lambda, per query, all as tensors. Round ``r = 1 .. bisection_steps`` runs from the start
    ``a0`` with ``lambda`` (first ``lambda_initial``) for at most ``max_iterations`` steps and ends at its first
    valid iterate (the round *found* one) or after its last step. Then (:func:`cfx.counterfactual.vlk.
    bisection_step`): found -> ``upper = lambda``, else ``lower = lambda``; the next ``lambda`` is ``(lower +
    upper) / 2`` once an upper bound exists, ten times the last one before. The next round restarts at ``a0``
    with fresh Adam moments; its first step uses the gradient at ``a0`` with the new ``lambda`` (both terms'
    gradients at ``a0`` are kept from the start), so every round takes at most ``max_iterations`` steps and a
    query at most ``bisection_steps * max_iterations`` (``result.iterations``; the path spans the rounds one
    after the other). A query leaves the computation after its last round. The returned counterfactual is the
    valid iterate of smallest L1 over all rounds (so never farther than the first lambda that succeeded), else
    (failure) the last iterate. A start ``G(a0)`` that is already valid is returned after 0 steps (no lambda); a
    query already at its target (the classifier on ``x`` itself) is returned unchanged.

    Details (:attr:`CounterfactualResult.details`, :meth:`detail_fields`), per query with ``D`` the latent size
    or number of attributes:

    - ``attributes`` ``(D,)`` float32: the returned edit vector (the latent in latent mode); for a query returned
      unchanged its own attributes (attribute mode) or NaN (latent mode: it is never inverted);
    - ``attribute_change`` ``(D,)`` float32: the returned vector minus the start ``a0`` (zeros if unchanged);
    - ``top_attributes`` ``(top_k,)`` int64: the indices of the ``top_k`` largest ``|attribute_change|`` (the
      change from the start of the path to its returned end), largest first, ties by index; held-fixed entries
      never appear; ``-1`` for a query returned unchanged;
    - ``lambda`` () float32: the ``lambda`` of the returned iterate (NaN if no step was needed);
    - ``lambda_lower``, ``lambda_upper`` () float32: the final bisection bounds (``upper`` infinite when no
      round found a valid iterate; NaN if no step was needed).

    Results do not depend on the batch: every row's terms, moments, bounds and restarts are its own and the
    networks run in eval mode (up to the rounding of batched convolutions).

    Args:
        classifier: the model to explain.
        generator: the GAN generator of latent mode (``latent_dim``, ``out_channels``, ``image_size``).
        attgan: the AttGAN of attribute mode (``.generator`` with ``encode`` / ``decode``, ``.discriminator``
            returning ``(critic, attribute logits)``, ``num_attributes``, ``attribute_names``).
        attribute_table: ``(M, A)`` the data's attributes by dataset index (attribute mode; optional).
        mode: ``"latent"`` or ``"attributes"``.
        kind: ``"criticism"`` or ``"prototype"``.
        lambda_initial: the first round's ``lambda``.
        bisection_steps: rounds of the bisection.
        max_iterations: Adam steps per round (VLK's meaning; the search takes ``bisection_steps`` times as many).
        learning_rate: Adam's step size on ``a``.
        held_fixed: attribute names (attribute mode, from ``attgan.attribute_names``) or indices never changed.
        confidence: target probability at which a criticism is valid.
        prototype_confidence: class probability at which a prototype is valid.
        top_k: how many most-changed attributes to report.
        attribute_range: ``(low, high)`` box of the attributes (attribute mode), ``low <= 0``, ``high >= 1``.
        inversion_steps, inversion_learning_rate, inversion_restarts: the latent-mode inversion.
        path_every: record ``G(a)`` every this many steps in the result's ``path``.
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).
        seed: with each query's dataset index, seeds its inversion restarts.

    Raises:
        TypeError: a generative model of the wrong kind.
        ValueError: the models do not fit the classifier or each other, a setting is out of range, unknown
            held-fixed attributes, or an attribute table of the wrong shape.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        generator: nn.Module | None = None,
        attgan: nn.Module | None = None,
        attribute_table: Tensor | None = None,
        mode: Literal["latent", "attributes"] = "latent",
        kind: Literal["criticism", "prototype"] = "criticism",
        lambda_initial: float = 1.0,
        bisection_steps: int = 5,
        max_iterations: int = 200,
        learning_rate: float = 0.05,
        held_fixed: Sequence[str] | Sequence[int] = (),
        confidence: float = 0.5,
        prototype_confidence: float = 0.99,
        top_k: int = 5,
        attribute_range: tuple[float, float] = (0.0, 1.0),
        inversion_steps: int = 300,
        inversion_learning_rate: float = 0.05,
        inversion_restarts: int = 4,
        path_every: int | None = None,
        stop_check_every: int = 1,
        seed: int = 0,
    ):
        if mode not in ("latent", "attributes"):
            raise ValueError(f"mode must be 'latent' or 'attributes', got {mode!r}")
        if kind not in ("criticism", "prototype"):
            raise ValueError(f"kind must be 'criticism' or 'prototype', got {kind!r}")
        if bisection_steps < 1:
            raise ValueError(f"bisection_steps must be >= 1, got {bisection_steps}")
        if max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
        if not 0 < prototype_confidence <= 1:
            raise ValueError(f"prototype_confidence must lie in (0, 1], got {prototype_confidence}")
        search_confidence = prototype_confidence if kind == "prototype" else confidence
        super().__init__(
            classifier,
            search_confidence,
            bisection_steps * max_iterations,
            path_every,
            stop_check_every=stop_check_every,
        )
        if not 0 < confidence <= 1:
            raise ValueError(f"confidence must lie in (0, 1], got {confidence}")
        if mode == "latent":
            if generator is None or attgan is not None or attribute_table is not None:
                raise ValueError(
                    "mode='latent' edits a GAN latent: give generator= and neither attgan= nor attribute_table= "
                    "(those are for mode='attributes')"
                )
            _check_generator(generator, classifier)
            dimension = generator.latent_dim
        else:
            if attgan is None or generator is not None:
                raise ValueError(
                    "mode='attributes' edits an AttGAN's attributes: give attgan= (and no generator=, which is for "
                    "mode='latent')"
                )
            dimension = _check_attgan(attgan, classifier)
        for name, value in (
            ("lambda_initial", lambda_initial),
            ("learning_rate", learning_rate),
            ("inversion_learning_rate", inversion_learning_rate),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        if inversion_steps < 0 or inversion_restarts < 1:
            raise ValueError(
                f"need inversion_steps >= 0 and inversion_restarts >= 1, got {inversion_steps} and {inversion_restarts}"
            )
        low, high = attribute_range
        if not (low <= 0 and high >= 1):
            raise ValueError(
                f"attribute_range must be (low, high) with low <= 0 and high >= 1 (it must hold 0/1 attributes), got "
                f"{attribute_range}"
            )
        self.generator, self.attgan, self.mode, self.kind = generator, attgan, mode, kind
        self.dimension = dimension
        self.attribute_names: tuple[str, ...] = tuple(getattr(attgan, "attribute_names", ()) or ())
        self.attribute_table = None if attribute_table is None else self._checked_table(attribute_table)
        self.fixed = self._fixed_mask(held_fixed)
        free = dimension - int(self.fixed.sum())
        if not 1 <= top_k <= free:
            raise ValueError(f"top_k must be in 1..{free} (the attributes not held fixed), got {top_k}")
        self.lambda_initial, self.bisection_steps, self.learning_rate = lambda_initial, bisection_steps, learning_rate
        self.steps_per_round = max_iterations  # self.max_iterations is the search's total
        self.confidence_of_criticisms, self.prototype_confidence = confidence, prototype_confidence
        self.top_k, self.attribute_range = top_k, (float(low), float(high))
        self.inversion_steps, self.inversion_learning_rate = inversion_steps, inversion_learning_rate
        self.inversion_restarts, self.seed = inversion_restarts, seed

    def _checked_table(self, table: Tensor) -> Tensor:
        if not isinstance(table, Tensor) or table.ndim != 2 or table.shape[1] != self.dimension:
            shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
            raise ValueError(
                f"attribute_table must be (M, {self.dimension}): the AttGAN's {self.dimension} attributes of every "
                f"sample by dataset index, got {shape}"
            )
        if not (table.is_floating_point() or table.dtype == torch.bool) or not torch.isfinite(table.float()).all():
            raise ValueError(f"attribute_table must hold finite 0/1 attribute values, got dtype {table.dtype}")
        return table.detach().float()

    def _fixed_mask(self, held_fixed: Sequence[str] | Sequence[int]) -> Tensor:
        """``(D,)`` bool: the held-fixed entries, from names (attribute mode) or indices."""
        items = list(held_fixed)
        if all(isinstance(item, str) for item in items):
            if items and self.mode == "latent":
                raise ValueError(f"latent dimensions have no names: hold them fixed by index, got {items}")
            unknown = [name for name in items if name not in self.attribute_names]
            if unknown:
                known = list(self.attribute_names) or "none: give indices"
                raise ValueError(
                    f"held_fixed names {unknown} are not attributes of the AttGAN (its attributes: {known})"
                )
            indices = [self.attribute_names.index(name) for name in items]
        elif all(isinstance(item, int | np.integer) and not isinstance(item, bool) for item in items):
            indices = [int(item) for item in items]
            if any(not 0 <= index < self.dimension for index in indices):
                raise ValueError(f"held_fixed indices must be in 0..{self.dimension - 1}, got {indices}")
        else:
            raise ValueError(f"held_fixed must be attribute names or integer indices (not mixed), got {items}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"held_fixed names an attribute twice: {items}")
        mask = torch.zeros(self.dimension, dtype=torch.bool)
        mask[indices] = True
        return mask

    def detail_fields(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``attributes``, ``attribute_change`` ``(D,)``, ``top_attributes`` ``(top_k,)`` and the lambdas ``()``."""
        vector = (torch.float32, (self.dimension,))
        scalar = (torch.float32, ())
        return {
            "attributes": vector,
            "attribute_change": vector,
            "top_attributes": (torch.int64, (self.top_k,)),
            "lambda": scalar,
            "lambda_lower": scalar,
            "lambda_upper": scalar,
        }

    def auxiliary_modules(self) -> list[nn.Module]:
        """The generator or the AttGAN (kept in eval mode and moved to the queries' device)."""
        return [self.generator if self.mode == "latent" else self.attgan]

    def check_query(
        self,
        images: Tensor,
        targets: Tensor | Sequence[int] | np.ndarray,
        indices: Tensor | Sequence[int] | np.ndarray | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`Explainer.check_query`; also the generative model's image size and the attribute table's indices.

        For prototypes the targets must be the classifier's predictions of the queries.
        """
        images, targets, indices = super().check_query(images, targets, indices)
        model = self.generator if self.mode == "latent" else self.attgan.generator
        channels = model.out_channels if self.mode == "latent" else model.in_channels
        expected = (channels, model.image_size, model.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"the {'generator' if self.mode == 'latent' else 'AttGAN'} makes {'x'.join(map(str, expected))} "
                f"images, got queries of {'x'.join(map(str, images.shape[1:]))}"
            )
        if (
            self.attribute_table is not None
            and len(indices)
            and not 0 <= int(indices.min()) <= int(indices.max()) < len(self.attribute_table)
        ):
            raise ValueError(
                f"indices must be dataset indices 0..{len(self.attribute_table) - 1} of the attribute table, got "
                f"{indices.min().item()}..{indices.max().item()}"
            )
        if self.kind == "prototype" and len(images):
            with evaluation_mode(self.classifier), torch.no_grad():
                predictions = self.classifier(images).argmax(dim=1)
            wrong = torch.nonzero(predictions != targets).squeeze(1)
            if len(wrong):
                raise ValueError(
                    "a prototype's target is the classifier's prediction of its query: queries "
                    f"{wrong.tolist()} have targets {targets[wrong].tolist()}, predicted "
                    f"{predictions[wrong].tolist()}"
                )
        return images, targets, indices

    # -- the search ---------------------------------------------------------------------------------------
    def _generate(self, state: dict[str, Tensor], variables: Tensor) -> Tensor:
        """``G(a)`` of the rows' ``(R, D)`` edit vectors, clamped to [0, 1]."""
        if self.mode == "latent":
            return self.generator(variables).clamp(0, 1)
        features = [state[f"feature{i}"] for i in range(sum(key.startswith("feature") for key in state))]
        return self.attgan.generator.decode(features, variables).clamp(0, 1)

    def _own_attributes(self, queries: Tensor, indices: Tensor) -> Tensor:
        """``(N, A)`` the queries' attributes: the table's rows, or the discriminator's thresholded predictions."""
        if self.attribute_table is not None:
            return self.attribute_table.to(queries.device)[indices]
        if len(queries) == 0:
            return queries.new_zeros(0, self.dimension)
        logits = self.attgan.discriminator(queries)[1]
        return (logits > 0).to(queries.dtype)

    def _invert(self, queries: Tensor, indices: Tensor) -> Tensor:
        """``(R, D)`` latents of the queries: the best of the seeded restarts of L1 inversion, all in one tensor.

        Rows that share a dataset index and an image (one query paired with several targets) are inverted once.
        """
        unique, inverse = torch.unique(indices, return_inverse=True)
        first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(indices), device=indices.device), "amin")
        if len(unique) < len(indices) and torch.equal(queries[first][inverse], queries):
            return self._invert_distinct(queries[first], unique)[inverse]
        return self._invert_distinct(queries, indices)

    def _invert_distinct(self, queries: Tensor, indices: Tensor) -> Tensor:
        """:meth:`_invert` of queries that are all different."""
        restarts = self.inversion_restarts
        latents = nn.Parameter(initial_latents(indices, restarts, self.dimension, self.seed, queries.dtype))
        targets = queries.repeat_interleave(restarts, dim=0)
        optimizer = torch.optim.Adam([latents], lr=self.inversion_learning_rate)
        for _ in range(self.inversion_steps):
            distance = (self._generate({}, latents) - targets).abs().flatten(1).sum(dim=1)
            (latents.grad,) = torch.autograd.grad(distance.sum(), [latents])
            optimizer.step()
        with torch.no_grad():
            distance = (self._generate({}, latents) - targets).abs().flatten(1).sum(dim=1)
        best = distance.view(len(queries), restarts).argmin(dim=1)
        return latents.detach().view(len(queries), restarts, -1)[torch.arange(len(queries)), best]

    def initial_details(self, queries: Tensor, targets: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """A query returned unchanged: its own attributes (NaN latents), no change, top ``-1``, NaN lambdas."""
        count, device = len(queries), queries.device
        if self.mode == "attributes":
            attributes = self._own_attributes(queries, indices).float()
        else:
            attributes = torch.full((count, self.dimension), math.nan, device=device)
        missing = torch.full((count,), math.nan, device=device)
        return {
            "attributes": attributes,
            "attribute_change": torch.zeros(count, self.dimension, device=device),
            "top_attributes": torch.full((count, self.top_k), -1, dtype=torch.long, device=device),
            "lambda": missing,
            "lambda_lower": missing.clone(),
            "lambda_upper": missing.clone(),
        }

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """Per row: the start ``a0``, Adam state, lambda, its bounds, the best valid iterate (none yet).

        ``a0`` is the inversion (latent mode) or the query's own attributes. The gradients of both terms at ``a0``
        are kept for the first step of each later round.
        """
        state, count, device = search.state, len(queries), queries.device
        if self.mode == "attributes":
            with torch.no_grad():
                features = self.attgan.generator.encode(queries)
            state.update({f"feature{i}": feature.detach() for i, feature in enumerate(features)})
            begin = search.details["attributes"].index_select(0, search.rows).to(queries.dtype)
        else:
            begin = self._invert(queries, indices)
        zeros = torch.zeros_like(begin)
        state.update(
            queries=queries,
            begin=begin,
            variables=begin.clone(),
            first_moment=zeros,
            second_moment=zeros.clone(),
            steps=torch.zeros(count, dtype=torch.long, device=device),
            rounds=torch.zeros(count, dtype=torch.long, device=device),
            restart=torch.zeros(count, dtype=torch.bool, device=device),
            weight=torch.full((count,), float(self.lambda_initial), device=device),
            lower=torch.zeros(count, device=device),
            upper=torch.full((count,), UNBOUNDED, device=device),
            best=queries.clone(),
            best_distance=torch.full((count,), math.inf, device=device),
            best_probability=torch.zeros(count, device=device),
            best_variables=begin.clone(),
            best_weight=torch.full((count,), math.nan, device=device),
        )
        start = begin.detach().requires_grad_()
        images = self._generate(state, start)
        cross_entropy = F.cross_entropy(self.classifier(images), search.targets, reduction="none")
        distance = (images - queries).abs().flatten(1).sum(dim=1)
        (state["begin_cross_entropy_gradient"],) = torch.autograd.grad(cross_entropy.sum(), [start], retain_graph=True)
        (state["begin_distance_gradient"],) = torch.autograd.grad(distance.sum(), [start])

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """``G(a)`` of the rows, its logits, its L1 to the query and (unless ``last``) ``lambda * CE + L1``."""
        state = search.state
        variables = state["variables"].detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            images = self._generate(state, variables)
            logits = self.classifier(images)
            distance = (images - state["queries"]).abs().flatten(1).sum(dim=1)
            values = {"distance": distance.detach()}
            if last:
                return Evaluation(images.detach(), logits, values=values)
            loss = state["weight"] * F.cross_entropy(logits, search.targets, reduction="none") + distance
        return Evaluation(images.detach(), logits, loss, (variables,), values)

    def _top_attributes(self, change: Tensor) -> Tensor:
        """``(R, top_k)`` indices of the largest ``|change|``, largest first, ties by index, held-fixed last."""
        scores = change.abs().masked_fill(self.fixed.to(change.device), -1.0)
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.top_k]

    def stopping(
        self,
        search: ActiveSearch,
        iteration: int,
        last: bool,
        evaluation: Evaluation,
        reached: Tensor,
        probability: Tensor,
    ) -> Tensor:
        """Keep each row's closest valid iterate, end rounds (bisection update), finish rows after their last."""
        state, distance, iterates = search.state, evaluation.values["distance"], evaluation.iterates
        better = reached & (distance < state["best_distance"])
        state["best"] = torch.where(_rows(better, iterates), iterates, state["best"])
        state["best_distance"] = torch.where(better, distance, state["best_distance"])
        state["best_probability"] = torch.where(better, probability, state["best_probability"])
        state["best_variables"] = torch.where(better[:, None], state["variables"], state["best_variables"])
        state["best_weight"] = torch.where(better, state["weight"], state["best_weight"])
        round_end = reached | (state["steps"] == self.steps_per_round)
        weight, lower, upper = bisection_step(state["weight"], state["lower"], state["upper"], reached)
        lower, upper = torch.where(round_end, lower, state["lower"]), torch.where(round_end, upper, state["upper"])
        rounds = state["rounds"] + round_end.long()
        no_step = reached if iteration == 0 else torch.zeros_like(reached)  # the start G(a0) is already valid
        done = no_step | (rounds >= self.bisection_steps) | last
        found = torch.isfinite(state["best_distance"])
        variables = torch.where(found[:, None], state["best_variables"], state["variables"])
        change = variables - state["begin"]
        returned_weight = torch.where(found, state["best_weight"], state["weight"])

        def unless_no_step(value: Tensor) -> Tensor:
            return torch.where(no_step, math.nan, value)

        details = {
            "attributes": variables,
            "attribute_change": change,
            "top_attributes": self._top_attributes(change),
            "lambda": unless_no_step(returned_weight),
            "lambda_lower": unless_no_step(lower),
            "lambda_upper": unless_no_step(torch.where(upper >= 1e9, math.inf, upper)),
        }
        search.finish(
            done,
            iteration,
            iterates,
            found,
            torch.where(found, state["best_probability"], probability),
            torch.where(_rows(found, iterates), state["best"], iterates),
            details,
        )
        state.update(weight=torch.where(round_end, weight, state["weight"]), lower=lower, upper=upper, rounds=rounds)
        state["restart"] = round_end
        return done

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """One Adam step on ``a`` (a row whose round ended restarts at ``a0`` with fresh moments); box; fixed."""
        state = search.state
        restart = state["restart"][:, None]
        restart_gradient = state["weight"][:, None] * state["begin_cross_entropy_gradient"]
        restart_gradient = restart_gradient + state["begin_distance_gradient"]
        fixed = self.fixed.to(restart.device)
        gradient = torch.where(restart, restart_gradient, gradients[0]).masked_fill(fixed, 0.0)
        variables = torch.where(restart, state["begin"], state["variables"])
        steps = torch.where(state["restart"], 0, state["steps"]) + 1
        beta1, beta2 = ADAM_BETAS
        first = beta1 * torch.where(restart, 0.0, state["first_moment"]) + (1 - beta1) * gradient
        second = beta2 * torch.where(restart, 0.0, state["second_moment"]) + (1 - beta2) * gradient.square()
        exponent = steps[:, None].to(variables.dtype)
        corrected_first = first / (1 - beta1**exponent)
        corrected_second = second / (1 - beta2**exponent)
        variables = variables - self.learning_rate * corrected_first / (corrected_second.sqrt() + ADAM_EPSILON)
        if self.mode == "attributes":
            variables = variables.clamp(*self.attribute_range)
        state.update(
            variables=torch.where(fixed, state["begin"], variables).detach(),
            first_moment=first.detach(),
            second_moment=second.detach(),
            steps=steps,
            restart=torch.zeros_like(state["restart"]),
        )
