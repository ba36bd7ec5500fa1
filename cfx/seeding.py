"""One rule for per-sample randomness (pure torch): a seed from each sample's dataset index and the run's seed.

Anything random per sample (random targets, generator initialisations, latent restarts) derives from
:func:`per_sample_seed`, so a sample's result depends on its dataset index and the seed only, never on its batch,
its device or the number of processes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INDEX_MULTIPLIER = 6364136223846793005  # Knuth's 64-bit LCG multiplier (odd: a bijection of 64-bit words)
_SEED_MULTIPLIER = 1442695040888963407  # Knuth's LCG increment, spreading the seed over the whole word
_MIX_MULTIPLIERS = (-4658895280553007687, -7723592293110705685)  # splitmix64's 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _logical_right_shift(values: Tensor, shift: int) -> Tensor:
    """``values >>> shift`` on int64 (torch's ``>>`` is arithmetic)."""
    return (values >> shift) & ((1 << (64 - shift)) - 1)


def per_sample_seed(indices: Tensor, seed: int = 0) -> Tensor:
    """A well-mixed int64 seed per sample: splitmix64's finaliser of ``index * A + (seed * B + 1)`` (mod 2**64).

    At one seed, distinct indices give distinct seeds (both steps are bijections of 64-bit words), and the seeds
    of nearby indices or nearby run seeds are unrelated (no ``index + seed * constant`` collisions).

    Args:
        indices: ``(N,)`` integer dataset indices (any device).
        seed: the run's seed.

    Returns:
        ``(N,)`` int64 seeds on the device of ``indices``.

    Raises:
        ValueError: ``indices`` is not a 1-D integer tensor.
    """
    if (
        not isinstance(indices, Tensor)
        or indices.ndim != 1
        or indices.is_floating_point()
        or indices.dtype == torch.bool
    ):
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        dtype = indices.dtype if isinstance(indices, Tensor) else ""
        raise ValueError(f"expected (N,) integer dataset indices, got {dtype} {shape}")
    seed_term = torch.tensor(int(seed), dtype=torch.int64, device=indices.device) * _SEED_MULTIPLIER + 1
    state = indices.to(torch.int64) * _INDEX_MULTIPLIER + seed_term  # int64 arithmetic wraps around
    for shift, multiplier in zip((30, 27), _MIX_MULTIPLIERS, strict=True):
        state = (state ^ _logical_right_shift(state, shift)) * multiplier
    return state ^ _logical_right_shift(state, 31)


def torch_generator(seed: int | Tensor, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (an int or a 0-d tensor of :func:`per_sample_seed`)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) & ((1 << 64) - 1))
    return generator
