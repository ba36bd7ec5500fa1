"""Wachter et al.: first Adam step in closed form, Adam against the hand-written update, best valid iterate, stages.

The contract every explainer keeps (batching, input checks, ...) is in test_explainer_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from cfx.counterfactual import Wachter
from tests.explainer_helpers import (
    linear_classifier,
    queries,
    tiny_cnn,
    trained_mnist_mlp,
)


@pytest.mark.parametrize("distance", ["l1", "squared_l2"])
def test_first_step_is_adam_on_the_weighted_cross_entropy(distance: str) -> None:
    classifier = linear_classifier(seed=1, channels=2, size=3, features=4, classes=3)
    images = torch.rand(6, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        targets = (classifier(images).argmax(1) + 1) % 3
    explainer = Wachter(
        classifier, lambda_init=3.0, learning_rate=0.1, distance=distance, max_iterations=1, path_every=1
    )
    after_one = explainer.explain(images, targets).path[:, 1].flatten(1)
    # at x' = x the distance has zero gradient; Adam's first bias-corrected step is lr * g / (|g| + eps)
    matrix = classifier.head.weight.double() @ classifier.features.weight.double()
    probabilities = (images.flatten(1).double() @ matrix.T + classifier.head.bias.double()).softmax(1)
    gradient = 3.0 * (probabilities - F.one_hot(targets, 3).double()) @ matrix
    expected = (images.flatten(1).double() - 0.1 * gradient / (gradient.abs() + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(after_one, expected.float(), atol=1e-6, rtol=0)


def valid(classifier: torch.nn.Module, images: Tensor, target: int) -> Tensor:
    with torch.no_grad():
        probabilities = classifier(images).softmax(1)
    return (probabilities.argmax(1) == target) & (probabilities[:, target] >= 0.5)


def test_returns_the_closest_valid_iterate_of_the_first_successful_stage() -> None:
    classifier = linear_classifier(seed=6, channels=1, size=4, features=5, classes=3)
    images, targets = queries(classifier, 12, seed=4)
    explainer = Wachter(classifier, steps_per_lambda=10, learning_rate=0.05, max_iterations=200, path_every=1)
    result = explainer.explain(images, targets)
    searched = result.success & (result.iterations > 0)
    assert searched.sum() >= 5
    for i in torch.nonzero(searched).flatten().tolist():
        steps = int(result.iterations[i])
        assert steps % 10 == 0
        iterates = result.path[i, : steps + 1]
        ok = valid(classifier, iterates, int(targets[i]))
        assert ok.any() and not ok[: steps - 10 + 1].any()  # first valid iterate in the last stage
        distances = (iterates - images[i]).abs().flatten(1).sum(1)
        returned = (result.counterfactuals[i] - images[i]).abs().sum()
        torch.testing.assert_close(returned, distances[ok].min())
        assert valid(classifier, result.counterfactuals[i : i + 1], int(targets[i])).all()


def test_failure_returns_the_last_iterate_after_max_iterations() -> None:
    classifier = linear_classifier(seed=4, channels=1, size=3, features=4, classes=3)
    with torch.no_grad():
        classifier.head.bias[2] = -1e4
    images = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(5))
    explainer = Wachter(classifier, steps_per_lambda=5, max_iterations=23, path_every=1)
    result = explainer.explain(images, torch.full((4,), 2))
    assert not result.success.any() and (result.iterations == 23).all()
    assert torch.equal(result.counterfactuals, result.path[:, -1])
    assert not torch.equal(result.counterfactuals, images)


def hand_written_adam(classifier, images, targets, steps, lr, weight, distance):
    """The projected Adam Wachter ran before ``torch.optim.Adam``: moments and bias correction written out."""
    iterates, first, second = images.clone(), torch.zeros_like(images), torch.zeros_like(images)
    path = [iterates]
    for step in range(1, steps + 1):
        leaf = iterates.detach().requires_grad_()
        differences = leaf - images
        penalty = differences.abs() if distance == "l1" else differences.square()
        loss = weight * F.cross_entropy(classifier(leaf), targets, reduction="none") + penalty.flatten(1).sum(1)
        gradient = torch.autograd.grad(loss.sum(), leaf)[0]
        first = 0.9 * first + 0.1 * gradient
        second = 0.999 * second + 0.001 * gradient.square()
        update = (first / (1 - 0.9**step)) / ((second / (1 - 0.999**step)).sqrt() + 1e-8)
        iterates = (iterates - lr * update).clamp(0, 1)
        path.append(iterates)
    return torch.stack(path, 1)


@pytest.mark.parametrize("distance", ["l1", "squared_l2"])
def test_torch_adam_takes_the_hand_written_adam_steps(distance: str) -> None:
    classifier = linear_classifier(seed=4, channels=1, size=3, features=4, classes=3)
    with torch.no_grad():
        classifier.head.bias[2] = -1e4  # unreachable target: every step is taken
    images = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(8))
    targets = torch.full((5,), 2)
    explainer = Wachter(
        classifier,
        lambda_init=1.0,
        steps_per_lambda=100,
        learning_rate=0.02,
        distance=distance,
        max_iterations=15,
        path_every=1,
    )
    expected = hand_written_adam(classifier, images, targets, 15, 0.02, 1.0, distance)
    torch.testing.assert_close(explainer.explain(images, targets).path, expected, atol=1e-5, rtol=0)


def test_clear_errors() -> None:
    classifier = tiny_cnn()
    with pytest.raises(ValueError, match="distance"):
        Wachter(classifier, distance="l3")
    with pytest.raises(ValueError, match="lambda_growth"):
        Wachter(classifier, lambda_growth=0.5)
    with pytest.raises(ValueError, match="steps_per_lambda"):
        Wachter(classifier, steps_per_lambda=0)
    with pytest.raises(ValueError, match="learning_rate"):
        Wachter(classifier, learning_rate=0.0)


def test_reaches_targets_on_a_small_trained_model() -> None:
    classifier, _, test = trained_mnist_mlp(num_test=20)
    targets = (test["label"] + 3) % 10
    result = Wachter(classifier).explain(test["image"], targets)
    assert result.success.float().mean() >= 0.9
    assert valid(classifier, result.counterfactuals[result.success][:1], int(targets[result.success][0])).all()
    with torch.no_grad():
        probabilities = classifier(result.counterfactuals).softmax(1)
    torch.testing.assert_close(probabilities.gather(1, targets[:, None]).squeeze(1), result.target_probability)
