"""Atomic file writes and content hashes: a file is either absent, the old version, or complete — never half-written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success move it into place, on failure remove it.

    Write the whole file to the yielded path inside the block. The temporary name is unique (``mkstemp``), so
    concurrent writers never share it, and ``os.replace`` makes the new file appear at once.

    Args:
        path: the destination (its folder is created; the file is readable by everyone, like a plain write).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        os.chmod(temporary, 0o644)  # mkstemp creates the file readable by its owner only
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's content (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_facts(path: str | Path) -> dict[str, str]:
    """``{"path": path as given, "sha256": content digest}`` of a file, as results and fitted files record inputs."""
    return {"path": str(path), "sha256": file_sha256(path)}
