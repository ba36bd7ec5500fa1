from __future__ import annotations

import pytest
import torch
from torch import nn

from cfx.nn import ResNet, SmallCNN, SoftSpectralNorm, TimmClassifier, apply_soft_spectral_norm


def _largest_singular_value(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2))


@pytest.mark.parametrize("scale", [10.0, 2.0])
def test_soft_spectral_norm_caps_sigma_at_coeff_and_leaves_small_weights(scale):
    torch.manual_seed(0)
    layer = nn.Linear(20, 30)
    with torch.no_grad():
        layer.weight.mul_(scale / _largest_singular_value(layer.weight))
    raw = layer.weight.detach().clone()
    apply_soft_spectral_norm(layer, coeff=4.0)
    layer.train()
    for _ in range(30):  # one power iteration per training forward
        layer(torch.randn(2, 20))
    expected = raw / max(1.0, scale / 4.0)
    assert torch.allclose(layer.weight, expected, rtol=1e-4, atol=1e-6)
    assert _largest_singular_value(layer.weight) == pytest.approx(min(scale, 4.0), rel=1e-4)


def test_soft_spectral_norm_on_conv_uses_the_reshaped_matrix_and_freezes_in_eval():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight.mul_(9.0 / _largest_singular_value(conv.weight))
    apply_soft_spectral_norm(conv, coeff=3.0)
    parametrization = conv.parametrizations.weight[0]
    assert isinstance(parametrization, SoftSpectralNorm)
    conv.train()
    for _ in range(30):
        conv(torch.randn(1, 3, 8, 8))
    assert _largest_singular_value(conv.weight) == pytest.approx(3.0, rel=1e-4)
    conv.eval()
    u_before = parametrization._u.clone()
    conv(torch.randn(1, 3, 8, 8))
    assert torch.equal(parametrization._u, u_before)
    with pytest.raises(ValueError, match="must be positive"):
        SoftSpectralNorm(torch.ones(2, 2), coeff=0)


def test_resnet_shapes_features_and_stage_maps():
    network = ResNet(
        in_channels=1,
        num_classes=10,
        width=4,
        spectral_norm=True,
        activation="leaky_relu",
        avgpool_shortcut=True,
    )
    images = torch.rand(3, 1, 28, 28)
    features, stage_maps = network.forward_features(images)
    assert features.shape == (3, 32) and network.feature_dim == 32
    assert [tuple(m.shape[1:]) for m in stage_maps] == [(4, 28, 28), (8, 14, 14), (16, 7, 7), (32, 4, 4)]
    assert network.stage_channels == (4, 8, 16, 32)
    assert torch.allclose(network(images), network.classify(features))
    n_parametrized = sum(1 for m in network.modules() if hasattr(m, "parametrizations"))
    n_layers = sum(1 for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert n_parametrized == n_layers == 1 + 2 * 8 + 1  # stem, two convs per block, fc; no 1x1 projections


def test_avgpool_shortcut_pools_and_zero_pads_channels():
    from cfx.nn.resnet import AvgPoolShortcut

    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = AvgPoolShortcut(2, 2, 5)(x)
    assert out.shape == (1, 5, 2, 2)
    assert out[0, 0, 0, 0] == x[0, 0, :2, :2].mean()
    assert torch.equal(out[:, 2:], torch.zeros(1, 3, 2, 2))
    odd = AvgPoolShortcut(2, 2, 2)(torch.rand(1, 2, 7, 7))
    assert odd.shape == (1, 2, 4, 4)


def test_plain_resnet_uses_projection_shortcuts_and_relu():
    network = ResNet(in_channels=3, num_classes=2, width=4)
    assert any(isinstance(m, nn.ReLU) for m in network.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in network.modules()) == 3
    assert network(torch.rand(2, 3, 16, 16)).shape == (2, 2)


def test_imagenet_stem_downsamples_by_four_before_the_stages():
    network = ResNet(in_channels=1, num_classes=10, width=4, stem="imagenet")
    stem_convs = [m for m in network.stem.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size, m.stride) for m in stem_convs] == [((7, 7), (2, 2))]
    assert any(isinstance(m, nn.MaxPool2d) for m in network.stem.modules())
    features, stage_maps = network.forward_features(torch.rand(2, 1, 28, 28))
    # 28 -> 14 (stride-2 conv) -> 7 (max-pool), then strides 1, 2, 2, 2 as in the standard ResNet-18
    assert [tuple(m.shape[1:]) for m in stage_maps] == [(4, 7, 7), (8, 4, 4), (16, 2, 2), (32, 1, 1)]
    assert features.shape == (2, 32)
    with pytest.raises(ValueError, match="stem"):
        ResNet(stem="large")


def test_small_cnn_and_timm_classifier_follow_the_interface():
    cnn = SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16)
    features, maps = cnn.forward_features(torch.rand(2, 1, 16, 16))
    assert features.shape == (2, 16) and [m.shape[1] for m in maps] == [4, 8]
    timm_net = TimmClassifier("resnet18", in_channels=1, num_classes=4)
    features, maps = timm_net.forward_features(torch.rand(2, 1, 32, 32))
    assert features.shape == (2, timm_net.feature_dim)
    assert [m.shape[1] for m in maps][-len(timm_net.stage_channels) :] == list(timm_net.stage_channels)
    assert timm_net(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmClassifier("not_a_model")


def test_check_input_names_the_expected_shape():
    network = SmallCNN(in_channels=1, num_classes=3, image_size=16)
    network.check_input(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="expects 1 image channel"):
        network.check_input(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="built for 16x16"):
        network.check_input(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        network.check_input(torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="floating-point"):
        network.check_input(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_timm_classifier_loads_the_users_own_weights_and_refuses_pretrained(tmp_path):
    torch.manual_seed(0)
    source = TimmClassifier("resnet10t", in_channels=1, num_classes=3)
    torch.save(source.model.state_dict(), tmp_path / "weights.pth")
    loaded = TimmClassifier("resnet10t", in_channels=1, num_classes=3, checkpoint_path=str(tmp_path / "weights.pth"))
    images = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(images), source.eval()(images))
    assert loaded.head is loaded.model.get_classifier()
    with pytest.raises(ValueError, match="checkpoint_path=<file>, not pretrained"):
        TimmClassifier("resnet10t", in_channels=1, num_classes=3, pretrained=True)


def test_timm_classifier_names_the_smallest_image_size_its_architecture_runs_at():
    # convnext_atto: a stride-4 patch stem, then three stride-2 downsamplings with 2x2 kernels: 4 * 2 * 2 * 2 = 32
    with pytest.raises(ValueError, match=r"'convnext_atto' does not run on 28x28 images: .* at least 32x32"):
        TimmClassifier("convnext_atto", in_channels=1, num_classes=10, image_size=28)
    unchecked = TimmClassifier("convnext_atto", in_channels=1, num_classes=10).eval()
    with pytest.raises(RuntimeError):
        unchecked(torch.zeros(1, 1, 31, 31))
    assert unchecked(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    assert TimmClassifier("convnext_atto", in_channels=1, num_classes=10, image_size=32).image_size == 32


def test_timm_classifier_size_check_leaves_the_model_as_built():
    torch.manual_seed(0)
    checked = TimmClassifier("resnet10t", in_channels=1, num_classes=3, image_size=28)
    torch.manual_seed(0)
    plain = TimmClassifier("resnet10t", in_channels=1, num_classes=3)
    assert checked.training
    for (name, value), expected in zip(checked.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name  # batch-norm statistics untouched by the dummy forward
