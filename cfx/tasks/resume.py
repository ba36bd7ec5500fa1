"""Exact resumption of training: the random generators' states travel in the checkpoint, one entry per process.

A ``cfx fit`` killed after an epoch's checkpoint and resumed with ``--ckpt_path last`` ends bit-identical to an
uninterrupted run on the same machine when

* the data order is a pure function of (seed, epoch): :meth:`cfx.data.ImageDataModule.train_dataloader` uses a
  seeded ``DistributedSampler`` that Lightning moves to each epoch with ``set_epoch``;
* everything else random (random augmentations, dropout, the DataLoader's worker base seed) draws from the
  global generators, whose states :class:`cfx.tasks.base.CfxTask` stores in every checkpoint
  (:func:`collect_random_states`) and puts back when a fit resumes (:func:`restore_random_states`). The states
  saved at an epoch's end are those the next epoch starts from: nothing draws in between (Lightning runs the
  sanity check of the resumed fit inside ``isolate_rng``);
* the model's own state is in its ``state_dict`` (weights, spectral-norm vectors, batch-norm statistics, DUQ's
  centroid moving averages) and the optimiser, scheduler, loops and callbacks are restored by Lightning.

What stays inexact: resuming from a mid-epoch checkpoint (Lightning restarts the epoch's sampler, so the batches
already seen are not skipped), resuming with a different number of processes (the random states are then not
restored, with a warning), CUDA generators of devices other than each process's current one, and
nondeterministic kernels (``trainer.deterministic`` governs those).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cfx.data.base import rank_and_world_size

RANDOM_STATES_KEY = "cfx_random_states"


def _local_random_states() -> dict[str, Any]:
    """This process's generator states, as tensors and plain Python values (loadable with ``weights_only``)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return states


def collect_random_states() -> list[dict[str, Any]]:
    """The global generator states of every process, indexed by rank (all processes must call this together).

    Returns:
        One dict per process: ``torch`` (CPU), ``torch.cuda`` (the current device, when CUDA is initialised),
        ``numpy`` and ``python`` states.
    """
    states = _local_random_states()
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return [states]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def restore_random_states(states: list[dict[str, Any]]) -> None:
    """Set this process's global generators to its entry of :func:`collect_random_states`'s result.

    With a different number of processes than the one that saved ``states`` nothing is restored (the data
    shards differ too, so the run cannot be exact) and a warning says so.

    Args:
        states: the per-rank states saved in a checkpoint.

    Raises:
        ValueError: ``states`` is not a non-empty list of state dicts.
    """
    if not isinstance(states, list) or not states or not all(isinstance(s, dict) for s in states):
        raise ValueError(f"expected a non-empty list of per-process random states, got {type(states).__name__}")
    rank, world_size = rank_and_world_size()
    if len(states) != world_size:
        rank_zero_warn(
            f"the checkpoint's random states come from {len(states)} process(es), this run has {world_size}: "
            "they are not restored, so the resumed run is not bit-identical to an uninterrupted one"
        )
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "torch.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch.cuda"])
