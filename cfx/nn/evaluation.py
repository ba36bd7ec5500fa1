"""Temporarily switching modules to eval mode (pure torch)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode inside the block and restore each submodule's previous mode afterwards.

    Every submodule's own ``training`` flag is restored (not just the top module's), so a network whose parts
    were in mixed modes comes back exactly as it was.
    """
    modes = [(module, module.training) for root in modules for module in root.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training
