"""ClassificationTask: trains any cfx classifier; its checkpoint is what every explainer loads."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cfx.distributed import destroy_process_group_at_exit
from cfx.nn.classifier import FeatureClassifier

STAGES = ("train", "val", "test")


class ClassificationTask(L.LightningModule):
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
        destroy_process_group_at_exit()
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


def load_task_checkpoint(
    task_class: type[L.LightningModule], checkpoint: str | Path, map_location: str | torch.device = "cpu"
):
    """``task_class.load_from_checkpoint`` with one clear error for a missing, corrupt or foreign file.

    Args:
        task_class: the LightningModule class the checkpoint was written by.
        checkpoint: path of the ``.ckpt`` file.
        map_location: device to load onto.

    Returns:
        The task, rebuilt from its saved hyper-parameters and weights.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path.resolve()} (train one with `cfx fit -c <config>`)")
    try:
        # cfx checkpoints hold their hyper-parameters as plain config dicts, or, for tasks built in Python, the
        # network object itself; both need the full unpickler. Only load checkpoints you trust.
        return task_class.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable {task_class.__name__} checkpoint ({type(error).__name__}: {error})"
        ) from error


def checkpoint_task_class(checkpoint: str | Path) -> type[L.LightningModule]:
    """The task class a ``cfx fit`` checkpoint was written by (recorded by the CLI as ``_class_path``).

    Args:
        checkpoint: path of the ``.ckpt`` file.

    Returns:
        That class, or :class:`ClassificationTask` for checkpoints of tasks built in Python.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path.resolve()} (train one with `cfx fit -c <config>`)")
    try:
        hyper_parameters = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    except Exception as error:
        raise ValueError(f"{path} is not a readable cfx checkpoint ({type(error).__name__}: {error})") from error
    class_path = hyper_parameters.get("_class_path")
    if class_path is None:
        return ClassificationTask
    module_name, _, class_name = class_path.rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path} was written by {class_path}, which cannot be imported ({error})") from error
    if not (isinstance(task_class, type) and issubclass(task_class, L.LightningModule)):
        raise ValueError(f"{path} was written by {class_path}, which is not a LightningModule")
    return task_class


def load_classifier(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> FeatureClassifier:
    """Load the classifier of a cfx task checkpoint as a plain ``nn.Module`` in eval mode.

    Works for every task with a ``network`` (the task class is read from the checkpoint): the network of a
    ClassificationTask or DEPTask, and for a DUQTask the network with its DUQ head
    (:class:`~cfx.nn.duq.DUQFeatureClassifier`, logits ``log K_c``).

    Args:
        checkpoint: path of a ``.ckpt`` written by ``cfx fit``.
        map_location: device to load onto.

    Returns:
        The classifier, in eval mode, with gradients of its parameters disabled.
    """
    task = load_task_checkpoint(checkpoint_task_class(checkpoint), checkpoint, map_location)
    network = task.explained_classifier() if isinstance(task, ClassificationTask) else getattr(task, "network", None)
    if not isinstance(network, FeatureClassifier):
        raise ValueError(f"{checkpoint} holds a {type(task).__name__}, which has no FeatureClassifier `network`")
    network = network.eval()
    network.requires_grad_(False)
    return network
