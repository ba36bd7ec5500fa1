"""The Lightning Trainer the Python-level tests build."""

from __future__ import annotations

import lightning as L


def quiet_trainer(devices: int = 1, **settings: object) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary, updated with ``settings``.

    ``devices > 1`` runs that many gloo processes (``ddp_spawn``: results come back to the calling process).
    """
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )
