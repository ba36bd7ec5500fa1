"""DISC: counterfactuals by deep model inversion with a per-query image generator (Thiagarajan et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from cfx.counterfactual.objectives import (
    class_consistency,
    dep_consistency,
    duq_consistency,
    image_space_distance,
    latent_space_distance,
)
from cfx.counterfactual.search import ActiveSearch, Evaluation, SearchExplainer
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.duq import DUQFeatureClassifier
from cfx.nn.generators import BatchedGenerator, fit_reconstruction, make_generator
from cfx.seeding import per_sample_seed

PRIORS = ("pixel", "dip", "inr")
SEMANTICS = ("latent", "image")
MANIFOLDS = ("none", "dep", "duq")
MANIFOLD_FORMS = ("absolute", "hinge")
STOPS = ("first_valid", "schedule")
BEST_BY = ("semantic", "l1", "latest")


class DISC(SearchExplainer):
    """DISC (deep inversion for synthesizing counterfactuals): optimise a per-query image generator.

    Per query, a generator (pixel / deep image prior / implicit neural representation, seeded by the query's
    dataset index) is first fitted to reproduce the query ``x`` (its output then is the *start*, the
    reconstruction), then trained on DISC's eq. 5

    ``lambda_1 * semantic + lambda_2 * L_mc + lambda_3 * CE(F(x_bar), y_bar) + prior regulariser``

    with semantic = ``||x_bar - x||^2`` (ISO) or ``sum_l mean ||Psi_l(x_bar) - Psi_l(x)||^2`` over classifier
    layers (LSO; by default every stage map, each layer's squared distance averaged over its entries so that maps
    of different sizes weigh alike: :func:`~cfx.counterfactual.objectives.latent_space_distance`) and ``L_mc`` =
    ``|G(x_bar) - s*|`` (DEP loss predictor ``G``, eq. 8) or its one-sided form ``max(0, G(x_bar) - s*)``, the DUQ
    kernel margin ``max(K(x_bar, y) - K(x_bar, y_bar) + 0.5, 0)`` (eq. 9, ``y`` = the query's predicted class) or
    nothing. Progressive optimisation: during stage ``i`` (``steps_per_stage`` iterations each) only the first
    ``i + 1`` layer groups of the generator are trained, the others stay at their reconstruction state, and
    ``lambda_1`` is ``lambda_semantic * kappa**i``. Stages beyond the number of groups train every group and keep
    relaxing ``lambda_1`` (so the one-group pixel prior relaxes it too).

    Stopping (``stop``; the paper does not say when its schedule stops nor which iterate it returns):

    - ``"first_valid"``: a query stops at its first iterate whose target softmax probability reaches
      ``confidence`` with the target as the predicted class, and that iterate is returned. The last stage runs on
      until ``max_iterations``; a query that gets nowhere by then is a failure and its last iterate is returned.
    - ``"schedule"``: the progressive schedule runs to its end, ``stages * steps_per_stage`` steps (at most
      ``max_iterations``), or until an iterate reaches ``stop_confidence`` (``None``: no early stop). Every
      iterate that reaches ``confidence`` is *valid*; the result is the valid iterate with the smallest
      ``best_by`` criterion (``"semantic"``: the unweighted semantic term, the ``d(x_bar, x)`` of the paper's
      eq. 1; ``"l1"``: ``sum |x_bar - x|`` in pixels; ``"latest"``: the last valid iterate, i.e. the schedule's
      end result; ties go to the earlier iterate), a failure when no iterate was valid (its last iterate
      returned). ``iterations`` counts every step taken; ``details["counterfactual_iteration"]`` says which
      iterate was returned.

    Details (:attr:`CounterfactualResult.details`, :meth:`detail_fields`), per query: ``stage`` ``()`` int64,
    the progressive stage of the last step the query took (``-1``: returned unchanged, no step);
    ``counterfactual_iteration`` ``()`` int64, the steps behind the returned image; ``l1_from_start`` and
    ``l2_from_start`` ``()`` float32, ``sum |x_bar - r|`` and ``||x_bar - r||_2`` between the returned image and
    the start ``r`` (the generator's reconstruction of the query before the optimisation: the share of the
    change to the query that is reconstruction residual is the distance to the query minus this; NaN for a query
    returned unchanged, which has no start).

    Queries already predicted as the target with ``confidence`` are returned unchanged with 0 iterations (no
    generator is built for them). All queries are optimised together, each with its own generator parameters and
    a loss that depends on nothing else, so results do not depend on the batch.

    The paper gives no weights or step sizes; the defaults are those tuned for the INR prior on 28x28 digits
    (configs/counterfactual/embedded_mnist_binary_lso_inr_dep.yaml). SIREN generators need small steps (Adam's
    first steps move every weight by about ``lr``, amplified by ``omega_0``); DIP and pixel priors need larger ones.

    Args:
        classifier: the classifier ``F`` to explain (put in eval mode during ``explain``; not changed).
        prior: generator kind, ``"inr"``, ``"dip"`` or ``"pixel"`` (TV + l2).
        prior_options: extra keyword arguments of ``make_generator`` (e.g. width, depth, regulariser weights).
        semantic: ``"latent"`` (LSO) or ``"image"`` (ISO).
        semantic_layers: LSO layers: ``None`` or ``"all"`` = every stage map of the classifier, a list of
            stage-map indices, or ``"features"`` = the pooled penultimate features alone (which the logits are
            linear in, so this term fights the class term directly).
        manifold: ``"none"``, ``"dep"`` or ``"duq"``. ``"dep"`` reads the DEP loss predictor ``G`` from the
            classifier (a :class:`~cfx.nn.LossPredictingClassifier`, what ``cfx.tasks.load_classifier`` gives for a
            DEPTask checkpoint), so ``G`` is always the one trained with the classifier.
        manifold_form: DEP's ``L_mc``: ``"absolute"`` ``|G(x_bar) - s*|`` (eq. 8) or ``"hinge"``
            ``max(0, G(x_bar) - s*)``, which leaves a candidate already below ``s*`` alone.
        duq_head: DUQ head mapping the classifier's penultimate features to ``(N, K)`` kernel values, for
            ``manifold="duq"``; defaults to the classifier's own head when the classifier is a DUQ model
            (:class:`~cfx.nn.duq.DUQFeatureClassifier`, what ``load_classifier`` gives for a DUQTask checkpoint).
        target_loss: the DEP target loss ``s*``: a number (the predictor is trained by ranking, so its scale is
            the checkpoint's), a ``(K,)`` tensor indexed by each query's target class (e.g.
            ``cfx.tasks.dep.target_loss_quantiles``), ``"query"`` (each query's own predicted loss) or
            ``"quantile"``: the ``target_loss_quantile`` quantile of the predictor's values on the real training
            images of the target class, which the CounterfactualTask computes and hands in (a DISC built with
            ``"quantile"`` cannot explain on its own).
        target_loss_quantile: the quantile of ``target_loss="quantile"``, in [0, 1].
        duq_margin: the margin ``tau`` of eq. 9.
        lambda_semantic: ``lambda_1`` at the first stage.
        lambda_manifold: ``lambda_2``.
        lambda_class: ``lambda_3``.
        lr: Adam learning rate of the counterfactual optimisation.
        steps_per_stage: iterations per progressive stage.
        stages: number of progressive stages (``None`` = one per generator layer group; more stages than groups
            train all groups).
        kappa: factor applied to ``lambda_1`` at each new stage (< 1 relaxes the semantic penalty).
        reconstruction_steps: Adam steps fitting each generator to its query before the optimisation.
        reconstruction_lr: learning rate of that fit.
        confidence: target softmax probability a valid counterfactual must reach.
        max_iterations: optimisation steps after which a query stops (``"first_valid"``: a failure unless valid;
            ``"schedule"``: a cap on the schedule's length).
        stop: ``"first_valid"`` or ``"schedule"`` (see above).
        stop_confidence: with ``stop="schedule"``, the target probability at which a query stops early (at least
            ``confidence``; ``None`` = run the whole schedule).
        best_by: with ``stop="schedule"``, the criterion choosing the returned valid iterate: ``"semantic"``,
            ``"l1"`` or ``"latest"``.
        bf16: run generator and classifier forward passes under ``torch.autocast`` in bfloat16.
        path_every: record the candidate every this many iterations into ``result.path`` (``None`` = no path).
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).
        seed: the run's seed: query ``i``'s generator is seeded with ``per_sample_seed(indices[i], seed)``.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        prior: Literal["inr", "dip", "pixel"] = "inr",
        prior_options: dict | None = None,
        semantic: Literal["latent", "image"] = "latent",
        semantic_layers: list[int] | Literal["all", "features"] | None = None,
        manifold: Literal["none", "dep", "duq"] = "none",
        manifold_form: Literal["absolute", "hinge"] = "absolute",
        duq_head: nn.Module | None = None,
        target_loss: float | Literal["query", "quantile"] | Tensor = 0.0,
        target_loss_quantile: float = 0.5,
        duq_margin: float = 0.5,
        lambda_semantic: float = 0.1,
        lambda_manifold: float = 0.3,
        lambda_class: float = 3.0,
        lr: float = 2e-5,
        steps_per_stage: int = 100,
        stages: int | None = None,
        kappa: float = 0.5,
        reconstruction_steps: int = 200,
        reconstruction_lr: float = 1e-3,
        confidence: float = 0.5,
        max_iterations: int = 400,
        stop: Literal["first_valid", "schedule"] = "first_valid",
        stop_confidence: float | None = 0.99,
        best_by: Literal["semantic", "l1", "latest"] = "semantic",
        bf16: bool = False,
        path_every: int | None = None,
        stop_check_every: int = 1,
        seed: int = 0,
    ):
        super().__init__(classifier, confidence, max_iterations, path_every, stop_check_every=stop_check_every)
        for name, value, allowed in (
            ("prior", prior, PRIORS),
            ("semantic", semantic, SEMANTICS),
            ("manifold", manifold, MANIFOLDS),
            ("manifold_form", manifold_form, MANIFOLD_FORMS),
            ("stop", stop, STOPS),
            ("best_by", best_by, BEST_BY),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        num_stages = len(classifier.stage_channels)
        if semantic == "image" and semantic_layers not in (None, "all"):
            raise ValueError(f"semantic_layers only applies to semantic='latent', got {semantic_layers!r}")
        if isinstance(semantic_layers, str):
            if semantic_layers not in ("all", "features"):
                raise ValueError(f"semantic_layers must be None, 'all', 'features' or a list, got {semantic_layers!r}")
        elif semantic_layers is not None and (
            len(semantic_layers) == 0
            or any(isinstance(layer, bool) or not isinstance(layer, int) for layer in semantic_layers)
            or any(not 0 <= layer < num_stages for layer in semantic_layers)
        ):
            raise ValueError(
                f"semantic_layers must be a non-empty list of stage-map indices 0..{num_stages - 1}, "
                f"got {semantic_layers}"
            )
        if manifold == "dep" and not isinstance(getattr(classifier, "loss_predictor", None), nn.Module):
            raise ValueError(
                "manifold='dep' reads the DEP loss predictor from the classifier, but this "
                f"{type(classifier).__name__} has no loss_predictor: load a DEPTask checkpoint with "
                "cfx.tasks.load_classifier(<dep checkpoint>), or wrap the network and its predictor with "
                "cfx.nn.LossPredictingClassifier(network, predictor)"
            )
        if manifold == "duq" and duq_head is None:
            if not isinstance(classifier, DUQFeatureClassifier):
                raise ValueError("manifold='duq' needs a duq_head, or a DUQ model as the classifier")
            duq_head = classifier.head
        if manifold != "duq" and duq_head is not None:
            raise ValueError(f"a duq_head was given but manifold={manifold!r} (use manifold='duq')")
        for name, value in (
            ("lambda_semantic", lambda_semantic),
            ("lambda_manifold", lambda_manifold),
            ("lambda_class", lambda_class),
            ("duq_margin", duq_margin),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("lr", lr), ("kappa", kappa), ("reconstruction_lr", reconstruction_lr)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be >= 1, got {steps_per_stage}")
        if stages is not None and stages < 1:
            raise ValueError(f"stages must be >= 1 or None, got {stages}")
        if reconstruction_steps < 0:
            raise ValueError(f"reconstruction_steps must be >= 0, got {reconstruction_steps}")
        if stop == "schedule" and stop_confidence is not None and not confidence <= stop_confidence <= 1:
            raise ValueError(
                f"stop_confidence must be None or lie in [confidence, 1] = [{confidence}, 1], got {stop_confidence}"
            )
        if not 0 <= target_loss_quantile <= 1:
            raise ValueError(f"target_loss_quantile must lie in [0, 1], got {target_loss_quantile}")
        self.target_loss = self._checked_target_loss(target_loss, classifier.num_classes)
        self.prior, self.prior_options = prior, dict(prior_options or {})
        self.semantic, self.semantic_layers, self.manifold = semantic, semantic_layers, manifold
        self.manifold_form, self.duq_head = manifold_form, duq_head
        self.target_loss_quantile, self.duq_margin = target_loss_quantile, duq_margin
        self.lambda_semantic, self.lambda_manifold, self.lambda_class = lambda_semantic, lambda_manifold, lambda_class
        self.lr, self.steps_per_stage, self.stages, self.kappa = lr, steps_per_stage, stages, kappa
        self.reconstruction_steps, self.reconstruction_lr = reconstruction_steps, reconstruction_lr
        self.stop, self.stop_confidence, self.best_by = stop, stop_confidence, best_by
        self.bf16, self.seed = bf16, seed

    @staticmethod
    def _checked_target_loss(
        target_loss: float | str | Tensor, num_classes: int
    ) -> float | Literal["query", "quantile"] | Tensor:
        """``target_loss`` validated: a number, ``"query"``, ``"quantile"`` or a finite ``(K,)`` float32 copy."""
        if isinstance(target_loss, str):
            if target_loss not in ("query", "quantile"):
                raise ValueError(f"target_loss must be a number, 'query', 'quantile' or a tensor, got {target_loss!r}")
            return target_loss
        if isinstance(target_loss, Tensor):
            if (
                target_loss.shape != (num_classes,)
                or not target_loss.is_floating_point()
                or not torch.isfinite(target_loss).all()
            ):
                raise ValueError(
                    f"a target_loss tensor must hold {num_classes} finite floats (one s* per class), got "
                    f"{target_loss.dtype} {tuple(target_loss.shape)}"
                )
            return target_loss.detach().to(device="cpu", dtype=torch.float32).clone()
        if isinstance(target_loss, bool) or not isinstance(target_loss, int | float):
            raise ValueError(f"target_loss must be a number, 'query', 'quantile' or a tensor, got {target_loss!r}")
        return float(target_loss)

    def detail_fields(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``stage`` and ``counterfactual_iteration`` (int64), ``l1_from_start`` and ``l2_from_start`` (float32)."""
        return {
            "stage": (torch.int64, ()),
            "counterfactual_iteration": (torch.int64, ()),
            "l1_from_start": (torch.float32, ()),
            "l2_from_start": (torch.float32, ()),
        }

    def initial_details(self, queries: Tensor, targets: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """A query returned unchanged: stage ``-1``, iteration 0, no start (NaN distances)."""
        count, device = len(queries), queries.device
        missing = torch.full((count,), float("nan"), device=device)
        return {
            "stage": torch.full((count,), -1, dtype=torch.long, device=device),
            "counterfactual_iteration": torch.zeros(count, dtype=torch.long, device=device),
            "l1_from_start": missing,
            "l2_from_start": missing.clone(),
        }

    def _forward(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Classifier pass: ``(logits, semantic representations, manifold values)``, all in float32.

        The manifold values are the predicted losses (DEP), the kernel values (DUQ) or ``None``. Image-space DISC
        without manifold term needs only the logits, so it explains any classifier (features are not read).
        """
        if self.semantic == "image" and self.manifold == "none":
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.classifier(images)
            return logits.float(), [images.float()], None
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features, stage_maps = self.classifier.forward_features(images)
            logits = self.classifier.classify(features)
            if self.manifold == "dep":
                manifold = self.classifier.loss_predictor(stage_maps)
            elif self.manifold == "duq":
                manifold = self.duq_head(features)
            else:
                manifold = None
        if self.semantic == "image":
            representations = [images]
        elif self.semantic_layers == "features":
            representations = [features]
        elif self.semantic_layers is None or self.semantic_layers == "all":
            representations = list(stage_maps)
        else:
            representations = [stage_maps[layer] for layer in self.semantic_layers]
        return (
            logits.float(),
            [representation.float() for representation in representations],
            None if manifold is None else manifold.float(),
        )

    def semantic_distance(self, representations: Sequence[Tensor], query_representations: Sequence[Tensor]) -> Tensor:
        """The ``(Q,)`` unweighted semantic term: ISO's squared image distance or LSO's layer sum."""
        if self.semantic == "image":
            return image_space_distance(representations[0], query_representations[0])
        return latent_space_distance(representations, query_representations)

    def objective(
        self,
        logits: Tensor,
        representations: Sequence[Tensor],
        manifold_values: Tensor | None,
        query_representations: Sequence[Tensor],
        sources: Tensor,
        targets: Tensor,
        lambda_semantic: float,
        target_losses: Tensor | float,
    ) -> Tensor:
        """DISC eq. 5 without the prior regulariser, per query.

        Args:
            logits: ``(Q, K)`` classifier logits of the candidates.
            representations: the semantic representations of the candidates (see :meth:`_forward`).
            manifold_values: DEP predicted losses ``(Q,)``, DUQ kernel values ``(Q, K)`` or ``None``.
            query_representations: the same representations of the queries.
            sources: ``(Q,)`` classes predicted for the queries (DUQ's ``y``).
            targets: ``(Q,)`` target classes.
            lambda_semantic: the current ``lambda_1``.
            target_losses: the DEP target loss ``s*`` (a number or one per query).

        Returns:
            ``(Q,)`` losses.
        """
        semantic = self.semantic_distance(representations, query_representations)
        loss = lambda_semantic * semantic + self.lambda_class * class_consistency(logits, targets)
        if self.manifold == "dep":
            manifold = dep_consistency(manifold_values, target_losses, self.manifold_form)
            loss = loss + self.lambda_manifold * manifold
        elif self.manifold == "duq":
            loss = loss + self.lambda_manifold * duq_consistency(manifold_values, sources, targets, self.duq_margin)
        return loss

    def auxiliary_modules(self) -> list[nn.Module]:
        """The DUQ head when it is not part of the classifier (moved to the queries' device by ``explain``)."""
        return [self.duq_head] if self.duq_head is not None else []

    def _target_losses(self, targets: Tensor, query_manifold: Tensor | None) -> Tensor:
        """The ``(R,)`` DEP target losses ``s*`` of the active rows (zeros, unused, without the DEP term)."""
        if self.manifold != "dep":
            return torch.zeros(len(targets), device=targets.device)
        if isinstance(self.target_loss, Tensor):
            return self.target_loss.to(targets.device).index_select(0, targets)
        if self.target_loss == "query":
            return query_manifold
        if self.target_loss == "quantile":
            raise ValueError(
                "target_loss='quantile' is filled in by the CounterfactualTask (the target_loss_quantile quantile of "
                "the DEP predictor on the training images of each class); outside a task pass the (K,) tensor "
                "cfx.tasks.dep.target_loss_quantiles(classifier, loader, quantile, num_classes) as target_loss"
            )
        return torch.full((len(targets),), self.target_loss, device=targets.device)

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """Build and fit the active queries' generators, their Adam optimiser and the queries' own representations."""
        with torch.no_grad():
            _, query_representations, query_manifold = self._forward(queries)
        target_losses = self._target_losses(search.targets, query_manifold)
        channels, size = queries.shape[1], queries.shape[-1]
        seeds = per_sample_seed(indices, self.seed)
        generator = make_generator(self.prior, len(queries), channels, size, seeds=seeds, **self.prior_options)
        generator = generator.to(queries.device)
        fit_reconstruction(generator, queries, self.reconstruction_steps, self.reconstruction_lr)
        generator.zero_grad(set_to_none=True)  # Adam skips parameters without gradients: the frozen groups
        with torch.no_grad(), torch.autocast(queries.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            start_images = generator()
        search.track(generator=generator, optimizer=torch.optim.Adam(generator.parameters(), lr=self.lr))
        state = dict(
            sources=search.original_prediction.index_select(0, search.rows),
            target_losses=target_losses,
            queries=queries,
            start_images=start_images.float(),
        )
        if self.stop == "schedule":
            state.update(
                best_found=torch.zeros(len(queries), dtype=torch.bool, device=queries.device),
                best_score=torch.full((len(queries),), float("inf"), device=queries.device),
                best_image=queries.clone(),
                best_probability=torch.zeros(len(queries), device=queries.device),
                best_iteration=torch.zeros(len(queries), dtype=torch.long, device=queries.device),
            )
        search.state.update(state, **{f"representation_{i}": value for i, value in enumerate(query_representations)})

    def _num_stages(self, generator: BatchedGenerator) -> int:
        return len(generator.layer_groups()) if self.stages is None else self.stages

    def _stage(self, generator: BatchedGenerator, iteration: int) -> tuple[int, int, list[nn.Parameter]]:
        """``(stage, trained group count, trained parameters)`` of the progressive stage of ``iteration``."""
        groups = generator.layer_groups()
        stage = min(iteration // self.steps_per_stage, self._num_stages(generator) - 1)
        count = min(stage + 1, len(groups))
        return stage, count, [parameter for group in groups[:count] for parameter in group]

    def _ends(self, generator: BatchedGenerator, iteration: int, last: bool) -> bool:
        """Whether the search ends after ``iteration`` steps: ``max_iterations``, or the schedule's end."""
        schedule_end = self._num_stages(generator) * self.steps_per_stage
        return last or (self.stop == "schedule" and iteration >= schedule_end)

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """The generators' images, their logits, the criterion values and (unless the end) eq. 5 plus the prior."""
        generator = search.tracked["generator"]
        stage, count, trainable = self._stage(generator, iteration)
        ends = self._ends(generator, iteration, last)
        generator.set_trainable_groups(0 if ends else count)
        with torch.autocast(search.targets.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            candidates = generator()
        candidates = candidates.float()
        logits, representations, manifold_values = self._forward(candidates)
        state = search.state
        query_representations = [state[f"representation_{i}"] for i in range(len(representations))]
        values = {}
        if self.stop == "schedule":
            with torch.no_grad():
                if self.best_by == "semantic":
                    score = self.semantic_distance(representations, query_representations)
                elif self.best_by == "l1":
                    score = (candidates - state["queries"]).abs().flatten(1).sum(dim=1)
                else:  # latest
                    score = torch.full((len(candidates),), -float(iteration), device=candidates.device)
            values["score"] = score.detach()
        if ends:
            return Evaluation(candidates.detach(), logits, values=values)
        loss = self.objective(
            logits,
            representations,
            manifold_values,
            query_representations,
            state["sources"],
            search.targets,
            self.lambda_semantic * self.kappa**stage,
            state["target_losses"],
        ) + generator.regularizer(candidates)
        return Evaluation(candidates.detach(), logits, loss, trainable, values)

    def stopping(
        self,
        search: ActiveSearch,
        iteration: int,
        last: bool,
        evaluation: Evaluation,
        reached: Tensor,
        probability: Tensor,
    ) -> Tensor:
        """Finish the rows that stop after ``iteration`` steps (see the class docstring) with their details."""
        state, iterates = search.state, evaluation.iterates
        generator = search.tracked["generator"]
        ends = self._ends(generator, iteration, last)
        rows = len(iterates)
        if self.stop == "first_valid":
            done = reached | ends
            success, returned, returned_probability = reached, iterates, probability
            returned_iteration = torch.full((rows,), iteration, dtype=torch.long, device=iterates.device)
        else:
            better = reached & (evaluation.values["score"] < state["best_score"])
            state["best_found"] = state["best_found"] | reached
            state["best_score"] = torch.where(better, evaluation.values["score"], state["best_score"])
            state["best_image"] = torch.where(better[:, None, None, None], iterates, state["best_image"])
            state["best_probability"] = torch.where(better, probability, state["best_probability"])
            state["best_iteration"] = torch.where(better, iteration, state["best_iteration"])
            done = torch.full_like(reached, ends)
            if self.stop_confidence is not None:
                done = done | (reached & (probability >= self.stop_confidence))
            success = state["best_found"]
            returned = torch.where(success[:, None, None, None], state["best_image"], iterates)
            returned_probability = torch.where(success, state["best_probability"], probability)
            returned_iteration = torch.where(success, state["best_iteration"], iteration)
        step_stage, _, _ = self._stage(generator, max(iteration - 1, 0))
        change = (returned - state["start_images"]).flatten(1)
        details = {
            "stage": torch.full((rows,), step_stage, dtype=torch.long, device=iterates.device),
            "counterfactual_iteration": returned_iteration,
            "l1_from_start": change.abs().sum(dim=1),
            "l2_from_start": change.square().sum(dim=1).sqrt(),
        }
        search.finish(
            done, iteration, iterates, success, returned_probability, counterfactuals=returned, details=details
        )
        return done

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """One Adam step on the parameters of the current stage's layer groups."""
        generator, optimizer = search.tracked["generator"], search.tracked["optimizer"]
        _, _, trainable = self._stage(generator, iteration)
        for parameter, gradient in zip(trainable, gradients, strict=True):
            parameter.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
