"""The pixel-step searches' fast path: folded batch norm, baked spectral norm, channels-last, bfloat16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from cfx.counterfactual import JSMA, DeDUCE
from cfx.nn import FeatureClassifier, ResNet
from cfx.nn.folding import bake_parametrizations, fold_into_convolution, inference_copy
from tests.explainer_helpers import queries, random_gaussians


def _resnet(spectral_norm: bool, seed: int = 0) -> ResNet:
    """A tiny ResNet whose batch norms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    network = ResNet(
        in_channels=1,
        num_classes=4,
        width=4,
        blocks=(1, 1),
        spectral_norm=spectral_norm,
        activation="leaky_relu" if spectral_norm else "relu",
        avgpool_shortcut=spectral_norm,
        image_size=8,
    )
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        head = network.fc.parametrizations.weight.original if spectral_norm else network.fc.weight
        head.mul_(40)  # logits that respond to a few pixels, so that searches succeed within a few dozen steps
    return network.eval()


def _logits_and_input_gradient(network: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = images.clone().requires_grad_(True)
    logits = network(leaf)
    (gradient,) = torch.autograd.grad(logits.log_softmax(1)[:, 1].sum(), leaf)
    return logits.detach(), gradient


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_the_folded_copy_has_the_logits_and_input_gradients_of_the_original(spectral_norm):
    network = _resnet(spectral_norm)
    before = copy.deepcopy(network.state_dict())
    folded = inference_copy(network)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert not any(parametrize.is_parametrized(module) for module in folded.modules())
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    expected, expected_gradient = _logits_and_input_gradient(network, images)
    actual, actual_gradient = _logits_and_input_gradient(folded, images)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual_gradient, expected_gradient, rtol=1e-4, atol=1e-6)
    # The original is untouched: still parametrised, same weights, and it still runs (a deep copy shares the
    # parametrised class, which torch's remove_parametrizations would have edited).
    assert parametrize.is_parametrized(network.stem[0]) == spectral_norm
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in before.items())
    torch.testing.assert_close(network(images), expected, rtol=0, atol=0)


def test_folding_one_convolution_matches_the_closed_form():
    convolution = nn.Conv2d(2, 3, 1, bias=True)
    batch_norm = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        convolution.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]]).view(3, 2, 1, 1))
        convolution.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
        batch_norm.running_mean.copy_(torch.tensor([1.0, -2.0, 0.0]))
        batch_norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
        batch_norm.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        batch_norm.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    batch_norm.eps = 0.0
    fold_into_convolution(convolution, batch_norm)
    # scale = gamma / sqrt(var) = (1, 1, -2); bias = (b - mean) * scale + beta
    expected_weight = torch.tensor([[1.0, 2.0], [0.0, -1.0], [-6.0, -2.0]]).view(3, 2, 1, 1)
    assert torch.equal(convolution.weight, expected_weight)
    assert torch.equal(convolution.bias, torch.tensor([-0.5, 3.0, 4.0]))


class _MisorderedNetwork(FeatureClassifier):
    """Registers a batch norm right after a convolution but applies it before: folding must be refused."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.num_classes, self.image_size, self.feature_dim = 3, 2, 4, 3
        self.convolution = nn.Conv2d(3, 3, 1)
        self.batch_norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.batch_norm.running_mean.fill_(0.7)
            self.batch_norm.running_var.fill_(3.0)
        self.eval()

    def forward_features(self, images):
        maps = self.convolution(self.batch_norm(images))
        return maps.mean((2, 3)), [maps]

    def classify(self, features):
        return self.fc(features)


def test_a_batch_norm_that_does_not_follow_its_convolution_is_refused():
    with pytest.raises(ValueError, match="fold_batch_norm=False"):
        inference_copy(_MisorderedNetwork())
    inference_copy(_MisorderedNetwork(), fold_batch_norm=False)  # baking alone is always exact


def test_baking_counts_and_freezes_every_parametrised_tensor():
    network = _resnet(spectral_norm=True)
    layers = sum(isinstance(module, nn.Conv2d | nn.Linear) for module in network.modules())
    copied = copy.deepcopy(network)
    assert bake_parametrizations(copied) == layers
    baked = [module for module in copied.modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    assert all(type(module) in (nn.Conv2d, nn.Linear) for module in baked)  # the plain classes again
    assert all(not module.weight.requires_grad for module in baked)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(copied(images), network(images), rtol=1e-6, atol=1e-6)


FAST_OPTIONS = [{"fold_batch_norm": True}, {"fold_batch_norm": True, "channels_last": True}]


@pytest.mark.parametrize("options", FAST_OPTIONS, ids=["fold", "fold+channels_last"])
@pytest.mark.parametrize("method", ["deduce", "jsma"])
def test_fast_path_counterfactuals_equal_the_default_paths(method, options):
    network = _resnet(spectral_norm=method == "deduce", seed=1)
    images, targets = queries(network, 16, seed=4)

    def build(**fast):
        if method == "deduce":
            gaussians = random_gaussians(network.num_classes, network.feature_dim)
            return DeDUCE(network, gaussians, confidence=0.3, max_iterations=80, **fast)
        return JSMA(network, confidence=0.3, max_iterations=80, **fast)

    before = copy.deepcopy(network.state_dict())
    default, fast = build().explain(images, targets), build(**options).explain(images, targets)
    assert default.success.sum() >= 4 and (default.iterations > 5).sum() >= 4  # real searches
    # Folding changes the logits' last bits only: every pixel choice and stopping step is the same here.
    assert torch.equal(fast.counterfactuals, default.counterfactuals)
    assert torch.equal(fast.iterations, default.iterations) and torch.equal(fast.success, default.success)
    torch.testing.assert_close(fast.target_probability, default.target_probability, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in before.items())


def test_the_users_classifier_keeps_its_mode_and_weights_after_a_fast_search():
    network = _resnet(spectral_norm=True).train()
    before = copy.deepcopy(network.state_dict())
    images, targets = queries(_resnet(spectral_norm=True), 6, seed=5)
    explainer = DeDUCE(network, random_gaussians(4, network.feature_dim), max_iterations=10, fold_batch_norm=True)
    explainer.explain(images, targets)
    assert network.training
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in before.items())
    assert explainer.search_network is not network and not explainer.search_network.training


def test_bfloat16_runs_the_network_in_bfloat16_and_hands_float32_on():
    network = _resnet(spectral_norm=True)
    images, targets = queries(network, 8, seed=6)
    gaussians = random_gaussians(network.num_classes, network.feature_dim)
    explainer = DeDUCE(network, gaussians, max_iterations=40, fold_batch_norm=True, bfloat16=True)
    features, _ = explainer.search_network.forward_features(images)
    assert features.dtype == torch.float32
    exact = network.forward_features(images)[0]
    error = (features - exact).abs().max() / exact.abs().max()
    assert 1e-6 < error < 5e-2  # rounded to bfloat16 (about 3 digits), not float32
    result = explainer.explain(images, targets)
    assert result.counterfactuals.dtype == torch.float32 and result.target_probability.dtype == torch.float32
