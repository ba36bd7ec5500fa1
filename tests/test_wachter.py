"""Wachter et al.: first Adam step in closed form, best valid iterate, lambda stages, batch invariance, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from cfx.counterfactual import Wachter
from tests.explainer_helpers import (
    assert_batch_invariant,
    assert_unchanged_where_predicted,
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


def test_batch_of_64_equals_single_calls_and_is_deterministic() -> None:
    classifier = tiny_cnn(seed=0)
    images, targets = queries(classifier, 64, seed=1)
    explainer = Wachter(classifier, steps_per_lambda=10, max_iterations=40, path_every=7)
    assert_batch_invariant(explainer, images, targets)
    first, second = explainer.explain(images, targets), explainer.explain(images, targets)
    assert torch.equal(first.counterfactuals, second.counterfactuals) and torch.equal(first.path, second.path)
    assert_unchanged_where_predicted(first, images, targets)


def test_clear_errors() -> None:
    classifier = tiny_cnn()
    images, targets = queries(classifier, 4)
    with pytest.raises(ValueError, match="distance"):
        Wachter(classifier, distance="l3")
    with pytest.raises(ValueError, match="lambda_growth"):
        Wachter(classifier, lambda_growth=0.5)
    with pytest.raises(ValueError, match="steps_per_lambda"):
        Wachter(classifier, steps_per_lambda=0)
    explainer = Wachter(classifier)
    with pytest.raises(ValueError, match=r"targets must be classes 0\.\.2"):
        explainer.explain(images, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="NaN"):
        explainer.explain(images.masked_fill(images > 0.9, torch.nan), targets)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explainer.explain(images * 2, targets)
    with pytest.raises(ValueError, match="channel"):
        explainer.explain(images.repeat(1, 3, 1, 1), targets)


def test_reaches_targets_on_a_small_trained_model() -> None:
    classifier, _, test = trained_mnist_mlp(num_test=20)
    targets = (test["label"] + 3) % 10
    result = Wachter(classifier).explain(test["image"], targets)
    assert result.success.float().mean() >= 0.9
    assert valid(classifier, result.counterfactuals[result.success][:1], int(targets[result.success][0])).all()
    with torch.no_grad():
        probabilities = classifier(result.counterfactuals).softmax(1)
    torch.testing.assert_close(probabilities.gather(1, targets[:, None]).squeeze(1), result.target_probability)
