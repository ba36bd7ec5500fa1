"""DeDUCE: first steps against closed-form gradients, change budget, settings errors, a trained model.

The contract every explainer keeps (batching, input checks, ...) is in test_explainer_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cfx.counterfactual import DeDUCE
from cfx.nn import ClassGaussians, fit_class_gaussians
from tests.explainer_helpers import (
    LinearFeatureClassifier,
    linear_classifier,
    random_gaussians,
    trained_mnist_mlp,
)


def closed_form_gradient(
    classifier: LinearFeatureClassifier, gaussians: ClassGaussians, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """DeDUCE's normalised gradient of a linear classifier, per sample, in float64 (no autograd)."""
    feature_weight = classifier.features.weight.double()
    class_weight, bias = classifier.head.weight.double(), classifier.head.bias.double()
    pixels = images.flatten(1).double()
    features = pixels @ feature_weight.T
    probabilities = (features @ class_weight.T + bias).softmax(1)
    one_hot = F.one_hot(targets, classifier.num_classes).double()
    cross_entropy = -probabilities.gather(1, targets[:, None]).squeeze(1).log()
    cross_entropy_gradient = (probabilities - one_hot) @ class_weight @ feature_weight
    gradients = []
    for i, target in enumerate(targets.tolist()):
        covariance = gaussians.covariances[target]
        density = torch.distributions.MultivariateNormal(gaussians.means[target], covariance)
        log_density = density.log_prob(features[i])
        # d(-log p)/dz = Sigma^-1 (z - mu), chained through z = W_f x
        density_gradient = torch.linalg.solve(covariance, features[i] - gaussians.means[target]) @ feature_weight
        gradients.append(cross_entropy_gradient[i] / cross_entropy[i] + density_gradient / log_density.abs())
    return torch.stack(gradients)


def linear_setup(channels: int = 2, size: int = 3, count: int = 6):
    classifier = linear_classifier(seed=1, channels=channels, size=size, features=4, classes=3)
    gaussians = random_gaussians(3, 4, seed=2)
    generator = torch.Generator().manual_seed(3)
    images = 0.25 + 0.5 * torch.rand(count, channels, size, size, generator=generator)  # no clipping in 2 steps
    with torch.no_grad():
        targets = (classifier(images).argmax(1) + 1) % 3
    return classifier, gaussians, images, targets


@pytest.mark.parametrize("pixels_per_step", [1, 3])
def test_first_step_moves_the_brute_force_pixels(pixels_per_step: int) -> None:
    classifier, gaussians, images, targets = linear_setup()
    explainer = DeDUCE(classifier, gaussians, pixels_per_step=pixels_per_step, max_iterations=1, path_every=1)
    after_one = explainer.explain(images, targets).path[:, 1]
    gradient = closed_form_gradient(classifier, gaussians, images, targets)
    expected = images.flatten(1).clone()
    for i in range(len(images)):
        for pixel in gradient[i].abs().argsort(descending=True)[:pixels_per_step].tolist():
            expected[i, pixel] -= 0.2 * gradient[i, pixel].sign()
    changed = (after_one.flatten(1) != images.flatten(1)).sum(1)
    assert (changed == pixels_per_step).all()
    torch.testing.assert_close(after_one.flatten(1), expected.float(), atol=1e-6, rtol=0)


def test_second_step_uses_raw_gradient_for_the_pick_and_momentum_for_the_sign() -> None:
    classifier, gaussians, images, targets = linear_setup()
    path = DeDUCE(classifier, gaussians, max_iterations=2, confidence=1.0, path_every=1).explain(images, targets).path
    first = closed_form_gradient(classifier, gaussians, images, targets)
    second = closed_form_gradient(classifier, gaussians, path[:, 1], targets)
    velocity = second + 0.6 * first
    expected = path[:, 1].flatten(1).clone().double()
    for i in range(len(images)):
        pixel = second[i].abs().argmax()  # every pixel has moves left (1 of 5 used at most)
        expected[i, pixel] -= 0.2 * velocity[i, pixel].sign()
    torch.testing.assert_close(path[:, 2].flatten(1), expected.clamp(0, 1).float(), atol=1e-6, rtol=0)


def test_change_budget_and_clipping_hold_on_a_long_run() -> None:
    classifier = linear_classifier(seed=4, channels=1, size=3, features=4, classes=3)
    with torch.no_grad():
        classifier.head.bias[2] = -1e4  # class 2 is unreachable: the search spends its whole budget
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(8, 1, 3, 3, generator=generator).round(decimals=1)
    images[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 0.1, 0.9, 0.0, 1.0, 0.5, 0.3])
    targets = torch.full((8,), 2)
    result = DeDUCE(classifier, random_gaussians(3, 4), max_iterations=80, path_every=1).explain(images, targets)
    path = result.path.flatten(2)  # (N, 81, 9)
    assert ((path >= 0) & (path <= 1)).all()
    steps = path[:, 1:] - path[:, :-1]
    assert ((steps != 0).sum(2) <= 1).all()  # one pixel per step
    assert (steps.abs() <= 0.2 + 1e-6).all()
    assert ((steps != 0).sum(1) <= 5).all()  # no pixel changed more than 5 times
    assert ((path[:, -1] - path[:, 0]).abs() <= 5 * 0.2 + 1e-6).all()
    assert (steps[:, 45:] == 0).all()  # 9 pixels x 5 changes: nothing moves after step 45
    assert not result.success.any() and (result.iterations == 80).all()
    assert torch.equal(result.counterfactuals, result.path[:, -1])  # a failure returns its last iterate
    assert not torch.equal(result.counterfactuals, images)


def test_gaussians_load_from_a_path(tmp_path) -> None:
    classifier, gaussians, images, targets = linear_setup()
    gaussians.save(tmp_path / "g.pt")
    from_file = DeDUCE(classifier, str(tmp_path / "g.pt"), max_iterations=5).explain(images, targets)
    in_memory = DeDUCE(classifier, gaussians, max_iterations=5).explain(images, targets)
    assert torch.equal(from_file.counterfactuals, in_memory.counterfactuals)


def test_clear_errors(tmp_path) -> None:
    classifier, gaussians, images, targets = linear_setup()
    with pytest.raises(ValueError, match="density fitted for another feature size"):
        DeDUCE(classifier, random_gaussians(3, 5))
    random_gaussians(3, 7).save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="density fitted for another feature size"):
        DeDUCE(classifier, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="max_changes"):
        DeDUCE(classifier, gaussians, max_changes=0)
    with pytest.raises(ValueError, match="momentum"):
        DeDUCE(classifier, gaussians, momentum=-0.1)


def test_reaches_targets_on_a_small_trained_model() -> None:
    classifier, train, test = trained_mnist_mlp(num_test=20)
    gaussians = fit_class_gaussians(classifier, [train], 10)
    targets = (test["label"] + 3) % 10
    result = DeDUCE(classifier, gaussians).explain(test["image"], targets)
    assert result.success.float().mean() >= 0.9
    with torch.no_grad():
        probabilities = classifier(result.counterfactuals[result.success]).softmax(1)
    assert (probabilities.argmax(1) == targets[result.success]).all()
    torch.testing.assert_close(
        probabilities.gather(1, targets[result.success, None]).squeeze(1), result.target_probability[result.success]
    )
    assert (result.target_probability[result.success] >= 0.5).all()
    changed = (result.counterfactuals != test["image"]).flatten(1).sum(1)
    assert (changed <= result.iterations).all()  # at most one pixel per step
