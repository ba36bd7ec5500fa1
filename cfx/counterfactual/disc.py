"""DISC: counterfactuals by deep model inversion with a per-query image generator (Thiagarajan et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.counterfactual.iterative import PathRecorder, evaluation_mode, target_reached
from cfx.counterfactual.objectives import (
    class_consistency,
    dep_consistency,
    duq_consistency,
    image_space_distance,
    latent_space_distance,
)
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.duq import DUQFeatureClassifier
from cfx.nn.generators import fit_reconstruction, make_generator, narrow_adam_state, query_seeds
from cfx.nn.loss_predictor import LossPredictor

PRIORS = ("pixel", "dip", "inr")
SEMANTICS = ("latent", "image")
MANIFOLDS = ("none", "dep", "duq")


def load_loss_predictor(checkpoint: str | Path, stage_channels: Sequence[int]) -> LossPredictor:
    """Read the loss predictor of a DEPTask checkpoint (its ``predictor.*`` weights) without Lightning.

    Args:
        checkpoint: a ``.ckpt`` written by ``cfx fit`` with a DEPTask config (only load files you trust).
        stage_channels: the stage channels of the classifier the predictor reads (checked against the weights).

    Returns:
        The predictor in eval mode with gradients of its parameters disabled.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"no DEP checkpoint at {path.resolve()} (train one with `cfx fit -c configs/dep/<config>.yaml`)"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = {
        key.removeprefix("predictor."): value
        for key, value in state.get("state_dict", {}).items()
        if key.startswith("predictor.")
    }
    if "stages.0.weight" not in weights:
        raise ValueError(f"{path} holds no DEP loss predictor (no predictor.* weights; is it a DEPTask checkpoint?)")
    predictor = LossPredictor(stage_channels, hidden=weights["stages.0.weight"].shape[0])
    try:
        predictor.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"the loss predictor in {path} does not read stage maps with channels {tuple(stage_channels)}: {error}"
        ) from error
    predictor.eval().requires_grad_(False)
    return predictor


class DISC(Explainer):
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
    returned unchanged with 0 iterations. All queries are optimised together, each with its own generator
    parameters and a loss that depends on nothing else, so results do not depend on the batch.

    The paper gives no weights or step sizes; the defaults are those tuned for the INR prior on 28x28 digits
    (configs/counterfactual/embedded_mnist_binary_lso_inr_dep.yaml). SIREN generators need small steps (Adam's
    first steps move every weight by about ``lr``, amplified by ``omega_0``); DIP and pixel priors need larger ones.

    Args:
        classifier: the classifier ``F`` to explain (put in eval mode during ``explain``; not changed).
        prior: generator kind, ``"inr"``, ``"dip"`` or ``"pixel"`` (TV + l2).
        prior_options: extra keyword arguments of ``make_generator`` (e.g. width, depth, regulariser weights).
        semantic: ``"latent"`` (LSO) or ``"image"`` (ISO).
        semantic_layers: LSO layers, as indices into the classifier's stage maps; ``None`` = penultimate features.
        manifold: ``"none"``, ``"dep"`` or ``"duq"``.
        loss_predictor: DEP predictor ``G``: a module mapping the classifier's stage maps to ``(N,)`` predicted
            losses, or the path of a DEPTask checkpoint whose predictor is read (the classifier must then be that
            checkpoint's network). Required for ``manifold="dep"``.
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
        seed: offset of the per-query generator seeds (``query_seeds(indices, seed)``), for repeats over seeds.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        prior: Literal["inr", "dip", "pixel"] = "inr",
        prior_options: dict | None = None,
        semantic: Literal["latent", "image"] = "latent",
        semantic_layers: list[int] | None = None,
        manifold: Literal["none", "dep", "duq"] = "none",
        loss_predictor: nn.Module | str | Path | None = None,
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
        super().__init__(classifier)
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
        if manifold == "dep" and loss_predictor is None:
            raise ValueError("manifold='dep' needs a loss_predictor (a module or a DEPTask checkpoint path)")
        if manifold == "duq" and duq_head is None:
            if not isinstance(classifier, DUQFeatureClassifier):
                raise ValueError("manifold='duq' needs a duq_head, or a DUQ model as the classifier")
            duq_head = classifier.head
        if manifold != "dep" and loss_predictor is not None:
            raise ValueError(f"a loss_predictor was given but manifold={manifold!r} (use manifold='dep')")
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
        for name, value in (("steps_per_stage", steps_per_stage), ("max_iterations", max_iterations)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if stages is not None and stages < 1:
            raise ValueError(f"stages must be >= 1 or None, got {stages}")
        if reconstruction_steps < 0:
            raise ValueError(f"reconstruction_steps must be >= 0, got {reconstruction_steps}")
        if not 0 <= confidence < 1:
            raise ValueError(f"confidence must lie in [0, 1), got {confidence}")
        if path_every is not None and path_every < 1:
            raise ValueError(f"path_every must be >= 1 or None, got {path_every}")
        if isinstance(target_loss, str) and target_loss != "query":
            raise ValueError(f"target_loss must be a number or 'query', got {target_loss!r}")
        if isinstance(loss_predictor, str | Path):
            loss_predictor = load_loss_predictor(loss_predictor, classifier.stage_channels)
        self.prior, self.prior_options = prior, dict(prior_options or {})
        self.semantic, self.semantic_layers, self.manifold = semantic, semantic_layers, manifold
        self.loss_predictor, self.duq_head = loss_predictor, duq_head
        self.target_loss, self.duq_margin = target_loss, duq_margin
        self.lambda_semantic, self.lambda_manifold, self.lambda_class = lambda_semantic, lambda_manifold, lambda_class
        self.lr, self.steps_per_stage, self.stages, self.kappa = lr, steps_per_stage, stages, kappa
        self.reconstruction_steps, self.reconstruction_lr = reconstruction_steps, reconstruction_lr
        self.confidence, self.max_iterations = confidence, max_iterations
        self.bf16, self.path_every, self.seed = bf16, path_every, seed

    def _forward(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Classifier pass: ``(logits, semantic representations, manifold values)``, all in float32.

        The manifold values are the predicted losses (DEP), the kernel values (DUQ) or ``None``.
        """
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features, stage_maps = self.classifier.forward_features(images)
            logits = self.classifier.classify(features)
            if self.manifold == "dep":
                manifold = self.loss_predictor(stage_maps)
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

    def explain(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> CounterfactualResult:
        """Find counterfactuals of ``images`` towards ``targets``; see the class docstring.

        Args:
            images: ``(N, C, H, W)`` queries in [0, 1].
            targets: ``(N,)`` target classes.
            indices: ``(N,)`` dataset indices seeding each query's generator (default ``arange(N)``).
        """
        self.check_query(images, targets)
        if indices is None:
            indices = torch.arange(len(images), device=images.device)
        if indices.shape != targets.shape or indices.is_floating_point():
            raise ValueError(f"indices must be {len(images)} integers, got {indices.dtype} {tuple(indices.shape)}")
        for module in (self.loss_predictor, self.duq_head):
            if module is not None:
                module.to(images.device)  # not a submodule of the classifier: follow the queries' device
        modules = [module for module in (self.classifier, self.loss_predictor, self.duq_head) if module is not None]
        with evaluation_mode(*modules):
            return self._explain(images, targets, indices)

    def _explain(self, images: Tensor, targets: Tensor, indices: Tensor) -> CounterfactualResult:
        with torch.no_grad():
            logits, query_representations, query_manifold = self._forward(images)
        if self.manifold == "dep" and self.target_loss == "query":
            target_losses = query_manifold
        else:  # a number (unused unless manifold="dep")
            value = 0.0 if self.target_loss == "query" else float(self.target_loss)
            target_losses = torch.full((len(images),), value, device=images.device)
        original_prediction = logits.argmax(dim=1)
        done, target_probability = target_reached(logits, targets, self.confidence)
        counterfactuals = images.clone()
        success = done.clone()
        iterations = torch.zeros(len(images), dtype=torch.int64, device=images.device)
        recorder = PathRecorder(images, self.path_every, self.max_iterations)
        active = (~done).nonzero().squeeze(1)
        if len(active) > 0:
            with torch.enable_grad():
                self._optimise(
                    images,
                    targets,
                    indices,
                    active,
                    original_prediction,
                    target_losses,
                    [representation.detach() for representation in query_representations],
                    (counterfactuals, success, target_probability, iterations, recorder),
                )
        return CounterfactualResult(
            counterfactuals=counterfactuals,
            success=success,
            target_probability=target_probability,
            original_prediction=original_prediction,
            iterations=iterations,
            path=recorder.finish(counterfactuals, iterations),
        )

    def _optimise(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Tensor,
        active: Tensor,
        original_prediction: Tensor,
        target_losses: Tensor,
        query_representations: list[Tensor],
        outputs: tuple[Tensor, Tensor, Tensor, Tensor, PathRecorder],
    ) -> None:
        """Run the progressive optimisation of the ``active`` queries, writing into ``outputs`` in place."""
        counterfactuals, success, target_probability, iterations, recorder = outputs
        channels, size = images.shape[1], images.shape[-1]
        generator = make_generator(
            self.prior, len(active), channels, size, seeds=query_seeds(indices[active], self.seed), **self.prior_options
        ).to(images.device)
        fit_reconstruction(generator, images[active], self.reconstruction_steps, self.reconstruction_lr)
        groups = generator.layer_groups()
        num_stages = len(groups) if self.stages is None else self.stages
        trained_groups = [min(stage + 1, len(groups)) for stage in range(num_stages)]
        stage_parameters = [[p for group in groups[:count] for p in group] for count in trained_groups]
        generator.zero_grad(set_to_none=True)  # Adam skips parameters without gradients: the frozen groups
        optimizer = torch.optim.Adam(stage_parameters[-1], lr=self.lr)
        sources, goals, target_losses = original_prediction[active], targets[active], target_losses[active]
        query_representations = [representation[active] for representation in query_representations]
        for step in range(self.max_iterations + 1):
            stage = min(step // self.steps_per_stage, num_stages - 1)
            generator.set_trainable_groups(trained_groups[stage])
            last = step == self.max_iterations
            candidates, reached, probability = self._step(
                generator,
                optimizer,
                stage_parameters[stage],
                query_representations,
                sources,
                goals,
                target_losses,
                self.lambda_semantic * self.kappa**stage,
                last,
            )
            recorder.record(step, active, candidates)
            finished = reached | last
            if not finished.any():
                continue
            leaving = active[finished]
            counterfactuals[leaving] = candidates[finished]
            success[leaving] = reached[finished]
            target_probability[leaving] = probability[finished]
            iterations[leaving] = step
            if finished.all():
                break
            keep = ~finished
            generator.select(keep)
            narrow_adam_state(optimizer, generator, keep)
            active, sources, goals, target_losses = active[keep], sources[keep], goals[keep], target_losses[keep]
            query_representations = [representation[keep] for representation in query_representations]

    def _step(
        self,
        generator: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainable: list[nn.Parameter],
        query_representations: list[Tensor],
        sources: Tensor,
        goals: Tensor,
        target_losses: Tensor,
        lambda_semantic: float,
        last: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluate the candidates and, unless ``last``, take one Adam step for the queries not yet valid.

        Every tensor of the autograd graph is local to this method, so the graph is released before
        ``generator.select`` reshapes the parameters.

        Returns:
            Detached ``(candidates, reached, target probability)`` of the iterate before the step.
        """
        with torch.autocast(goals.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            candidates = generator()
        candidates = candidates.float()
        logits, representations, manifold_values = self._forward(candidates)
        reached, probability = target_reached(logits, goals, self.confidence)
        pending = ~reached
        if not last and pending.any():
            loss = self.objective(
                logits,
                representations,
                manifold_values,
                query_representations,
                sources,
                goals,
                lambda_semantic,
                target_losses,
            ) + generator.regularizer(candidates)
            gradients = torch.autograd.grad(loss[pending].sum(), trainable, allow_unused=True)
            for parameter, gradient in zip(trainable, gradients, strict=True):
                parameter.grad = gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return candidates.detach(), reached, probability
