"""Atomic file writes: a file is either absent, the old version, or complete — never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """``torch.save`` ``payload`` to a temporary file in ``path``'s folder, then ``os.replace`` it into place.

    Args:
        payload: anything ``torch.save`` accepts.
        path: the destination (its folder is created; the file is readable by everyone, like a plain write).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        os.chmod(temporary, 0o644)  # mkstemp creates the file readable by its owner only
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
