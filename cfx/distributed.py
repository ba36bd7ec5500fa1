"""Process-group hygiene for multi-process runs (pure torch).

A gloo process group that is still alive when the interpreter shuts down can abort the process ("terminate called
without an active exception", pytorch/pytorch#190489): its worker threads outlive the objects they use. Lightning
destroys the group at exit only for NCCL, so CPU (gloo) DDP runs of cfx ask for it here.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist


def _destroy_default_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """If this process has a default process group, destroy it when the interpreter exits (registered once)."""
    if dist.is_available() and dist.is_initialized():
        atexit.unregister(_destroy_default_process_group)
        atexit.register(_destroy_default_process_group)
