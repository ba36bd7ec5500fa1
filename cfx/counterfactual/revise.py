"""REVISE (Joshi et al.): counterfactuals by gradient descent in a VAE's latent space, as DeDUCE's baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.counterfactual.search import ActiveSearch, Evaluation, SearchExplainer
from cfx.nn.classifier import FeatureClassifier


def check_image_model(model: nn.Module, argument: str, methods: Sequence[str], classifier: FeatureClassifier) -> None:
    """Raise unless ``model`` is a module with ``methods`` whose images fit the classifier's.

    The model must say what images it takes (``in_channels`` and ``image_size`` attributes, as the networks of
    :mod:`cfx.nn.generative` do); the channels must be the classifier's, and so must the size when the classifier
    was built for one size.

    Args:
        model: the auxiliary network (a VAE, an autoencoder).
        argument: its argument name, for the messages.
        methods: the methods the explainer calls on it.
        classifier: the classifier it is used with.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` with those methods.
        ValueError: its channels or image size do not match the classifier's.
    """
    missing = [name for name in methods if not callable(getattr(model, name, None))]
    if not isinstance(model, nn.Module) or missing:
        raise TypeError(
            f"{argument} must be an nn.Module with methods {', '.join(methods)}, got a {type(model).__name__}"
        )
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    if not isinstance(channels, int) or not isinstance(size, int):
        raise ValueError(
            f"{argument} ({type(model).__name__}) must name the images it takes by integer in_channels and "
            f"image_size attributes, got {channels!r} and {size!r}"
        )
    if channels != classifier.in_channels:
        raise ValueError(
            f"{argument} ({type(model).__name__}) takes {channels}-channel images, the classifier "
            f"{classifier.in_channels}-channel ones"
        )
    if classifier.image_size is not None and size != classifier.image_size:
        raise ValueError(
            f"{argument} ({type(model).__name__}) takes {size}x{size} images, the classifier "
            f"{classifier.image_size}x{classifier.image_size} ones"
        )


def check_images_fit(model: nn.Module, argument: str, images: Tensor) -> None:
    """Raise ``ValueError`` unless the ``(N, C, H, W)`` ``images`` have ``model``'s channels and size."""
    expected = (model.in_channels, model.image_size, model.image_size)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{argument} ({type(model).__name__}) takes {expected[0]}x{expected[1]}x{expected[2]} images, got "
            f"{'x'.join(map(str, images.shape[1:]))}"
        )


class REVISE(SearchExplainer):
    """REVISE: gradient descent on a VAE latent ``z`` of ``CE(f(G(z)), t) + lambda * ||G(z) - x||_1``.

    ``z`` starts at the VAE encoder's mean of the query ``x``; ``G`` is the VAE decoder, its output clamped to
    [0, 1], and the L1 distance is summed over pixels. Each step is plain gradient descent (``torch.optim.SGD``
    without momentum) on each query's own loss, so a query's trajectory does not depend on the batch. A query
    stops at its first decoded iterate whose target softmax probability reaches ``confidence`` with the target
    as the predicted class (only queries still below it are updated; the decoded start ``G(E(x))`` counts, so a
    reconstruction that is already a counterfactual is returned after 0 steps); that ``G(z)`` is the
    counterfactual. A query that does not get there within ``max_iterations`` steps fails and returns its last
    ``G(z)``. A query already predicted as the target with ``confidence`` is returned unchanged (the query
    itself, not its reconstruction) after 0 iterations. Deterministic (``indices`` are unused).

    The paper's settings (DeDUCE's baseline: lambda 1, step 1e-5, up to 50,000 iterations) are the defaults. The
    loss is summed per query (the cross-entropy plus an L1 over all pixels, hundreds for a 28x28 digit), so
    the step size interacts with the image size and the decoder's scale: 1e-5 moves ``z`` very little per step,
    which is why the paper needs tens of thousands of steps; raise ``learning_rate`` for faster, coarser searches.

    The VAE is used in eval mode (the decoder of the encoder's mean; its parameters are not changed).

    Args:
        classifier: the model to explain.
        vae: a VAE with ``encode(x) -> (mean, log_variance)`` and ``decode(z) -> images``, and ``in_channels``
            and ``image_size`` attributes matching the classifier (e.g. :class:`cfx.nn.generative.ConvVAE`).
        distance_weight: ``lambda``, the weight of the L1 distance to the query.
        learning_rate: the gradient-descent step size on ``z``.
        confidence: target probability at which a query succeeds.
        max_iterations: gradient steps after which a query fails.
        path_every: record the decoded iterates every this many steps in the result's ``path``.
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).

    Raises:
        TypeError: ``vae`` is not a module with ``encode`` and ``decode``.
        ValueError: the VAE's channels or image size differ from the classifier's, or a setting is out of range.
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        vae: nn.Module,
        distance_weight: float = 1.0,
        learning_rate: float = 1e-5,
        confidence: float = 0.5,
        max_iterations: int = 50_000,
        path_every: int | None = None,
        stop_check_every: int = 1,
    ):
        super().__init__(classifier, confidence, max_iterations, path_every, stop_check_every=stop_check_every)
        check_image_model(vae, "vae", ("encode", "decode"), classifier)
        if distance_weight < 0:
            raise ValueError(f"distance_weight must be >= 0, got {distance_weight}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.vae = vae
        self.distance_weight = distance_weight
        self.learning_rate = learning_rate

    def auxiliary_modules(self) -> list[nn.Module]:
        """The VAE (kept in eval mode and moved to the queries' device)."""
        return [self.vae]

    def check_query(
        self,
        images: Tensor,
        targets: Tensor | Sequence[int] | np.ndarray,
        indices: Tensor | Sequence[int] | np.ndarray | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`Explainer.check_query`, and the images must have the VAE's channels and size."""
        images, targets, indices = super().check_query(images, targets, indices)
        check_images_fit(self.vae, "vae", images)
        return images, targets, indices

    def start(self, search: ActiveSearch, queries: Tensor, indices: Tensor) -> None:
        """The latents (an SGD leaf starting at the encoder means of the queries)."""
        with torch.no_grad():
            posterior = self.vae.encode(queries)
        if not isinstance(posterior, tuple) or len(posterior) != 2:
            raise ValueError(
                f"vae.encode must return (mean, log_variance), got a {type(posterior).__name__} (an autoencoder?)"
            )
        latents = nn.Parameter(posterior[0].detach().to(queries.dtype).clone())
        search.track(latents=latents, optimizer=torch.optim.SGD([latents], lr=self.learning_rate))
        search.state["queries"] = queries

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        """The decoded latents, their logits and (unless ``last``) ``CE(f(G(z)), t) + lambda * ||G(z) - x||_1``."""
        latents = search.tracked["latents"]
        with torch.set_grad_enabled(not last):
            images = self.vae.decode(latents).clamp(0, 1)
            logits = self.classifier(images)
            if last:
                return Evaluation(images.detach(), logits)
            distance = (images - search.state["queries"]).abs().flatten(1).sum(dim=1)
            loss = F.cross_entropy(logits, search.targets, reduction="none") + self.distance_weight * distance
        return Evaluation(images.detach(), logits, loss, (latents,))

    def step(self, search: ActiveSearch, gradients: list[Tensor | None], iteration: int) -> None:
        """One plain gradient-descent step on the latents."""
        latents, optimizer = search.tracked["latents"], search.tracked["optimizer"]
        latents.grad = gradients[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
