"""ClassificationTask: trains any cfx classifier; its checkpoint is what every explainer loads."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable, instantiate_module
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cfx.init_args import instantiate
from cfx.nn.classifier import FeatureClassifier
from cfx.tasks.base import CfxTask

STAGES = ("train", "val", "test")


class ClassificationTask(CfxTask):
    """Cross-entropy training of a :class:`~cfx.nn.FeatureClassifier`, with accuracy per stage.

    Args:
        network: the classifier (an ``nn.Module`` argument: any cfx or user network with the
            FeatureClassifier interface).
        optimizer: a callable building the optimiser from the parameters (YAML: ``class_path`` + ``init_args``).
        lr_scheduler: optional callable building a scheduler from the optimiser.
    """

    def __init__(
        self,
        network: FeatureClassifier,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # A network built in Python is saved as the config that rebuilds it (as the CLI saves one), not pickled:
        # spectrally normalised (parametrised) modules cannot be pickled, nor dumped by the loggers.
        config = network.init_config if isinstance(self.hparams.get("network"), nn.Module) else None
        if config is not None:
            self.save_hyperparameters({"network": config})  # replaces the entry (and the loggers' copy)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.metrics = nn.ModuleDict(
            {f"{stage}_metrics": self.stage_metrics(network.num_classes, stage) for stage in STAGES}
        )
        self.losses = nn.ModuleDict({f"{stage}_loss": MeanMetric() for stage in STAGES})

    @staticmethod
    def stage_metrics(num_classes: int, stage: str) -> MetricCollection:
        """Metrics of one stage, updated with ``(logits, labels)``; sum/count states, so exact under DDP."""
        return MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}, prefix=f"{stage}/")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_data_matches(self.network, datamodule)

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self.network(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.log_stage(stage, logits, batch["label"], loss)
        return loss

    def log_stage(self, stage: str, logits: Tensor, labels: Tensor, loss: Tensor) -> None:
        """Update and log the stage's accuracy and its sample-weighted mean loss (both exact under DDP)."""
        metrics, mean_loss = self.metrics[f"{stage}_metrics"], self.losses[f"{stage}_loss"]
        metrics.update(logits, labels)
        mean_loss.update(loss.detach(), weight=len(labels))
        self.log_dict(metrics, prog_bar=True, on_epoch=True, on_step=False)
        self.log(f"{stage}/loss", mean_loss, prog_bar=stage == "train", on_epoch=True, on_step=False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self.network(batch["image"])
        return {
            "index": batch["index"],
            "label": batch["label"],
            "logits": logits,
            "prediction": logits.argmax(1),
        }

    def explained_classifier(self) -> FeatureClassifier:
        """The model counterfactual methods explain for this task (here: the network)."""
        return self.network

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}


def check_data_matches(network: FeatureClassifier, datamodule) -> None:
    """Raise ``ValueError`` when the data's channels, size or classes do not fit the network."""
    problems = []
    if datamodule.in_channels != network.in_channels:
        problems.append(f"the data has {datamodule.in_channels} channel(s), the network expects {network.in_channels}")
    if network.image_size is not None and datamodule.image_size != network.image_size:
        problems.append(f"the data is {datamodule.image_size} px, the network was built for {network.image_size} px")
    if datamodule.num_classes != network.num_classes:
        problems.append(f"the data has {datamodule.num_classes} classes, the network outputs {network.num_classes}")
    if problems:
        raise ValueError(f"{type(datamodule).__name__} does not match {type(network).__name__}: " + "; ".join(problems))


def read_checkpoint(
    checkpoint: str | Path, map_location: str | torch.device = "cpu", weights_only: bool = False
) -> dict[str, Any]:
    """Read a ``.ckpt`` file once, with one clear error for a missing, empty, truncated or foreign file.

    Args:
        checkpoint: path of the file.
        map_location: device to load the tensors onto.
        weights_only: refuse pickled objects (Lightning's setting for ``--ckpt_path``). Checkpoints of tasks
            built in Python hold their network object, so the loaders here need the full unpickler: only load
            checkpoints you trust.

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters``, ``epoch``, ...).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not a Lightning checkpoint.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path.resolve()} (train one with `cfx fit -c <config>`)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), expected a Lightning .ckpt written by `cfx fit`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} is not a readable checkpoint, expected a Lightning .ckpt written by `cfx fit` "
            f"({type(error).__name__}: {reason})"
        ) from error
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path} holds no `state_dict`, expected a Lightning .ckpt written by `cfx fit`")
    return payload


def checkpoint_class_path(payload: dict[str, Any]) -> str:
    """The class path of the task a read checkpoint was written by (:class:`ClassificationTask` if unrecorded)."""
    class_path = (payload.get("hyper_parameters") or {}).get("_class_path")
    return class_path or f"{ClassificationTask.__module__}.{ClassificationTask.__qualname__}"


def checkpoint_task_class(payload: dict[str, Any], source: str | Path = "the checkpoint") -> type[CfxTask]:
    """Import the task class a read checkpoint was written by (see :func:`checkpoint_class_path`)."""
    class_path = checkpoint_class_path(payload)
    module_name, _, class_name = class_path.rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{source} was written by {class_path}, which cannot be imported ({error})") from error
    if not (isinstance(task_class, type) and issubclass(task_class, CfxTask)):
        raise ValueError(f"{source} was written by {class_path}, which is not a cfx task (a CfxTask subclass)")
    return task_class


def build_task(payload: dict[str, Any], source: str | Path = "the checkpoint") -> CfxTask:
    """Rebuild the task of a read checkpoint: its class, hyper-parameters and weights (public keys only).

    The class is the ``_class_path`` of the hyper-parameters, written by LightningCLI and by :class:`CfxTask`
    (older checkpoints of tasks built in Python record none: :class:`ClassificationTask`). Hyper-parameters
    saved by the CLI are configs, instantiated like ``load_from_checkpoint`` does (Lightning's
    ``instantiate_module``); those of tasks built in Python are the init arguments themselves.

    Args:
        payload: what :func:`read_checkpoint` returned.
        source: where it came from, for error messages.

    Returns:
        The task, in train mode, on the device of the checkpoint's tensors.
    """
    task_class = checkpoint_task_class(payload, source)
    class_path = checkpoint_class_path(payload)
    hyper_parameters = dict(payload.get("hyper_parameters") or {})
    hyper_parameters.pop("_class_path", None)
    instantiator = hyper_parameters.pop("_instantiator", None)
    try:
        if instantiator is None:
            for name, value in list(hyper_parameters.items()):  # networks saved as configs (ClassificationTask)
                if isinstance(value, Mapping) and "class_path" in value:
                    hyper_parameters[name] = instantiate(value)
            task = task_class(**hyper_parameters)
        elif instantiator == "lightning.pytorch.cli.instantiate_module":
            task = instantiate_module(task_class, {"_class_path": class_path, **hyper_parameters})
        else:
            raise ValueError(f"the instantiator {instantiator!r} is not Lightning's CLI instantiator")
        task.load_state_dict(payload["state_dict"])
    except Exception as error:
        raise ValueError(
            f"{source} does not rebuild its {task_class.__name__} ({type(error).__name__}: {str(error).strip()})"
        ) from error
    tensor = next((value for value in payload["state_dict"].values() if isinstance(value, Tensor)), None)
    return task if tensor is None else task.to(tensor.device)


def load_task(
    checkpoint: str | Path, map_location: str | torch.device = "cpu", task_class: type[CfxTask] = CfxTask
) -> CfxTask:
    """Load the task a checkpoint was written by, reading the file once.

    Args:
        checkpoint: path of a ``.ckpt`` written by ``cfx fit`` or ``trainer.save_checkpoint``.
        map_location: device to load onto.
        task_class: the class expected (a subclass is accepted).

    Returns:
        The task, with its weights.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is unreadable, of another task, or does not rebuild its task.
    """
    payload = read_checkpoint(checkpoint, map_location)
    written_by = checkpoint_task_class(payload, checkpoint)
    if not issubclass(written_by, task_class):
        raise ValueError(
            f"{checkpoint} is a checkpoint of {checkpoint_class_path(payload)}, expected one of {task_class.__name__}"
        )
    return build_task(payload, checkpoint)


def frozen_classifier(task: CfxTask, source: str | Path = "the checkpoint") -> FeatureClassifier:
    """The classifier a task explains (``task.explained_classifier()``), in eval mode with gradients disabled."""
    explained = getattr(task, "explained_classifier", None)
    network = explained() if callable(explained) else None
    if not isinstance(network, FeatureClassifier):
        raise ValueError(f"{source} holds a {type(task).__name__}, which has no FeatureClassifier to explain")
    network = network.eval()
    network.requires_grad_(False)
    return network


def load_classifier(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> FeatureClassifier:
    """Load the classifier of a cfx task checkpoint as a plain ``nn.Module`` in eval mode (the file is read once).

    Works for every task with a network (the task class is read from the checkpoint): the network of a
    ClassificationTask; for a DEPTask a :class:`~cfx.nn.loss_predictor.LossPredictingClassifier` carrying its
    ``loss_predictor``; for a DUQTask the network with its DUQ head (:class:`~cfx.nn.duq.DUQFeatureClassifier`,
    logits ``log K_c``).

    Args:
        checkpoint: path of a ``.ckpt`` written by ``cfx fit``.
        map_location: device to load onto.

    Returns:
        The classifier, in eval mode, with gradients of its parameters disabled.
    """
    return frozen_classifier(load_task(checkpoint, map_location), checkpoint)
