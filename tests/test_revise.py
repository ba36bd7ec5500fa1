"""REVISE: first latent step in closed form, per-row stopping at the confidence, the VAE left alone, clear errors.

The contract every explainer keeps (batching, input checks, ...) is in test_explainer_contract.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cfx.counterfactual import REVISE
from cfx.nn import as_classifier
from cfx.nn.generative import ConvAutoencoder, ConvVAE
from tests.explainer_helpers import MLPClassifier, identity_vae, linear_classifier, queries, random_vae


def test_first_step_is_gradient_descent_on_the_latent() -> None:
    classifier = linear_classifier(seed=1, channels=1, size=4, features=5, classes=3)
    vae = random_vae(seed=2, channels=1, size=4, latent_dim=5)
    images = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        targets = (classifier(images).argmax(1) + 1) % 3
    explainer = REVISE(classifier, vae, distance_weight=0.7, learning_rate=0.05, max_iterations=1, path_every=1)
    result = explainer.explain(images, targets)
    stepped = result.iterations == 1  # the others' decoded start was already a counterfactual
    assert stepped.sum() >= 4
    # G(z) = sigmoid(A z + b); L = CE(W G + c, t) + 0.7 * |G - x|_1; dL/dz = A^T (G (1 - G) * dL/dG)
    matrix = classifier.head.weight.double() @ classifier.features.weight.double()
    decoder_weight, decoder_bias = vae.decoder.weight.double(), vae.decoder.bias.double()
    with torch.no_grad():
        start = vae.encode(images)[0].double()
    decoded = torch.sigmoid(start @ decoder_weight.T + decoder_bias)
    probabilities = (decoded @ matrix.T + classifier.head.bias.double()).softmax(1)
    by_image = (probabilities - F.one_hot(targets, 3).double()) @ matrix
    by_image = by_image + 0.7 * (decoded - images.flatten(1).double()).sign()
    gradient = (decoded * (1 - decoded) * by_image) @ decoder_weight
    expected = torch.sigmoid((start - 0.05 * gradient) @ decoder_weight.T + decoder_bias)
    torch.testing.assert_close(result.path[stepped, 1].flatten(1), expected[stepped].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.counterfactuals, result.path[:, 1])


def test_each_row_stops_at_its_first_decoded_iterate_reaching_the_confidence() -> None:
    classifier = linear_classifier(seed=3, channels=1, size=4, features=5, classes=3)
    images, targets = queries(classifier, 16, seed=4)
    explainer = REVISE(
        classifier, identity_vae(1, 4), 0.3, learning_rate=0.3, confidence=0.7, max_iterations=40, path_every=1
    )
    result = explainer.explain(images, targets)
    searched = result.iterations > 0
    assert (result.success & searched).sum() >= 4 and (~result.success).any()
    with torch.no_grad():
        probabilities = classifier(result.path.flatten(0, 1)).softmax(1).view(16, 41, 3)
    for i in torch.nonzero(searched).flatten().tolist():
        steps, target = int(result.iterations[i]), int(targets[i])
        reached = (probabilities[i].argmax(1) == target) & (probabilities[i, :, target] >= 0.7)
        assert not reached[1:steps].any()  # path[:, 0] is the query itself
        assert bool(reached[steps]) == bool(result.success[i])
        assert steps == 40 or result.success[i]
        assert torch.equal(result.path[i, steps:], result.counterfactuals[i].expand(41 - steps, -1, -1, -1))


def test_the_vae_is_used_in_eval_mode_and_left_unchanged() -> None:
    torch.manual_seed(0)
    classifier, vae = MLPClassifier().eval(), ConvVAE().train()
    before = copy.deepcopy(vae.state_dict())
    modes: list[bool] = []
    vae.decoder.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    result = REVISE(classifier, vae, learning_rate=1e-2, max_iterations=3).explain(images, torch.tensor([0, 1, 2]))
    assert result.counterfactuals.shape == images.shape
    assert modes and not any(modes) and vae.training
    assert all(torch.equal(before[key], value) for key, value in vae.state_dict().items())
    assert all(parameter.grad is None for parameter in vae.parameters())


def test_a_vae_that_does_not_fit_the_classifier_is_refused() -> None:
    classifier = MLPClassifier()
    with pytest.raises(ValueError, match="3-channel images, the classifier 1-channel"):
        REVISE(classifier, ConvVAE(in_channels=3))
    with pytest.raises(ValueError, match="32x32 images, the classifier 28x28"):
        REVISE(classifier, ConvVAE(image_size=32))
    with pytest.raises(TypeError, match="vae must be an nn.Module with methods encode, decode, got a Linear"):
        REVISE(classifier, nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"vae\.encode must return \(mean, log_variance\), got a Tensor"):
        REVISE(classifier, ConvAutoencoder()).explain(torch.rand(2, 1, 28, 28), [0, 1])
    any_size = as_classifier(nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 1, 3)
    explainer = REVISE(any_size, identity_vae(1, 8))
    with pytest.raises(ValueError, match=r"vae \(SigmoidVAE\) takes 1x8x8 images, got 1x6x6"):
        explainer.explain(torch.rand(2, 1, 6, 6), [0, 1])


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"distance_weight": -1.0}, "distance_weight"), ({"learning_rate": 0.0}, "learning_rate")],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        REVISE(linear_classifier(), identity_vae(1, 4), **settings)
