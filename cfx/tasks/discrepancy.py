"""Classifier discrepancy (DISC §4): do counterfactuals carry enough of the target class to train a classifier?"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.data.base import ImageDataModule, IndexedSamples
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.evaluation import evaluation_mode
from cfx.tasks.classification import (
    ClassificationTask,
    build_task,
    check_data_matches,
    frozen_classifier,
    read_checkpoint,
)


@dataclass(frozen=True)
class DiscrepancyResult:
    """What :func:`classifier_discrepancy` returns.

    Attributes:
        classifier_accuracy: ``Acc(F, test)`` of the explained classifier.
        reference_accuracy: test accuracy of the reference the discrepancy is taken against: ``F`` itself (all
            class-0 training images queried) or ``F_ref`` trained on the real subset (``max_queries``).
        counterfactual_accuracy: ``Acc(F^c, test)``.
        reference_class_accuracy: the reference's test accuracy on class 0 and on class 1 (per-class recall).
        counterfactual_class_accuracy: ``F^c``'s test accuracy on class 0 and on class 1: a counterfactual set
            that does not carry class 1's semantics shows as a low class-1 value.
        discrepancy: ``reference_accuracy - counterfactual_accuracy`` (lower = better counterfactuals).
        success_rate: fraction of queries whose counterfactual reached class 1 by the explainer's criterion.
        indices: ``(Q,)`` dataset indices of the class-0 queries.
        queries: ``(Q, C, H, W)`` the queries (evaluation transform applied).
        explanation: the explainer's results for the queries, concatenated over batches (without paths).
        seconds: wall-clock time of all ``explain`` calls.
    """

    classifier_accuracy: float
    reference_accuracy: float
    counterfactual_accuracy: float
    reference_class_accuracy: tuple[float, float]
    counterfactual_class_accuracy: tuple[float, float]
    discrepancy: float
    success_rate: float
    indices: Tensor
    queries: Tensor
    explanation: CounterfactualResult
    seconds: float


class _ImageTensors(Dataset):
    """Float images in [0, 1] with labels as cfx sample dicts (``index`` = position), optionally transformed."""

    def __init__(self, images: Tensor, labels: Tensor, transform: nn.Module | None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        image = self.images[position]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": self.labels[position], "index": torch.tensor(position)}


class _DiscrepancyData(L.LightningDataModule):
    """Trains on given tensors and tests on the test split of the binary task's DataModule."""

    def __init__(self, images: Tensor, labels: Tensor, source: ImageDataModule, batch_size: int):
        super().__init__()
        self.train_set = _ImageTensors(images, labels, source.train_transform)
        self.source, self.batch_size = source, batch_size
        self.in_channels, self.image_size, self.num_classes = source.in_channels, source.image_size, 2

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=len(self.train_set) > self.batch_size
        )

    def test_dataloader(self) -> DataLoader:
        return self.source.eval_dataloader("test")


def _recipe(
    payload: dict, checkpoint: str | Path
) -> tuple[Callable[[], FeatureClassifier], Callable, Callable | None, int | None]:
    """How ``F`` was trained: a fresh-network builder, the optimiser and scheduler callables, its epochs (if known).

    The epochs are the checkpoint's public ``epoch`` key: the epochs completed when it was written.
    """
    hyper_parameters = payload.get("hyper_parameters") or {}
    network = hyper_parameters.get("network")
    if isinstance(network, dict) and "class_path" in network:
        build = functools.partial(instantiate_class, (), network)
    elif isinstance(network, nn.Module):
        build = functools.partial(_fresh_copy, network)
    else:
        raise ValueError(f"{checkpoint} records no `network` hyper-parameter (a class_path config or a module)")

    def callable_of(config):
        return functools.partial(instantiate_class, init=config) if isinstance(config, dict) else config

    optimizer = callable_of(hyper_parameters.get("optimizer", torch.optim.Adam))
    return build, optimizer, callable_of(hyper_parameters.get("lr_scheduler")), payload.get("epoch")


def _fresh_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with every submodule's ``reset_parameters`` applied (fresh initialisation)."""
    fresh = copy.deepcopy(network).train().requires_grad_(True)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def _trainer(max_epochs: int, accelerator: str) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def _test_accuracies(network: nn.Module, data: _DiscrepancyData) -> tuple[float, tuple[float, float]]:
    """``network``'s accuracy on the test split of the binary task, overall and on class 0 / class 1."""
    device = next(network.parameters()).device
    correct, count = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with evaluation_mode(network), torch.no_grad():
        for batch in data.test_dataloader():
            labels = batch["label"]
            predictions = network(batch["image"].to(device)).argmax(dim=1).cpu()
            count += torch.bincount(labels, minlength=2)
            correct += torch.bincount(labels[predictions == labels], minlength=2)
    if (count == 0).any():
        raise ValueError(f"the binary task's test split needs images of both classes, it has {count.tolist()}")
    per_class = correct / count
    return float(correct.sum() / count.sum()), (float(per_class[0]), float(per_class[1]))


def classifier_discrepancy(
    checkpoint: str | Path,
    datamodule: ImageDataModule,
    explainer: Explainer | Callable[[FeatureClassifier], Explainer],
    max_queries: int | None = None,
    query_batch_size: int = 32,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    query_seed: int = 0,
    accelerator: str = "cpu",
) -> DiscrepancyResult:
    """DISC's classifier discrepancy ``CD = Acc(F, test) - Acc(F^c, test)`` of an explainer on a binary task.

    The binary task ``(X0, X1)`` is ``datamodule`` built with ``classes=[a, b]`` (relabelled 0 / 1). Every
    class-0 training image is explained towards class 1 (batches of ``query_batch_size``, ``indices`` = dataset
    indices, evaluation transform applied); ``F^c`` - a fresh network of ``F``'s architecture, trained as a
    :class:`ClassificationTask` (cross-entropy) with ``F``'s optimiser, scheduler and number of epochs, read from
    the checkpoint's hyper-parameters, and the DataModule's batch size (or ``batch_size``) and training
    transform - learns ``[X0, X̄1]`` with labels ``[0, 1]``. Every counterfactual the explainer returns is used,
    also those of failed queries (their success rate is reported). A good explainer moves each image into class 1
    with the class's semantics, so ``F^c`` generalises to real class-1 images and ``CD`` is small.

    Adaptation for small compute (``max_queries``): explaining all of ``X0`` is expensive for optimisation-based
    explainers on a CPU, so ``max_queries`` explains a subset of ``n = min(max_queries, |X0|)`` class-0 training
    images drawn with ``query_seed``. ``F^c`` trained on ``2n`` images cannot be compared with ``F`` trained on the full
    set (the difference would mostly measure the data size), so a reference ``F_ref`` is trained exactly like
    ``F^c`` (same architecture, recipe, seed and batch order) on the same ``n`` queries plus ``n`` real class-1
    training images drawn with ``query_seed``: ``CD = Acc(F_ref, test) - Acc(F^c, test)`` and the two classifiers
    differ only in whether the class-1 half is real or counterfactual. ``Acc(F, test)`` is reported as well.
    With ``max_queries=None`` the reference is ``F`` itself, as in the paper.

    Args:
        checkpoint: ``.ckpt`` of ``F`` written by ``cfx fit`` (any task with a ``network``) or by a Python-built
            ClassificationTask (whose network module is re-initialised with ``reset_parameters``).
        datamodule: the binary task (``num_classes == 2``, matching ``F``).
        explainer: an explainer of ``F``, or a callable building one from ``F`` (e.g.
            ``functools.partial(DISC, prior="inr")``), which then receives the checkpoint's network.
        max_queries: explain only this many class-0 training images (see above); ``None`` = all.
        query_batch_size: queries per ``explain`` call.
        max_epochs: epochs of ``F^c`` / ``F_ref``; ``None`` = ``F``'s (the checkpoint's ``epoch``: epochs completed).
        batch_size: training batch size of ``F^c`` / ``F_ref``; ``None`` = the DataModule's. A smaller one keeps the
            number of optimiser steps up on a ``max_queries`` subset.
        seed: seed of the network initialisation and the batch order of ``F^c`` and ``F_ref`` (both get the same).
        query_seed: seed of the query subset and of the real class-1 subset (``max_queries``).
        accelerator: Lightning accelerator for training and testing.

    Returns:
        The accuracies, the discrepancy, the success rate and the counterfactuals.
    """
    if datamodule.num_classes != 2:
        raise ValueError(
            f"classifier discrepancy needs a binary task (a DataModule with classes=[a, b]), got "
            f"{type(datamodule).__name__} with {datamodule.num_classes} classes"
        )
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
    if any(value is not None and value < 1 for value in (query_batch_size, max_epochs, batch_size)):
        raise ValueError(
            f"query_batch_size, max_epochs and batch_size must be >= 1, got {query_batch_size}, {max_epochs}, "
            f"{batch_size}"
        )
    payload = read_checkpoint(checkpoint)
    classifier = frozen_classifier(build_task(payload, checkpoint), checkpoint)
    check_data_matches(classifier, datamodule)
    build, optimizer, lr_scheduler, recorded_epochs = _recipe(payload, checkpoint)
    epochs = max_epochs or recorded_epochs
    if not epochs:
        raise ValueError(f"{checkpoint} records no completed training epochs; pass max_epochs")
    if not isinstance(explainer, Explainer):
        explainer = explainer(classifier)

    train = datamodule.dataset("train")
    clean = IndexedSamples(train.source, train.indices, train.label_map, datamodule.eval_transform)
    labels = train.label_map[train.source.labels[train.indices]]
    class0, class1 = (labels == 0).nonzero().squeeze(1), (labels == 1).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(query_seed)
    if max_queries is not None:
        count = min(max_queries, len(class0))
        if count > len(class1):
            raise ValueError(
                f"max_queries={max_queries} needs {count} class-1 training images, the task has {len(class1)}"
            )
        class0 = class0[torch.randperm(len(class0), generator=generator)[:count]].sort().values
        class1 = class1[torch.randperm(len(class1), generator=generator)[:count]].sort().values

    results, queries, indices, seconds = [], [], [], 0.0
    for batch in DataLoader(Subset(clean, class0.tolist()), batch_size=query_batch_size):
        start = time.perf_counter()
        results.append(explainer.explain(batch["image"], torch.ones_like(batch["label"]), batch["index"]))
        seconds += time.perf_counter() - start
        queries.append(batch["image"])
        indices.append(batch["index"])
    fields = ("counterfactuals", "success", "target_probability", "original_prediction", "iterations")
    explanation = CounterfactualResult(**{name: torch.cat([getattr(r, name) for r in results]) for name in fields})
    queries = torch.cat(queries)
    counterfactuals = explanation.counterfactuals.detach().float().cpu().clamp(0, 1)
    binary_labels = torch.cat([torch.zeros(len(queries)), torch.ones(len(queries))]).long()

    def train_and_test(images: Tensor) -> tuple[float, tuple[float, float]]:
        data = _DiscrepancyData(images, binary_labels, datamodule, batch_size or datamodule.batch_size)
        L.seed_everything(seed, verbose=False)
        task = ClassificationTask(build(), optimizer, lr_scheduler)
        _trainer(epochs, accelerator).fit(task, datamodule=data)
        return _test_accuracies(task.network, data)

    evaluation = _DiscrepancyData(queries, binary_labels[: len(queries)], datamodule, datamodule.batch_size)
    classifier_accuracies = _test_accuracies(classifier, evaluation)
    counterfactual_accuracy, counterfactual_class_accuracy = train_and_test(torch.cat([queries, counterfactuals]))
    if max_queries is None:
        reference_accuracy, reference_class_accuracy = classifier_accuracies
    else:
        real = torch.cat([batch["image"] for batch in DataLoader(Subset(clean, class1.tolist()), query_batch_size)])
        reference_accuracy, reference_class_accuracy = train_and_test(torch.cat([queries, real]))
    return DiscrepancyResult(
        classifier_accuracy=classifier_accuracies[0],
        reference_accuracy=reference_accuracy,
        counterfactual_accuracy=counterfactual_accuracy,
        reference_class_accuracy=reference_class_accuracy,
        counterfactual_class_accuracy=counterfactual_class_accuracy,
        discrepancy=reference_accuracy - counterfactual_accuracy,
        success_rate=float(explanation.success.float().mean()),
        indices=torch.cat(indices),
        queries=queries,
        explanation=explanation,
        seconds=seconds,
    )
