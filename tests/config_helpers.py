"""Pieces shared by the tiny YAML configs the CLI tests write."""

from __future__ import annotations


def tiny_trainer(**settings: object) -> dict[str, object]:
    """A one-epoch CPU ``trainer`` section without progress bar or model summary, updated with ``settings``."""
    return {
        "max_epochs": 1,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **settings,
    }
