"""LightningModules: thin training / evaluation wrappers around the pure-torch models in cfx.nn."""

from cfx.tasks.classification import (
    ClassificationTask,
    check_data_matches,
    load_classifier,
    load_task_checkpoint,
)

__all__ = ["ClassificationTask", "check_data_matches", "load_classifier", "load_task_checkpoint"]
