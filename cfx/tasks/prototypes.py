"""VLK's prototypes: encode the training data with a trained autoencoder, grouped by a classifier's predictions.

The file (``class_prototypes.pt`` next to the autoencoder checkpoint) holds the training encodings and the
classifier's prediction for each (:class:`~cfx.counterfactual.vlk.ClassEncodings`): VLK's prototype of class
``t`` for a query is the mean of the ``k`` encodings of class ``t`` nearest to the query's encoding, so it is
computed per query from these. The file records the paths and SHA-256s of both checkpoints it was fitted with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from cfx.counterfactual.revise import check_image_model
from cfx.counterfactual.vlk import ClassEncodings, fit_class_encodings, load_prototypes
from cfx.data.base import ImageDataModule
from cfx.io import file_facts, file_sha256
from cfx.tasks.classification import load_classifier
from cfx.tasks.generative import load_generative

PROTOTYPES_FILENAME = "class_prototypes.pt"


def fit_and_save_prototypes(
    autoencoder_checkpoint: str | Path,
    classifier_checkpoint: str | Path,
    datamodule: ImageDataModule,
    path: str | Path | None = None,
    split: str = "train",
    map_location: str | torch.device = "cpu",
) -> Path:
    """Encode ``split`` with the autoencoder, group it by the classifier's predictions and save it atomically.

    Args:
        autoencoder_checkpoint: an AutoencoderTask ``.ckpt``.
        classifier_checkpoint: the classifier VLK will explain (a cfx task ``.ckpt``).
        datamodule: the data (its evaluation transforms are used).
        path: where to save (default: ``class_prototypes.pt`` next to the autoencoder checkpoint).
        split: the split encoded.
        map_location: device to compute on.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a checkpoint is missing.
        ValueError: a checkpoint is not of the expected kind, or the networks and the data do not fit together.
    """
    autoencoder = load_generative(autoencoder_checkpoint, map_location)
    classifier = load_classifier(classifier_checkpoint, map_location)
    try:
        check_image_model(autoencoder, "autoencoder", ("encode", "decode"), classifier)
    except TypeError as error:
        raise ValueError(f"{autoencoder_checkpoint} is not an AutoencoderTask checkpoint ({error})") from error
    if datamodule.num_classes != classifier.num_classes:
        raise ValueError(f"the data has {datamodule.num_classes} classes, the classifier {classifier.num_classes}")
    encodings = fit_class_encodings(autoencoder, classifier, datamodule.eval_dataloader(split), classifier.num_classes)
    encodings.sources = {
        "classifier": file_facts(Path(classifier_checkpoint).resolve()),
        "autoencoder": file_facts(Path(autoencoder_checkpoint).resolve()),
        "split": split,
    }
    path = Path(autoencoder_checkpoint).parent / PROTOTYPES_FILENAME if path is None else Path(path)
    encodings.save(path)
    return path


def load_checked_prototypes(
    autoencoder_checkpoint: str | Path,
    classifier_checkpoint: str | Path,
    path: str | Path | None = None,
    map_location: str | torch.device = "cpu",
) -> ClassEncodings:
    """Load the prototypes of an autoencoder, refusing a file fitted with other checkpoints.

    Args:
        autoencoder_checkpoint: the AutoencoderTask ``.ckpt`` VLK uses.
        classifier_checkpoint: the classifier ``.ckpt`` VLK explains.
        path: the prototypes file (default: ``class_prototypes.pt`` next to the autoencoder checkpoint).
        map_location: device to load onto.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not a prototypes file, or its recorded SHA-256s are not those of the two checkpoints.
    """
    path = Path(autoencoder_checkpoint).parent / PROTOTYPES_FILENAME if path is None else Path(path)
    encodings = load_prototypes(path, map_location)
    for name, checkpoint in (("autoencoder", autoencoder_checkpoint), ("classifier", classifier_checkpoint)):
        recorded = encodings.sources.get(name, {}).get("sha256")
        if recorded != file_sha256(checkpoint):
            raise ValueError(
                f"{path} was fitted with another {name} ({encodings.sources.get(name, {}).get('path')}), not "
                f"{checkpoint}: refit it with cfx-prototypes"
            )
    return encodings


def prototypes_main(args: list[str] | None = None) -> Path:
    """``cfx-prototypes``: encode the training data for VLK's prototypes from the command line.

    Example: ``cfx-prototypes --autoencoder checkpoints/autoencoder/last.ckpt --classifier
    checkpoints/mnist/last.ckpt --data cfx.data.EmbeddedMNIST`` (DataModule arguments as
    ``--data.init_args.<name>``, or ``--data <config.yaml>`` with ``class_path`` and ``init_args``).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The path written (by default ``class_prototypes.pt`` next to the autoencoder checkpoint).
    """
    parser = ArgumentParser(prog="cfx-prototypes", description=prototypes_main.__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", type=str, required=True, help="the AutoencoderTask's .ckpt")
    parser.add_argument("--classifier", type=str, required=True, help="the classifier's .ckpt")
    parser.add_subclass_arguments(ImageDataModule, "data", required=True, help="the data they were trained on")
    parser.add_argument("--output", type=str | None, default=None, help="where to save (default: beside the AE)")
    parser.add_argument("--split", type=str, default="train", help="the split encoded")
    config = parser.parse_args(args)
    datamodule = parser.instantiate_classes(config).data
    try:
        path = fit_and_save_prototypes(config.autoencoder, config.classifier, datamodule, config.output, config.split)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"class prototypes saved to {path}")
    return path
