"""DDU: fit class-conditional Gaussians to a trained classifier's features, from the CLI or from Python."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback

from cfx.data.base import ImageDataModule
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.gaussian import ClassGaussians, fit_class_gaussians
from cfx.tasks.classification import load_classifier

GAUSSIANS_FILENAME = "class_gaussians.pt"


class FitClassGaussians(Callback):
    """After ``fit``, fit one Gaussian per class to the trained network's features and save them.

    The features are those of ``split`` under the evaluation transforms (``datamodule.eval_dataloader``, which
    is unpadded under DDP; the statistics are all-reduced, so the result equals a one-process fit). The file
    goes to ``dirpath``, by default the checkpoint folder (``<checkpoint.dirpath>/class_gaussians.pt``).
    Usage: ``cfx fit -c configs/classifier/embedded_mnist_sn_resnet.yaml -c configs/ddu/fit_gaussians.yaml``.

    Args:
        filename: name of the saved file.
        dirpath: folder to save in (default: the ModelCheckpoint's folder, else the trainer's root folder).
        split: the split fitted on.
    """

    def __init__(self, filename: str = GAUSSIANS_FILENAME, dirpath: str | None = None, split: str = "train"):
        self.filename, self.dirpath, self.split = filename, dirpath, split
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageDataModule):
            raise ValueError(f"FitClassGaussians needs a cfx ImageDataModule, got {type(datamodule).__name__}")
        network = getattr(pl_module, "network", None)
        if not isinstance(network, FeatureClassifier):
            raise ValueError(f"FitClassGaussians needs a task with a FeatureClassifier `network`, got {type(network)}")
        gaussians = fit_class_gaussians(network, datamodule.eval_dataloader(self.split), datamodule.num_classes)
        self.path = self._folder(trainer) / self.filename
        if trainer.is_global_zero:
            gaussians.save(self.path)
        trainer.strategy.barrier("class_gaussians_saved")

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return Path(checkpoint.dirpath)
        return Path(trainer.default_root_dir)


def fit_and_save_class_gaussians(
    checkpoint: str | Path,
    datamodule: ImageDataModule,
    path: str | Path | None = None,
    split: str = "train",
    map_location: str | torch.device = "cpu",
) -> Path:
    """Fit class Gaussians for an existing ClassificationTask checkpoint and save them.

    Args:
        checkpoint: the classifier checkpoint.
        datamodule: the data it was trained on.
        path: where to save (default: ``class_gaussians.pt`` next to the checkpoint).
        split: the split fitted on.
        map_location: device to compute on.

    Returns:
        The path written.
    """
    classifier = load_classifier(checkpoint, map_location)
    gaussians = fit_class_gaussians(classifier, datamodule.eval_dataloader(split), datamodule.num_classes)
    path = Path(checkpoint).parent / GAUSSIANS_FILENAME if path is None else Path(path)
    gaussians.save(path)
    return path


def load_classifier_and_gaussians(
    checkpoint: str | Path, gaussians: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> tuple[FeatureClassifier, ClassGaussians]:
    """Load a classifier checkpoint and its class Gaussians (by default ``class_gaussians.pt`` next to it).

    Args:
        checkpoint: a ClassificationTask ``.ckpt``.
        gaussians: the Gaussians file, if not next to the checkpoint.
        map_location: device to load onto.

    Returns:
        ``(classifier, gaussians)``: the classifier frozen in eval mode, the Gaussians on the same device.

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: either file is unreadable, or the Gaussians do not fit the classifier's features.
    """
    classifier = load_classifier(checkpoint, map_location)
    path = Path(checkpoint).parent / GAUSSIANS_FILENAME if gaussians is None else Path(gaussians)
    class_gaussians = ClassGaussians.load(path, map_location)
    if (class_gaussians.num_classes, class_gaussians.feature_dim) != (classifier.num_classes, classifier.feature_dim):
        raise ValueError(
            f"{path} holds {class_gaussians.num_classes} Gaussians over {class_gaussians.feature_dim} features, "
            f"the classifier has {classifier.num_classes} classes and {classifier.feature_dim} features"
        )
    return classifier, class_gaussians


def gaussians_main(args: list[str] | None = None) -> Path:
    """``cfx-gaussians``: fit class Gaussians for an existing checkpoint from the command line (no retraining).

    Example: ``cfx-gaussians --checkpoint checkpoints/mnist/last.ckpt --data cfx.data.EmbeddedMNIST``
    (DataModule arguments as ``--data.init_args.<name>``, or ``--data <config.yaml>`` with ``class_path`` and
    ``init_args``, e.g. the ``data`` section of the training config).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The path written (by default ``class_gaussians.pt`` next to the checkpoint).
    """
    parser = ArgumentParser(prog="cfx-gaussians", description=gaussians_main.__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=str, required=True, help="the classifier's .ckpt")
    parser.add_subclass_arguments(ImageDataModule, "data", required=True, help="the data it was trained on")
    parser.add_argument("--output", type=str | None, default=None, help="where to save (default: beside the ckpt)")
    parser.add_argument("--split", type=str, default="train", help="the split fitted on")
    config = parser.parse_args(args)
    datamodule = parser.instantiate_classes(config).data
    try:
        path = fit_and_save_class_gaussians(config.checkpoint, datamodule, config.output, config.split)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"class Gaussians saved to {path}")
    return path
