"""Classifier discrepancy pipeline: hand-predictable outcomes of trivial explainers on an easy binary task."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.data import SyntheticImages
from cfx.nn import SmallCNN
from cfx.tasks import ClassificationTask, load_classifier, read_checkpoint
from cfx.tasks.discrepancy import _recipe, classifier_discrepancy
from tests.trainers import quiet_trainer

SIZE = 8


def binary_task(**kwargs) -> SyntheticImages:
    """Source classes 2 (label 0) and 0 (label 1) of three smooth random patterns: trivially separable."""
    return SyntheticImages(
        num_samples=240, num_classes=3, image_size=SIZE, noise=0.1, classes=[2, 0], batch_size=16, **kwargs
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``F``: a SmallCNN trained 20 epochs with Adam (lr 3e-2) on the binary task."""
    L.seed_everything(0, verbose=False)
    network = SmallCNN(in_channels=1, num_classes=2, channels=(4, 8), hidden=16, image_size=SIZE)
    task = ClassificationTask(network, optimizer=functools.partial(torch.optim.Adam, lr=3e-2))
    trainer = quiet_trainer(max_epochs=20)
    trainer.fit(task, datamodule=binary_task())
    path = tmp_path_factory.mktemp("discrepancy") / "f.ckpt"
    trainer.save_checkpoint(path)
    return path


def predict_success(classifier, counterfactuals: Tensor, targets: Tensor) -> CounterfactualResult:
    """A result whose success is the classifier's own verdict (target predicted with probability >= 0.5)."""
    with torch.no_grad():
        probabilities = classifier(counterfactuals).softmax(dim=1)
    target_probability = probabilities.gather(1, targets[:, None]).squeeze(1)
    return CounterfactualResult(
        counterfactuals=counterfactuals,
        success=(probabilities.argmax(1) == targets) & (target_probability >= 0.5),
        target_probability=target_probability,
        original_prediction=torch.zeros_like(targets),
        iterations=torch.zeros_like(targets),
    )


class RealClassOne(Explainer):
    """The ideal explainer: answers each query with a real class-1 image (picked by the query's index)."""

    def __init__(self, classifier, pool: Tensor):
        super().__init__(classifier)
        self.pool = pool
        self.seen_indices: list[Tensor] = []

    def explain(self, images, targets, indices=None):
        self.check_query(images, targets)
        self.seen_indices.append(indices)
        return predict_success(self.classifier, self.pool[indices % len(self.pool)], targets)


class Marker(Explainer):
    """A shortcut explainer: stamps a white 3x3 corner on the query. ``F^c`` learns the stamp, not class 1."""

    def explain(self, images, targets, indices=None):
        self.check_query(images, targets)
        stamped = images.clone()
        stamped[:, :, :3, :3] = 1.0
        return predict_success(self.classifier, stamped, targets)


def class_one_pool(datamodule: SyntheticImages) -> Tensor:
    train = datamodule.dataset("train")
    return torch.stack([sample["image"] for sample in train if sample["label"] == 1])


def train_class_zero_indices(datamodule: SyntheticImages) -> set[int]:
    return {int(sample["index"]) for sample in datamodule.dataset("train") if sample["label"] == 0}


def test_real_class_one_counterfactuals_give_no_discrepancy(checkpoint: Path):
    datamodule = binary_task()
    explainers = []

    def build(classifier):
        explainers.append(RealClassOne(classifier, class_one_pool(datamodule)))
        return explainers[0]

    result = classifier_discrepancy(
        checkpoint, datamodule, build, max_queries=20, query_batch_size=8, batch_size=8, seed=1, query_seed=2
    )
    # F, F_ref and F^c all separate the two patterns perfectly: the counterfactuals are real class-1 images
    assert result.classifier_accuracy == 1.0
    assert result.reference_accuracy == 1.0
    assert result.counterfactual_accuracy == 1.0
    assert result.reference_class_accuracy == result.counterfactual_class_accuracy == (1.0, 1.0)
    assert result.discrepancy == 0.0
    assert result.success_rate == 1.0
    # 20 distinct class-0 training images, explained in batches of 8 with their dataset indices
    assert len(result.indices) == 20 and len(set(result.indices.tolist())) == 20
    assert set(result.indices.tolist()) <= train_class_zero_indices(datamodule)
    assert [len(seen) for seen in explainers[0].seen_indices] == [8, 8, 4]
    assert torch.equal(torch.cat(explainers[0].seen_indices), result.indices)
    assert result.queries.shape == (20, 1, SIZE, SIZE)
    assert result.explanation.counterfactuals.shape == (20, 1, SIZE, SIZE)


def test_shortcut_counterfactuals_give_chance_accuracy(checkpoint: Path):
    datamodule = binary_task()
    classifier = load_classifier(checkpoint)
    result = classifier_discrepancy(checkpoint, datamodule, Marker(classifier), max_queries=20, seed=1)
    # F^c separates stamped from unstamped class-0 images; the real class-1 test images carry no stamp, so it
    # calls every test image class 0: accuracy = the class-0 share of the balanced test split
    test_labels = torch.stack([sample["label"] for sample in datamodule.dataset("test")])
    assert (test_labels == 0).float().mean() == 0.5
    assert result.counterfactual_accuracy == 0.5
    assert result.counterfactual_class_accuracy == (1.0, 0.0)  # every real class-1 test image called class 0
    assert result.reference_accuracy == 1.0
    assert result.reference_class_accuracy == (1.0, 1.0)
    assert result.discrepancy == 0.5
    stamped = result.queries.clone()
    stamped[:, :, :3, :3] = 1.0
    assert torch.equal(result.explanation.counterfactuals, stamped)
    with torch.no_grad():
        expected_success = (classifier(stamped).argmax(1) == 1).float().mean().item()
    assert result.success_rate == pytest.approx(expected_success)


def test_full_class_zero_set_is_compared_with_f(checkpoint: Path):
    datamodule = binary_task()
    result = classifier_discrepancy(
        checkpoint, datamodule, functools.partial(RealClassOne, pool=class_one_pool(datamodule)), max_epochs=2
    )
    assert set(result.indices.tolist()) == train_class_zero_indices(datamodule)
    assert result.reference_accuracy == result.classifier_accuracy == 1.0
    assert result.discrepancy == pytest.approx(1.0 - result.counterfactual_accuracy)


def test_recipe_is_read_from_the_checkpoint(checkpoint: Path, tmp_path: Path):
    # a Python-built task: the network module is re-initialised, the optimiser callable reused
    build, optimizer, lr_scheduler, epochs = _recipe(read_checkpoint(checkpoint), checkpoint)
    trained, fresh = load_classifier(checkpoint), build()
    assert isinstance(fresh, SmallCNN) and fresh.training and epochs == 20 and lr_scheduler is None
    assert all(fresh.state_dict()[k].shape == v.shape for k, v in trained.state_dict().items())
    assert not torch.equal(fresh.fc.weight, trained.fc.weight)
    adam = optimizer(fresh.parameters())
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 3e-2
    # a `cfx fit` checkpoint: class_path configs, epochs from the public `epoch` key
    network = {"class_path": "cfx.nn.SmallCNN", "init_args": {"num_classes": 2, "channels": [3], "hidden": 5}}
    state = {
        "hyper_parameters": {
            "network": network,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 7}},
        },
        "epoch": 12,
    }
    build, optimizer, lr_scheduler, epochs = _recipe(state, tmp_path / "cli.ckpt")
    network = build()
    sgd = optimizer(network.parameters())
    assert isinstance(network, SmallCNN) and network.stage_channels == (3,) and epochs == 12
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.5 and sgd.defaults["momentum"] == 0.9
    assert lr_scheduler(sgd).step_size == 7


def test_bad_arguments(checkpoint: Path):
    explainer = functools.partial(Marker)
    with pytest.raises(ValueError, match="binary task"):
        classifier_discrepancy(checkpoint, SyntheticImages(num_classes=3, image_size=SIZE), explainer)
    with pytest.raises(ValueError, match="max_queries"):
        classifier_discrepancy(checkpoint, binary_task(), explainer, max_queries=0)
    with pytest.raises(ValueError, match="batch_size"):
        classifier_discrepancy(checkpoint, binary_task(), explainer, batch_size=0)
    with pytest.raises(ValueError, match="12 px"):
        classifier_discrepancy(checkpoint, SyntheticImages(num_classes=2, image_size=12), explainer)
