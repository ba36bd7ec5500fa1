"""VLK: counterfactuals guided by prototypes (Van Looveren & Klaise), batched, as DeDUCE's baseline.

The method of alibi's ``CounterfactualProto`` with an encoder (TensorFlow, one query per call there): FISTA on
the perturbed image with an L1 shrinkage step, an autoencoder reconstruction term, a term pulling the encoding
towards a prototype of the target class, and a bisection on the weight ``c`` of the prediction term. Here every
query of a batch is searched at once and all per-query quantities (``c``, its bounds, the best counterfactual and
its distance) are tensors.

Prototypes follow alibi's rule with ``k`` given (DeDUCE uses ``k = 5``): the prototype of class ``t`` for a query
``x`` is the mean of the ``k`` training encodings of class ``t`` nearest (Euclidean) to ``ENC(x)``, the training
data being grouped by the classifier's prediction. That needs the grouped training encodings, which
:class:`ClassEncodings` holds (fitted once and saved by ``cfx.tasks.prototypes``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cfx.counterfactual.revise import check_image_model, check_images_fit
from cfx.counterfactual.search import (
    UNBOUNDED,
    ActiveSearch,
    Evaluation,
    SearchExplainer,
    bisection_step,
    target_reached,
)
from cfx.io import atomic_torch_save
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.evaluation import evaluation_mode

FILE_FORMAT = "cfx.class_encodings.v1"


def class_prototypes(codes: Tensor, targets: Tensor, encodings: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per query, the mean of the ``k`` encodings of its target class nearest to its own encoding.

    alibi's rule (``CounterfactualProto``, ``k`` given, ``k_type="mean"``): distances are Euclidean in the
    (flattened) code space; a class with fewer than ``k`` encodings contributes all of them. Vectorised over the
    queries; each row's distances are computed on their own (no matrix-product shortcut), so a query's prototype
    does not depend on the batch.

    Args:
        codes: ``(N, D)`` the queries' encodings.
        targets: ``(N,)`` their target classes.
        encodings: ``(M, D)`` the training encodings.
        labels: ``(M,)`` the class of each training encoding (the classifier's prediction).
        k: how many nearest encodings to average.

    Returns:
        ``(N, D)`` the prototypes.

    Raises:
        ValueError: ``k < 1``, or a target class has no encodings.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    classes = targets.unique()
    counts = torch.bincount(labels, minlength=int(classes.max()) + 1 if len(classes) > 0 else 0)
    empty = classes[counts[classes] == 0]
    if len(empty) > 0:
        raise ValueError(f"no training encodings of target class(es) {empty.tolist()}: no prototype for them")
    distances = torch.cdist(codes[None], encodings[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    distances = distances.masked_fill(labels[None, :] != targets[:, None], math.inf)
    nearest = distances.topk(min(k, len(encodings)), dim=1, largest=False, sorted=True)
    chosen = torch.isfinite(nearest.values).to(encodings.dtype)
    total = (encodings[nearest.indices] * chosen[..., None]).sum(dim=1)
    return total / chosen.sum(dim=1, keepdim=True)


class ClassEncodings(nn.Module):
    """Training encodings grouped by the classifier's predicted class: where VLK's prototypes come from.

    Args:
        encodings: ``(M, D)`` the autoencoder's encodings of the training images.
        labels: ``(M,)`` the classifier's prediction for each image.
        num_classes: the classifier's number of classes.
        sources: where the encodings come from (e.g. ``{"classifier": {"path", "sha256"}, "autoencoder":
            {...}}``), stored in the file as they are.

    Raises:
        ValueError: the shapes or labels do not fit together.
    """

    def __init__(self, encodings: Tensor, labels: Tensor, num_classes: int, sources: dict | None = None):
        super().__init__()
        if not isinstance(encodings, Tensor) or encodings.ndim != 2 or not encodings.is_floating_point():
            raise ValueError(f"encodings must be a (M, D) float tensor, got {_shape_of(encodings)}")
        if (
            not isinstance(labels, Tensor)
            or labels.shape != (len(encodings),)
            or labels.is_floating_point()
            or labels.dtype == torch.bool
        ):
            raise ValueError(
                f"labels must be ({len(encodings)},) integer classes, one per encoding, got {_shape_of(labels)}"
            )
        if num_classes < 1 or (len(labels) > 0 and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
            raise ValueError(f"labels must be classes 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.sources = dict(sources or {})
        self.register_buffer("encodings", encodings.detach().float())
        self.register_buffer("labels", labels.detach().long())

    @property
    def latent_dim(self) -> int:
        """``D``, the size of an encoding."""
        return self.encodings.shape[1]

    def class_counts(self) -> Tensor:
        """``(num_classes,)`` how many encodings each class has."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def prototypes(self, codes: Tensor, targets: Tensor, k: int) -> Tensor:
        """``(N, D)`` each query's prototype of its target class (:func:`class_prototypes`)."""
        return class_prototypes(codes.flatten(1).float(), targets, self.encodings, self.labels, k)

    def save(self, path: str | Path) -> None:
        """Write the encodings, labels and sources to ``path`` atomically."""
        payload = {
            "format": FILE_FORMAT,
            "encodings": self.encodings.cpu(),
            "labels": self.labels.cpu(),
            "num_classes": self.num_classes,
            "sources": self.sources,
        }
        atomic_torch_save(payload, path)


@torch.no_grad()
def fit_class_encodings(
    autoencoder: nn.Module, classifier: FeatureClassifier, dataloader: Iterable, num_classes: int
) -> ClassEncodings:
    """Encode every image of a loader of cfx dict batches and label it with the classifier's prediction.

    Both networks run in eval mode (their modes are restored afterwards), on the classifier's device. One
    process: under DDP, pass the whole split to every rank or fit before launching.

    Args:
        autoencoder: the autoencoder whose ``encode`` VLK will use.
        classifier: the classifier VLK will explain (its predictions group the encodings, as in alibi).
        dataloader: yields dicts with ``"image"`` (e.g. ``datamodule.eval_dataloader("train")``).
        num_classes: the classifier's number of classes.

    Returns:
        The :class:`ClassEncodings` (on the classifier's device).

    Raises:
        ValueError: the autoencoder's ``encode`` does not return a tensor of codes, or the loader is empty.
    """
    parameter = next(classifier.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    encodings, labels = [], []
    with evaluation_mode(autoencoder, classifier):
        for batch in dataloader:
            images = batch["image"].to(device)
            codes = autoencoder.encode(images)
            if not isinstance(codes, Tensor):
                raise ValueError(
                    f"autoencoder.encode must return (N, D) codes, got a {type(codes).__name__} (a VAE's posterior?)"
                )
            encodings.append(codes.flatten(1).float())
            labels.append(classifier(images).argmax(dim=1))
    if not encodings:
        raise ValueError("the dataloader yielded no images to encode")
    return ClassEncodings(torch.cat(encodings), torch.cat(labels), num_classes)


def _shape_of(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def load_prototypes(path: str | Path, map_location: str | torch.device = "cpu") -> ClassEncodings:
    """Read the :class:`ClassEncodings` written by :meth:`ClassEncodings.save` (``class_prototypes.pt``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable class-encodings file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no class prototypes at {path.resolve()} (fit them with cfx-prototypes, cfx.tasks.prototypes)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable class prototypes file ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a class prototypes file (expected a dict with format {FILE_FORMAT!r})")
    return ClassEncodings(payload["encodings"], payload["labels"], payload["num_classes"], payload["sources"])


def shrink(values: Tensor, origin: Tensor, threshold: float) -> Tensor:
    """FISTA's element-wise L1 shrinkage of ``values`` towards ``origin`` by ``threshold``.

    ``v - threshold`` where ``v - origin > threshold``, ``origin`` where ``|v - origin| <= threshold``, ``v +
    threshold`` where ``v - origin < -threshold``.
    """
    difference = values - origin
    shrunk = values - threshold * difference.sign()
    return torch.where(difference.abs() <= threshold, origin, shrunk)


class VLK(SearchExplainer):
    """Prototype-guided counterfactuals (Van Looveren & Klaise), FISTA with a bisection on ``c``, batched.

    Each query ``x0`` (predicted class ``o``, target ``t``) minimises over ``x'`` in ``feature_range``

    ``c * max(0, p_o(x') - max_{i != o} p_i(x') + kappa) + beta * ||x' - x0||_1 + ||x' - x0||_2^2
    + gamma * ||x' - AE(x')||_2^2 + theta * ||ENC(x') - proto_t||_2^2``

    with ``p`` the classifier's softmax probabilities, ``AE(x) = decode(encode(x))``, ``ENC = encode`` and
    ``proto_t`` the query's prototype of the target class (:func:`class_prototypes`, the ``k`` nearest training
    encodings of class ``t`` to ``ENC(x0)``; alibi picks the nearest prototype only when no target is given,
    cfx always has one). As in alibi the prediction term is untargeted (it pushes away from ``o``); the target
    enters through the prototype and the validity rule. Squared norms and L1 are sums over all elements.

    FISTA, per c-step of ``max_iterations`` steps, from ``x = y = x0``: step ``k = 0, 1, ...`` takes a gradient
    step on the smooth part (everything but the L1 term) at ``y`` with learning rate ``learning_rate * (1 -
    k / max_iterations) ** 0.5`` (polynomial decay, power 0.5, towards 0), gradients clipped element-wise to
    ``+-gradient_clip``; shrinks the result towards ``x0`` by ``beta`` (:func:`shrink`) and clips it to the
    feature range (the new ``x``); then ``y = x + (k + 1) / (k + 4) * (x - x_previous)``, clipped. Every new
    ``x`` is a candidate: it is *valid* if the classifier predicts ``t`` with probability ``>= confidence``
    (:func:`~cfx.counterfactual.search.target_reached`) and ``p_t - p_o >= kappa`` (alibi: the prediction
    differs from ``o`` by the margin ``kappa``, and is the target); the returned counterfactual is the valid
    candidate of lowest ``||x' - x0||_2^2 + beta * ||x' - x0||_1`` over all c-steps. After each c-step ``c`` is
    updated by :func:`bisection_step` (``c`` starts at ``c_init``, its bounds at 0 and 1e10) and the next c-step
    restarts from ``x0``.

    Differences from alibi, all deliberate: validity asks for the target probability ``confidence`` like every
    cfx explainer (alibi only asks for the argmax; the DeDUCE paper reports its VLK counterfactuals at a mean
    target confidence of 0.42 -- ``confidence`` just above ``1 / num_classes`` reproduces that criterion);
    the momentum uses the previous ``x`` as FISTA prescribes (alibi reads it in the same graph run that
    overwrites it). Defaults are alibi's MNIST example (gamma 100, theta 100, c_init 1, c_steps 2) with DeDUCE's
    ``k = 5``, on pixels in [0, 1] (the example's [-0.5, 0.5] has the same width, so ``beta`` means the same).

    Stopping: the bisection needs every c-step, and alibi never stops a c-step early, so every query that is
    not already at its target runs all ``c_steps * max_iterations`` steps (``result.iterations``; the path spans
    them too, the c-steps one after the other); queries already predicted as the target with ``confidence``
    are returned unchanged after 0 steps. A query with no valid candidate fails and returns its last ``x``.
    Deterministic (``indices`` are unused); every query's terms, ``c`` and bounds are its own, so results do not
    depend on the batch.

    Args:
        classifier: the model to explain.
        autoencoder: a module with ``encode(x) -> codes`` and ``decode(codes) -> images``, and ``in_channels``
            and ``image_size`` attributes matching the classifier (e.g. :class:`cfx.nn.generative.ConvAutoencoder`).
        prototypes: the training encodings of that autoencoder grouped by the classifier's prediction
            (:func:`load_prototypes` of the file ``cfx-prototypes`` writes).
        k: how many nearest training encodings of the target class make the prototype.
        kappa: the margin of the prediction term.
        beta: weight of the L1 term (the shrinkage threshold).
        gamma: weight of the autoencoder term.
        theta: weight of the prototype term.
        c_init: initial weight of the prediction term.
        c_steps: number of c-steps (bisection rounds).
        max_iterations: FISTA steps per c-step (alibi's meaning; the search takes ``c_steps`` times as many).
        learning_rate: initial learning rate.
        feature_range: ``(low, high)`` pixel bounds of the counterfactual, within [0, 1].
        gradient_clip: element-wise bound on the gradient (alibi's ``clip``).
        confidence: target probability at which a candidate is valid.
        path_every: record ``x`` every this many steps in the result's ``path``.
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).

    Raises:
        TypeError: ``autoencoder`` or ``prototypes`` is of the wrong kind.
        ValueError: the autoencoder does not fit the classifier, the prototypes do not fit the autoencoder or the
            classifier, or a setting is out of range.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        autoencoder: nn.Module,
        prototypes: ClassEncodings,
        k: int = 5,
        kappa: float = 0.0,
        beta: float = 0.1,
        gamma: float = 100.0,
        theta: float = 100.0,
        c_init: float = 1.0,
        c_steps: int = 2,
        max_iterations: int = 1000,
        learning_rate: float = 1e-2,
        feature_range: tuple[float, float] = (0.0, 1.0),
        gradient_clip: float = 1000.0,
        confidence: float = 0.5,
        path_every: int | None = None,
        stop_check_every: int = 1,
    ):
        if c_steps < 1:
            raise ValueError(f"c_steps must be >= 1, got {c_steps}")
        if max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
        super().__init__(
            classifier, confidence, c_steps * max_iterations, path_every, stop_check_every=stop_check_every
        )
        check_image_model(autoencoder, "autoencoder", ("encode", "decode"), classifier)
        if not isinstance(prototypes, ClassEncodings):
            raise TypeError(
                "prototypes must be the ClassEncodings of cfx.counterfactual.vlk.load_prototypes(path), got a "
                f"{type(prototypes).__name__}"
            )
        latent_dim = getattr(autoencoder, "latent_dim", None)
        if prototypes.latent_dim != latent_dim:
            raise ValueError(
                f"the prototypes are {prototypes.latent_dim}-d encodings, the autoencoder's codes {latent_dim}-d: "
                "fit the prototypes with this autoencoder"
            )
        if prototypes.num_classes != classifier.num_classes:
            raise ValueError(
                f"the prototypes cover {prototypes.num_classes} classes, the classifier has {classifier.num_classes}"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        for name, value in (("kappa", kappa), ("beta", beta), ("gamma", gamma), ("theta", theta)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("c_init", c_init), ("learning_rate", learning_rate), ("gradient_clip", gradient_clip)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        low, high = feature_range
        if not 0 <= low < high <= 1:
            raise ValueError(f"feature_range must be (low, high) with 0 <= low < high <= 1, got {feature_range}")
        self.autoencoder, self.prototypes, self.k = autoencoder, prototypes, k
        self.kappa, self.beta, self.gamma, self.theta = kappa, beta, gamma, theta
        self.c_init, self.c_steps, self.iterations_per_c_step = c_init, c_steps, max_iterations
        self.learning_rate, self.feature_range, self.gradient_clip = learning_rate, (low, high), gradient_clip

    def auxiliary_modules(self) -> list[nn.Module]:
        """The autoencoder and the class encodings (kept in eval mode and moved to the queries' device)."""
        return [self.autoencoder, self.prototypes]

    def check_query(
        self,
        images: Tensor,
        targets: Tensor | Sequence[int] | np.ndarray,
        indices: Tensor | Sequence[int] | np.ndarray | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`Explainer.check_query`; the images must fit the autoencoder, every target class have encodings."""
        images, targets, indices = super().check_query(images, targets, indices)
        check_images_fit(self.autoencoder, "autoencoder", images)
        classes = targets.unique()
        missing = classes[self.prototypes.class_counts().to(classes.device)[classes] == 0]
        if len(missing) > 0:
            raise ValueError(
                f"the prototypes have no training encodings of target class(es) {missing.tolist()} (the classifier "
                "never predicted them on the data they were fitted on)"
            )
        return images, targets, indices

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """Per row: the query, ``x = y = x0``, its prototype, ``c`` and its bounds, the best candidate (none)."""
        with torch.no_grad():
            codes = self.autoencoder.encode(queries)
        count, device = len(queries), queries.device
        search.state.update(
            queries=queries,
            iterates=queries.clone(),
            point=queries.clone(),
            sources=search.original_prediction.index_select(0, search.rows),
            prototypes=self.prototypes.prototypes(codes, search.targets, self.k).to(queries.dtype),
            c=torch.full((count,), float(self.c_init), device=device),
            lower=torch.zeros(count, device=device),
            upper=torch.full((count,), UNBOUNDED, device=device),
            found=torch.zeros(count, dtype=torch.bool, device=device),
            best=queries.clone(),
            best_distance=torch.full((count,), math.inf, device=device),
            best_probability=torch.zeros(count, device=device),
        )

    def _valid(self, search: ActiveSearch, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(valid, target probability)`` of candidates with these ``(R, K)`` logits."""
        reached, target_probability = target_reached(logits, search.targets, self.confidence)
        source_probability = logits.detach().float().softmax(dim=1).gather(1, search.state["sources"][:, None])
        return reached & (target_probability - source_probability.squeeze(1) >= self.kappa), target_probability

    def _smooth_loss(self, search: ActiveSearch, point: Tensor) -> Tensor:
        """``(R,)`` the objective without its L1 term at the points ``y``."""
        state = search.state
        probabilities = self.classifier(point).float().softmax(dim=1)
        source = nn.functional.one_hot(state["sources"], probabilities.shape[1]).bool()
        source_probability = probabilities.masked_select(source)
        other_probability = probabilities.masked_fill(source, -math.inf).max(dim=1).values
        loss = state["c"] * (source_probability - other_probability + self.kappa).clamp_min(0)
        loss = loss + (point - state["queries"]).square().flatten(1).sum(dim=1)
        if self.gamma > 0 or self.theta > 0:
            codes = self.autoencoder.encode(point)
            if self.gamma > 0:
                reconstruction = self.autoencoder.decode(codes)
                loss = loss + self.gamma * (reconstruction - point).square().flatten(1).sum(dim=1)
            if self.theta > 0:
                loss = loss + self.theta * (codes.flatten(1) - state["prototypes"]).square().sum(dim=1)
        return loss

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """Judge the candidates ``x``; at the end of a c-step update ``c`` and restart; the loss at ``y``."""
        state = search.state
        candidates = state["iterates"]
        with torch.no_grad():
            logits = self.classifier(candidates)
        valid, target_probability = self._valid(search, logits)
        difference = (candidates - state["queries"]).flatten(1)
        distance = difference.square().sum(dim=1) + self.beta * difference.abs().sum(dim=1)
        values = {"valid": valid, "target_probability": target_probability, "distance": distance}
        if last:
            return Evaluation(candidates, logits, values=values)
        state["found"] = state["found"] | valid
        if iteration > 0 and iteration % self.iterations_per_c_step == 0:  # the end of a c-step: the next starts
            state["c"], state["lower"], state["upper"] = bisection_step(
                state["c"], state["lower"], state["upper"], state["found"]
            )
            state["found"] = torch.zeros_like(state["found"])
            state["iterates"], state["point"] = state["queries"], state["queries"]
        point = state["point"].detach().requires_grad_()
        return Evaluation(candidates, logits, self._smooth_loss(search, point), (point,), values)

    def stopping(
        self,
        search: ActiveSearch,
        iteration: int,
        last: bool,
        evaluation: Evaluation,
        reached: Tensor,
        probability: Tensor,
    ) -> Tensor:
        """Keep each row's best valid candidate; every row stops after the last step of the last c-step."""
        state, values = search.state, evaluation.values
        better = values["valid"] & (values["distance"] < state["best_distance"])
        state["best"] = torch.where(better[:, None, None, None], evaluation.iterates, state["best"])
        state["best_distance"] = torch.where(better, values["distance"], state["best_distance"])
        state["best_probability"] = torch.where(better, values["target_probability"], state["best_probability"])
        done = torch.full_like(better, last)
        if last:
            found = torch.isfinite(state["best_distance"])
            counterfactuals = torch.where(found[:, None, None, None], state["best"], evaluation.iterates)
            target_probability = torch.where(found, state["best_probability"], values["target_probability"])
            search.finish(done, iteration, evaluation.iterates, found, target_probability, counterfactuals)
        return done

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """One FISTA step: gradient step at ``y``, shrinkage towards ``x0``, clipping, momentum."""
        state, (low, high) = search.state, self.feature_range
        inner = iteration % self.iterations_per_c_step
        learning_rate = self.learning_rate * (1 - inner / self.iterations_per_c_step) ** 0.5
        gradient = gradients[0].clamp(-self.gradient_clip, self.gradient_clip)
        with torch.no_grad():
            moved = state["point"] - learning_rate * gradient
            iterates = shrink(moved, state["queries"], self.beta).clamp(low, high)
            momentum = (inner + 1) / (inner + 4)
            state["point"] = (iterates + momentum * (iterates - state["iterates"])).clamp(low, high)
            state["iterates"] = iterates
