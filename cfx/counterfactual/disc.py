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


class DISC(SearchExplainer):
    """DISC (deep inversion for synthesizing counterfactuals): optimise a per-query image generator.

    Per query, a generator (pixel / deep image prior / implicit neural representation, seeded by the query's
    dataset index) is first fitted to reproduce the query ``x``, then trained on DISC's eq. 5

    ``lambda_1 * semantic + lambda_2 * L_mc + lambda_3 * CE(F(x_bar), y_bar) + prior regulariser``

    with semantic = ``||x_bar - x||^2`` (ISO) or ``sum_l ||Psi_l(x_bar) - Psi_l(x)||^2`` over classifier layers
    (LSO) and ``L_mc`` = ``|G(x_bar) - s*|`` (DEP loss predictor ``G``, eq. 8), the DUQ kernel margin
    ``max(K(x_bar, y) - K(x_bar, y_bar) + 0.5, 0)`` (eq. 9, ``y`` = the query's predicted class) or nothing.
    Progressive optimisation: during stage ``i`` (``steps_per_stage`` iterations each; the last stage runs on
    until ``max_iterations``) only the first ``i + 1`` layer groups of the generator are trained, the others stay
    at their reconstruction state, and ``lambda_1`` is ``lambda_semantic * kappa**i``. Stages beyond the number of
    groups train every group and keep relaxing ``lambda_1`` (so the one-group pixel prior relaxes it too).

    A query stops at the first iterate whose target softmax probability reaches ``confidence`` with the target
    as the predicted class; that first valid iterate is returned (the queries leave the batch there, so it is
    the only valid iterate seen). A query that does not get there within ``max_iterations`` optimisation steps is
    a failure and its last iterate is returned. Queries already predicted as the target with ``confidence`` are
    returned unchanged with 0 iterations (no generator is built for them). All queries are optimised together,
    each with its own generator parameters and a loss that depends on nothing else, so results do not depend on
    the batch.

    The paper gives no weights or step sizes; the defaults are those tuned for the INR prior on 28x28 digits
    (configs/counterfactual/embedded_mnist_binary_lso_inr_dep.yaml). SIREN generators need small steps (Adam's
    first steps move every weight by about ``lr``, amplified by ``omega_0``); DIP and pixel priors need larger ones.

    Args:
        classifier: the classifier ``F`` to explain (put in eval mode during ``explain``; not changed).
        prior: generator kind, ``"inr"``, ``"dip"`` or ``"pixel"`` (TV + l2).
        prior_options: extra keyword arguments of ``make_generator`` (e.g. width, depth, regulariser weights).
        semantic: ``"latent"`` (LSO) or ``"image"`` (ISO).
        semantic_layers: LSO layers, as indices into the classifier's stage maps; ``None`` = penultimate features.
        manifold: ``"none"``, ``"dep"`` or ``"duq"``. ``"dep"`` reads the DEP loss predictor ``G`` from the
            classifier (a :class:`~cfx.nn.LossPredictingClassifier`, what ``cfx.tasks.load_classifier`` gives for a
            DEPTask checkpoint), so ``G`` is always the one trained with the classifier.
        duq_head: DUQ head mapping the classifier's penultimate features to ``(N, K)`` kernel values, for
            ``manifold="duq"``; defaults to the classifier's own head when the classifier is a DUQ model
            (:class:`~cfx.nn.duq.DUQFeatureClassifier`, what ``load_classifier`` gives for a DUQTask checkpoint).
        target_loss: the DEP target loss ``s*``: a number, a low predicted loss (the predictor is trained by ranking,
            so its scale is the checkpoint's: read it off the predictions on real data), or ``"query"``: each
            query's own predicted loss (scale-free: the counterfactual should look as typical as the query).
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
        confidence: target softmax probability a counterfactual must reach.
        max_iterations: optimisation steps before a query counts as a failure.
        bf16: run generator and classifier forward passes under ``torch.autocast`` in bfloat16.
        path_every: record the candidate every this many iterations into ``result.path`` (``None`` = no path).
        seed: the run's seed: query ``i``'s generator is seeded with ``per_sample_seed(indices[i], seed)``.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        prior: Literal["inr", "dip", "pixel"] = "inr",
        prior_options: dict | None = None,
        semantic: Literal["latent", "image"] = "latent",
        semantic_layers: list[int] | None = None,
        manifold: Literal["none", "dep", "duq"] = "none",
        duq_head: nn.Module | None = None,
        target_loss: float | Literal["query"] = 0.0,
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
        bf16: bool = False,
        path_every: int | None = None,
        seed: int = 0,
    ):
        super().__init__(classifier, confidence, max_iterations, path_every)
        for name, value, allowed in (
            ("prior", prior, PRIORS),
            ("semantic", semantic, SEMANTICS),
            ("manifold", manifold, MANIFOLDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        num_stages = len(classifier.stage_channels)
        if semantic_layers is not None:
            if semantic == "image":
                raise ValueError("semantic_layers only applies to semantic='latent'")
            if len(semantic_layers) == 0 or any(not 0 <= layer < num_stages for layer in semantic_layers):
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
        if isinstance(target_loss, str) and target_loss != "query":
            raise ValueError(f"target_loss must be a number or 'query', got {target_loss!r}")
        self.prior, self.prior_options = prior, dict(prior_options or {})
        self.semantic, self.semantic_layers, self.manifold = semantic, semantic_layers, manifold
        self.duq_head = duq_head
        self.target_loss, self.duq_margin = target_loss, duq_margin
        self.lambda_semantic, self.lambda_manifold, self.lambda_class = lambda_semantic, lambda_manifold, lambda_class
        self.lr, self.steps_per_stage, self.stages, self.kappa = lr, steps_per_stage, stages, kappa
        self.reconstruction_steps, self.reconstruction_lr = reconstruction_steps, reconstruction_lr
        self.bf16, self.seed = bf16, seed

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
        elif self.semantic_layers is None:
            representations = [features]
        else:
            representations = [stage_maps[layer] for layer in self.semantic_layers]
        return (
            logits.float(),
            [representation.float() for representation in representations],
            None if manifold is None else manifold.float(),
        )

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
        if self.semantic == "image":
            semantic = image_space_distance(representations[0], query_representations[0])
        else:
            semantic = latent_space_distance(representations, query_representations)
        loss = lambda_semantic * semantic + self.lambda_class * class_consistency(logits, targets)
        if self.manifold == "dep":
            loss = loss + self.lambda_manifold * dep_consistency(manifold_values, target_losses)
        elif self.manifold == "duq":
            loss = loss + self.lambda_manifold * duq_consistency(manifold_values, sources, targets, self.duq_margin)
        return loss

    def auxiliary_modules(self) -> list[nn.Module]:
        """The DUQ head when it is not part of the classifier (moved to the queries' device by ``explain``)."""
        return [self.duq_head] if self.duq_head is not None else []

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """Build and fit the active queries' generators, their Adam optimiser and the queries' own representations."""
        with torch.no_grad():
            _, query_representations, query_manifold = self._forward(queries)
        if self.manifold == "dep" and self.target_loss == "query":
            target_losses = query_manifold
        else:  # a number (unused unless manifold="dep")
            value = 0.0 if self.target_loss == "query" else float(self.target_loss)
            target_losses = torch.full((len(queries),), value, device=queries.device)
        channels, size = queries.shape[1], queries.shape[-1]
        seeds = per_sample_seed(indices, self.seed)
        generator = make_generator(self.prior, len(queries), channels, size, seeds=seeds, **self.prior_options)
        generator = generator.to(queries.device)
        fit_reconstruction(generator, queries, self.reconstruction_steps, self.reconstruction_lr)
        generator.zero_grad(set_to_none=True)  # Adam skips parameters without gradients: the frozen groups
        search.track(generator=generator, optimizer=torch.optim.Adam(generator.parameters(), lr=self.lr))
        search.state.update(
            sources=search.original_prediction.index_select(0, search.rows),
            target_losses=target_losses,
            **{f"representation_{i}": value for i, value in enumerate(query_representations)},
        )

    def _stage(self, generator: BatchedGenerator, iteration: int) -> tuple[int, int, list[nn.Parameter]]:
        """``(stage, trained group count, trained parameters)`` of the progressive stage of ``iteration``."""
        groups = generator.layer_groups()
        num_stages = len(groups) if self.stages is None else self.stages
        stage = min(iteration // self.steps_per_stage, num_stages - 1)
        count = min(stage + 1, len(groups))
        return stage, count, [parameter for group in groups[:count] for parameter in group]

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """The generators' images, their logits and (unless ``last``) eq. 5 plus the prior regulariser."""
        generator = search.tracked["generator"]
        stage, count, trainable = self._stage(generator, iteration)
        generator.set_trainable_groups(0 if last else count)
        with torch.autocast(search.targets.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            candidates = generator()
        candidates = candidates.float()
        logits, representations, manifold_values = self._forward(candidates)
        if last:
            return Evaluation(candidates.detach(), logits)
        state = search.state
        query_representations = [state[f"representation_{i}"] for i in range(len(representations))]
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
        return Evaluation(candidates.detach(), logits, loss, trainable)

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """One Adam step on the parameters of the current stage's layer groups."""
        generator, optimizer = search.tracked["generator"], search.tracked["optimizer"]
        _, _, trainable = self._stage(generator, iteration)
        for parameter, gradient in zip(trainable, gradients, strict=True):
            parameter.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
