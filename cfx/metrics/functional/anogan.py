"""The AnoGAN realism score of images under a trained WGAN (pure torch): lower = more realistic.

``score(x) = min over restarts of L(x, z_final)`` with ``L(x, z) = ||x - G(z)||_1 + w * ||f(x) - f(G(z))||_1``
(sums over all elements; ``f`` the critic's intermediate feature map, ``w = feature_weight``) after plain gradient
steps on the latent ``z`` (DeDUCE's realism measure, after Schlegl et al.'s AnoGAN).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from cfx.nn.evaluation import evaluation_mode
from cfx.seeding import per_sample_seed, torch_generator

ANOGAN_KEYS = ("anogan", "query_anogan")
"""The per-pair record entries (``cfx.metrics.functional.counterfactual.PAIR_SCHEMA``) of the AnoGAN score: the
counterfactual's and its query's."""


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_settings(
    steps: int,
    step_size: float,
    decay_fraction: float,
    decay_factor: float,
    restarts: int,
    feature_weight: float,
    seed: int = 0,
) -> None:
    problems = []
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        problems.append(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        problems.append(f"restarts must be an integer >= 1, got {restarts!r}")
    if not (_is_real(step_size) and math.isfinite(step_size) and step_size > 0):
        problems.append(f"step_size must be finite and > 0, got {step_size!r}")
    if not (_is_real(decay_fraction) and 0 <= decay_fraction <= 1):
        problems.append(f"decay_fraction must be in [0, 1], got {decay_fraction!r}")
    if not (_is_real(decay_factor) and math.isfinite(decay_factor) and decay_factor > 0):
        problems.append(f"decay_factor must be finite and > 0, got {decay_factor!r}")
    if not (_is_real(feature_weight) and math.isfinite(feature_weight) and feature_weight >= 0):
        problems.append(f"feature_weight must be finite and >= 0, got {feature_weight!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(f"seed must be an integer, got {seed!r}")
    if problems:
        raise ValueError("anogan_score: " + "; ".join(problems))


def _check_networks(generator: nn.Module, critic: nn.Module) -> tuple[int, int, int]:
    """``(latent_dim, channels, image_size)`` of a generator and a critic that fit each other."""
    missing = [
        f"{name}.{attribute}"
        for name, module, attributes in (
            ("generator", generator, ("latent_dim", "out_channels", "image_size")),
            ("critic", critic, ("in_channels", "image_size", "features")),
        )
        for attribute in attributes
        if not hasattr(module, attribute)
    ]
    if not isinstance(generator, nn.Module) or not isinstance(critic, nn.Module) or missing:
        raise TypeError(
            "anogan_score needs a generator module with latent_dim, out_channels and image_size and a critic module "
            f"with in_channels, image_size and features() (cfx.nn.generative); missing {missing or 'nn.Module'}"
        )
    made = (generator.out_channels, generator.image_size)
    if made != (critic.in_channels, critic.image_size):
        raise ValueError(
            f"the generator makes {made[0]}-channel {made[1]} px images, the critic expects "
            f"{critic.in_channels}-channel {critic.image_size} px images"
        )
    return generator.latent_dim, generator.out_channels, generator.image_size


def _check_images(images: Tensor, indices: Tensor, channels: int, size: int) -> None:
    expected = (channels, size, size)
    if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"anogan_score: expected images of shape (N, {channels}, {size}, {size}) like the GAN's, got {shape}"
        )
    if len(images) == 0:
        raise ValueError("anogan_score: got an empty batch (0 images)")
    if not images.is_floating_point():
        raise ValueError(f"anogan_score: expected floating-point images in [0, 1], got {images.dtype}")
    if torch.isnan(images).any():
        raise ValueError("anogan_score: the images contain NaN")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(
            "anogan_score: expected images in [0, 1], got values in "
            f"[{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    if not isinstance(indices, Tensor) or tuple(indices.shape) != (len(images),):
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"anogan_score: expected ({len(images)},) dataset indices, one per image, got {shape}")


def _working_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter or buffer (the default dtype if it has none)."""
    tensors = (*module.parameters(), *module.buffers())
    return next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), torch.get_default_dtype())


def initial_latents(
    indices: Tensor, restarts: int, latent_dim: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Each image's restart latents, ``N(0, I)`` draws from a CPU generator seeded from its dataset index.

    Image ``i``'s ``(restarts, latent_dim)`` block is ``torch.randn`` from
    ``torch_generator(per_sample_seed(indices, seed)[i])``, so it is the same in any batch and on any device.

    Args:
        indices: ``(N,)`` dataset indices.
        restarts: latents per image.
        latent_dim: size of each latent.
        seed: the run's seed.
        dtype: dtype of the draws.

    Returns:
        ``(N * restarts, latent_dim)``, image-major (image ``i``'s restarts are rows ``i * restarts ...``), on the
        device of ``indices``.
    """
    seeds = per_sample_seed(indices.cpu(), seed).tolist()
    draws = [torch.randn(restarts, latent_dim, generator=torch_generator(value), dtype=dtype) for value in seeds]
    return torch.cat(draws).to(indices.device)


def _reconstruction_loss(
    images: Tensor, features: Tensor, latents: Tensor, generator: nn.Module, critic: nn.Module, feature_weight: float
) -> Tensor:
    """``(R,)`` ``||x - G(z)||_1 + w * ||f(x) - f(G(z))||_1`` of each row (an image repeated per restart)."""
    generated = generator(latents)
    pixel_term = (images - generated).abs().flatten(1).sum(dim=1)
    return pixel_term + feature_weight * (features - critic.features(generated)).abs().flatten(1).sum(dim=1)


def anogan_score(
    images: Tensor,
    indices: Tensor,
    generator: nn.Module,
    critic: nn.Module,
    *,
    steps: int = 4000,
    step_size: float = 0.03,
    decay_fraction: float = 0.2,
    decay_factor: float = 0.1,
    restarts: int = 3,
    feature_weight: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """The AnoGAN score of each image: the best reconstruction of it that gradient descent on ``z`` finds.

    Per image ``x`` and restart, ``z`` starts at a draw from ``N(0, I)`` and takes ``steps`` plain gradient steps
    ``z <- z - step * grad_z L(x, z)`` on ``L(x, z) = ||x - G(z)||_1 + feature_weight * ||f(x) - f(G(z))||_1``
    (sums over all elements, ``f = critic.features``); ``step`` is ``step_size`` for the first steps and
    ``step_size * decay_factor`` for the last ``round(decay_fraction * steps)`` ones. The score is the smallest
    final ``L(x, z)`` over the restarts. Lower = more realistic.

    Every restart runs the full step-size schedule: cfx *resets* the step size at each restart (all restarts run
    at once, in parallel). DeDUCE's public reference never resets it, so there restart 2 runs at 0.003 and
    restart 3 at 0.0003 throughout.

    All images and restarts of the batch are optimised together as one ``(N * restarts, latent_dim)`` tensor; each
    row's loss depends on its own ``z`` only (the networks run in eval mode: no batch statistics), so the gradient
    of the summed loss is every row's own gradient. Image ``i``'s restarts start from latents seeded by its dataset
    index (:func:`initial_latents`), so its score does not depend on the batch (up to the floating-point rounding
    of batched convolutions). The networks run in eval mode inside the call (their modes are restored after) in
    the dtype of the generator's parameters; their parameters are neither changed nor given gradients.

    Args:
        images: ``(N, C, H, W)`` images in ``[0, 1]`` with the GAN's channels and size.
        indices: ``(N,)`` their dataset indices (seeding the restarts).
        generator: maps ``(M, latent_dim)`` latents to images (``latent_dim``, ``out_channels``, ``image_size``
            attributes; :class:`cfx.nn.generative.WGANGenerator`).
        critic: its critic, whose ``features(images)`` is ``f`` (``in_channels``, ``image_size``;
            :class:`cfx.nn.generative.WGANCritic`).
        steps: gradient steps per restart (DeDUCE: 4000).
        step_size: the step size (DeDUCE: 0.03).
        decay_fraction: the final fraction of the steps taken at the reduced step size (DeDUCE: 0.2).
        decay_factor: what the step size is multiplied by for them (DeDUCE: 0.1).
        restarts: random starts per image (DeDUCE: 3).
        feature_weight: weight of the feature term (DeDUCE: 0.1).
        seed: the run's seed (with the dataset index it seeds the restarts).

    Returns:
        ``(N,)`` scores, in the generator's dtype, on the images' device.

    Raises:
        TypeError: the generator or critic lack what the score uses.
        ValueError: bad settings; images of another shape than the GAN's, not in ``[0, 1]``, with NaN, or none;
            indices not one per image.
        RuntimeError: called inside ``torch.inference_mode()`` (the score needs gradients).
    """
    _check_settings(steps, step_size, decay_fraction, decay_factor, restarts, feature_weight, seed)
    latent_dim, channels, size = _check_networks(generator, critic)
    _check_images(images, indices, channels, size)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("anogan_score needs gradients with respect to z: call it outside torch.inference_mode()")
    dtype = _working_dtype(generator)
    decayed_steps = round(decay_fraction * steps)
    with evaluation_mode(generator, critic), torch.enable_grad():
        images = images.detach().to(dtype)
        latents = initial_latents(indices.to(images.device), restarts, latent_dim, seed, dtype)
        with torch.no_grad():
            features = critic.features(images)
        targets = images.repeat_interleave(restarts, dim=0)
        target_features = features.repeat_interleave(restarts, dim=0)
        for step in range(steps):
            latents.requires_grad_(True)
            loss = _reconstruction_loss(targets, target_features, latents, generator, critic, feature_weight)
            (gradient,) = torch.autograd.grad(loss.sum(), latents)
            rate = step_size * decay_factor if step >= steps - decayed_steps else step_size
            latents = (latents - rate * gradient).detach()
        with torch.no_grad():
            final = _reconstruction_loss(targets, target_features, latents, generator, critic, feature_weight)
    return final.view(len(images), restarts).amin(dim=1)


ANOGAN_SETTINGS: tuple[str, ...] = tuple(
    name
    for name, parameter in inspect.signature(anogan_score).parameters.items()
    if parameter.kind is parameter.KEYWORD_ONLY
)
"""The settings of :func:`anogan_score` (its keyword-only arguments: ``steps``, ``step_size``, ...)."""


def check_anogan_settings(settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``settings`` are valid keyword settings of :func:`anogan_score`."""
    if not isinstance(settings, dict):
        raise ValueError(
            f"the AnoGAN settings must be a dict of {list(ANOGAN_SETTINGS)}, got {type(settings).__name__}"
        )
    unknown = sorted(set(settings) - set(ANOGAN_SETTINGS))
    if unknown:
        raise ValueError(f"the AnoGAN settings are {list(ANOGAN_SETTINGS)}, got unknown {unknown}")
    defaults = {name: inspect.signature(anogan_score).parameters[name].default for name in ANOGAN_SETTINGS}
    _check_settings(**{**defaults, **settings})
