"""Building a generator by kind, and fitting each query's generator to reproduce its query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from cfx.nn.generators.base import BatchedGenerator
from cfx.nn.generators.dip import DIPGenerator
from cfx.nn.generators.inr import INRGenerator
from cfx.nn.generators.pixel import PixelGenerator

GENERATORS: dict[str, type[BatchedGenerator]] = {"pixel": PixelGenerator, "dip": DIPGenerator, "inr": INRGenerator}


def make_generator(
    kind: Literal["pixel", "dip", "inr"],
    num_queries: int,
    channels: int,
    image_size: int | Sequence[int],
    seeds: Tensor,
    **options,
) -> BatchedGenerator:
    """Build Q per-query generators of ``kind``; ``options`` go to the class (e.g. ``depth``, ``width``)."""
    if kind not in GENERATORS:
        raise ValueError(f"expected kind to be one of {sorted(GENERATORS)}, got {kind!r}")
    return GENERATORS[kind](num_queries, channels, image_size, seeds, **options)


def fit_reconstruction(generator: BatchedGenerator, images: Tensor, steps: int, lr: float) -> Tensor:
    """Fit each query's generator to reproduce its query: Adam on the sum over queries of the per-query MSE.

    The pixel generator is set to the images directly (its parameters are the image). Every parameter is
    trained, whatever its ``requires_grad`` was, and left trainable with no gradient.

    Args:
        generator: the Q generators.
        images: the ``(Q, C, H, W)`` queries in [0, 1].
        steps: Adam steps (>= 0).
        lr: Adam learning rate (> 0).

    Returns:
        ``(Q,)`` per-query MSE of the final images (detached).
    """
    expected = (generator.num_queries, generator.channels, *generator.image_size)
    if tuple(images.shape) != expected:
        raise ValueError(f"expected images of shape {expected}, got {tuple(images.shape)}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"expected steps >= 0 and lr > 0, got {steps} and {lr}")
    target = images.detach().clone()
    generator.set_trainable_groups(len(generator.layer_groups()))
    if isinstance(generator, PixelGenerator):
        generator.set_images(target)
    else:
        with torch.enable_grad():
            optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                (generator() - target).square().flatten(1).mean(dim=1).sum().backward()
                optimizer.step()
            generator.zero_grad(set_to_none=True)  # no stale gradient may reach a later optimiser
    with torch.no_grad():
        return (generator() - target).square().flatten(1).mean(dim=1)
