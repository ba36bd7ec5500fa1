"""JSMA: first steps against closed-form gradients, the retirement rule, the shared settings checks, a trained model.

The contract every explainer keeps (batching, input checks, ...) is in test_explainer_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cfx.counterfactual import JSMA
from tests.explainer_helpers import (
    LinearFeatureClassifier,
    linear_classifier,
    tiny_cnn,
    trained_mnist_mlp,
)


def closed_form_gradient(
    classifier: LinearFeatureClassifier, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """grad_x CE(W_c W_f x + b, t) = (W_c W_f)^T (softmax - onehot), per sample, float64."""
    matrix = classifier.head.weight.double() @ classifier.features.weight.double()
    probabilities = (images.flatten(1).double() @ matrix.T + classifier.head.bias.double()).softmax(1)
    return (probabilities - F.one_hot(targets, classifier.num_classes).double()) @ matrix


def test_first_step_moves_the_brute_force_pixel() -> None:
    classifier = linear_classifier(seed=1, channels=2, size=3, features=4, classes=3)
    images = 0.25 + 0.5 * torch.rand(6, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        targets = (classifier(images).argmax(1) + 1) % 3
    after_one = JSMA(classifier, max_iterations=1, path_every=1).explain(images, targets).path[:, 1].flatten(1)
    gradient = closed_form_gradient(classifier, images, targets)
    pixels = gradient.abs().argmax(1)
    expected = images.flatten(1).clone()
    expected[torch.arange(6), pixels] -= 0.2 * gradient[torch.arange(6), pixels].sign().float()
    assert ((after_one != images.flatten(1)).sum(1) == 1).all()
    torch.testing.assert_close(after_one, expected, atol=1e-6, rtol=0)


def test_a_pick_clipped_at_a_bound_is_retired_and_the_next_pixel_moves() -> None:
    classifier = linear_classifier(seed=2, channels=1, size=3, features=4, classes=3)
    image = torch.full((1, 1, 3, 3), 0.5)
    target = classifier(image).argmin(1)
    top = closed_form_gradient(classifier, image, target)[0].abs().argmax()
    # put the most salient pixel on the bound its step would push it through
    image.view(-1)[top] = 0.0 if closed_form_gradient(classifier, image, target)[0, top] > 0 else 1.0
    gradient = closed_form_gradient(classifier, image, target)[0]
    assert gradient.abs().argmax() == top and (image.view(-1)[top] == 0) == (gradient[top] > 0)
    assert classifier(image).argmax(1) != target
    path = JSMA(classifier, max_iterations=2, confidence=1.0, path_every=1).explain(image, target).path[0].flatten(1)
    assert torch.equal(path[1], path[0])  # the clipped move changed nothing ...
    second = gradient.abs().argsort(descending=True)[1]  # ... and retired the pixel: the runner-up moves next
    expected = path[0].clone()
    expected[second] = (expected[second] - 0.2 * gradient[second].sign()).clamp(0, 1)
    torch.testing.assert_close(path[2], expected, atol=1e-6, rtol=0)


def test_a_pixel_that_reached_a_bound_never_moves_again() -> None:
    classifier = linear_classifier(seed=4, channels=1, size=3, features=4, classes=3)
    with torch.no_grad():
        classifier.head.bias[2] = -1e4  # unreachable target: a long run
    images = torch.rand(8, 1, 3, 3, generator=torch.Generator().manual_seed(5)).round(decimals=1)
    result = JSMA(classifier, max_iterations=60, path_every=1).explain(images, torch.full((8,), 2))
    path = result.path.flatten(2)
    assert ((path >= 0) & (path <= 1)).all()
    steps = path[:, 1:] - path[:, :-1]
    assert ((steps != 0).sum(2) <= 1).all()
    landed = (steps != 0) & ((path[:, 1:] == 0) | (path[:, 1:] == 1))  # (N, steps, pixels)
    retired_before = landed.cumsum(1) - landed.long() > 0
    assert not (retired_before & (steps != 0)).any()
    assert landed.any()  # the rule was exercised
    assert not result.success.any() and torch.equal(result.counterfactuals, result.path[:, -1])  # last iterate


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pixels_per_step": 0}, "pixels_per_step"),
        ({"step_size": 0.0}, "step_size"),
        ({"confidence": 1.5}, r"confidence must lie in \(0, 1\]"),
        ({"confidence": 0.0}, r"confidence must lie in \(0, 1\]"),
        ({"max_iterations": -1}, "max_iterations must be >= 0"),
        ({"path_every": 0}, "path_every must be None or >= 1"),
        ({"stop_check_every": 0}, "stop_check_every must be >= 1"),
    ],
)
def test_bad_settings_raise(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JSMA(tiny_cnn(), **options)


def test_reaches_targets_on_a_small_trained_model() -> None:
    classifier, _, test = trained_mnist_mlp(num_test=20)
    targets = (test["label"] + 3) % 10
    result = JSMA(classifier).explain(test["image"], targets)
    assert result.success.float().mean() >= 0.9
    with torch.no_grad():
        probabilities = classifier(result.counterfactuals[result.success]).softmax(1)
    assert (probabilities.argmax(1) == targets[result.success]).all()
    assert (probabilities.gather(1, targets[result.success, None]) >= 0.5).all()
