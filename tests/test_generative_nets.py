"""The generative networks: layouts, shapes, value ranges, the critic's feature map, VAE sampling, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfx.init_args import instantiate
from cfx.nn import GAN, ConvAutoencoder, ConvVAE, WGANCritic, WGANGenerator
from cfx.nn.generative import kl_divergence

SIZES = [(28, 1), (32, 3)]


def _spatial_sizes(module: nn.Module, layer_type: type, run) -> list[tuple[int, ...]]:
    """Output shapes (without the batch) of every ``layer_type`` layer while ``run()`` executes."""
    shapes: list[tuple[int, ...]] = []
    handles = [
        layer.register_forward_hook(lambda _, __, output: shapes.append(tuple(output.shape[1:])))
        for layer in module.modules()
        if isinstance(layer, layer_type)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def test_generator_and_critic_follow_the_reference_layout_at_28_px():
    torch.manual_seed(0)
    generator, critic = WGANGenerator(), WGANCritic()
    latents = torch.randn(2, 64)
    # REFERENCE.md: 64x1x1 -> 256x3x3 -> 128x6x6 -> 64x13x13 -> 1x28x28.
    shapes = _spatial_sizes(generator, nn.ConvTranspose2d, lambda: generator(latents))
    assert shapes == [(256, 3, 3), (128, 6, 6), (64, 13, 13), (1, 28, 28)]
    convs = [layer for layer in generator.modules() if isinstance(layer, nn.ConvTranspose2d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(3, 2), (4, 1), (3, 2), (4, 2)]
    assert sum(isinstance(layer, nn.BatchNorm2d) for layer in generator.modules()) == 3
    # Critic: 16x14x14 -> 32x7x7 (= f) -> 1x2x2 (4 outputs); k5 s2, hidden convolutions without bias.
    images = torch.rand(2, 1, 28, 28)
    shapes = _spatial_sizes(critic, nn.Conv2d, lambda: critic(images))
    assert shapes == [(16, 14, 14), (32, 7, 7), (1, 2, 2)]
    convs = [layer for layer in critic.modules() if isinstance(layer, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.bias is not None) for c in convs] == [
        (5, 2, False),
        (5, 2, False),
        (5, 2, True),
    ]


def test_vae_follows_the_reference_layout_at_28_px():
    vae = ConvVAE()
    images = torch.rand(2, 1, 28, 28)
    assert _spatial_sizes(vae, nn.Conv2d, lambda: vae.encode(images)) == [(32, 14, 14), (64, 7, 7)]
    assert vae.to_moments.in_features == 3136 and vae.to_moments.out_features == 64
    up = _spatial_sizes(vae, nn.ConvTranspose2d, lambda: vae.decode(torch.zeros(2, 32)))
    assert up == [(32, 13, 13), (32, 27, 27), (1, 28, 28)]


@pytest.mark.parametrize(("size", "channels"), SIZES)
def test_gan_shapes_ranges_and_features(size, channels):
    torch.manual_seed(0)
    generator, critic = WGANGenerator(16, channels, size), WGANCritic(channels, size)
    images = generator(3 * torch.randn(5, 16))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= 0 and images.max() <= 1
    assert critic(images).shape == (5,)
    side = size // 4
    assert critic.feature_shape == (32, side, side)
    assert critic.features(images).shape == (5, 32, side, side)
    gan = GAN(generator, critic)
    assert (gan.latent_dim, gan.in_channels, gan.image_size) == (16, channels, size)
    assert torch.equal(gan.eval()(torch.ones(2, 16)), generator(torch.ones(2, 16)))


def test_critic_score_is_the_mean_of_its_outputs_and_features_are_the_second_convolution():
    torch.manual_seed(0)
    critic = WGANCritic().eval()
    images = torch.rand(4, 1, 28, 28)
    convs = [layer for layer in critic.modules() if isinstance(layer, nn.Conv2d)]
    outputs: dict[int, torch.Tensor] = {}
    for position, conv in enumerate(convs):
        conv.register_forward_hook(lambda _, __, output, position=position: outputs.__setitem__(position, output))
    scores = critic(images)
    assert torch.equal(critic.features(images), outputs[1])
    assert torch.allclose(scores, outputs[2].flatten(1).mean(dim=1))


def test_critic_convolutions_are_spectrally_normalised():
    torch.manual_seed(0)
    critic = WGANCritic().train()
    for _ in range(40):  # one power iteration per training forward
        critic(torch.rand(2, 1, 28, 28))
    convs = [layer for layer in critic.modules() if isinstance(layer, nn.Conv2d)]
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize(("size", "channels"), SIZES)
def test_vae_shapes_ranges_and_sampling(size, channels):
    torch.manual_seed(0)
    vae = ConvVAE(channels, size, latent_dim=8)
    images = torch.rand(3, channels, size, size)
    mean, log_variance = vae.encode(images)
    assert mean.shape == log_variance.shape == (3, 8)
    decoded = vae.decode(4 * torch.randn(3, 8))
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    vae.train()
    reconstruction, sample_mean, sample_log_variance = vae(images, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    expected = vae.decode(mean + torch.exp(0.5 * log_variance) * noise)
    assert torch.allclose(reconstruction, expected, atol=1e-6)
    assert torch.equal(sample_mean, mean) and torch.equal(sample_log_variance, log_variance)
    vae.eval()
    assert torch.allclose(vae(images)[0], vae.decode(mean), atol=1e-6)


def test_kl_divergence_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_variance = torch.randn(4, 6), torch.randn(4, 6)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * log_variance))
    prior = torch.distributions.Normal(torch.zeros(4, 6), torch.ones(4, 6))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=1)
    assert torch.allclose(kl_divergence(mean, log_variance), expected, atol=1e-5)


@pytest.mark.parametrize(("size", "channels"), SIZES)
def test_autoencoder_shapes_and_ranges(size, channels):
    torch.manual_seed(0)
    autoencoder = ConvAutoencoder(channels, size, latent_dim=5)
    images = torch.rand(3, channels, size, size)
    codes = autoencoder.encode(images)
    assert codes.shape == (3, 5)
    reconstruction = autoencoder(images)
    assert torch.equal(reconstruction, autoencoder.decode(codes))
    assert reconstruction.shape == images.shape and reconstruction.min() >= 0 and reconstruction.max() <= 1


def test_64_px_rgb_networks():
    torch.manual_seed(0)
    images = WGANGenerator(8, 3, 64)(torch.randn(2, 8))
    assert images.shape == (2, 3, 64, 64)
    assert WGANCritic(3, 64).features(images).shape == (2, 32, 16, 16)
    assert ConvVAE(3, 64, 4)(images)[0].shape == ConvAutoencoder(3, 64, 4)(images).shape == (2, 3, 64, 64)


def test_decoders_start_at_the_output_bias():
    autoencoder = ConvAutoencoder(output_bias=-2.0)
    with torch.no_grad():
        for layer in autoencoder.decoder.modules():
            if isinstance(layer, nn.ConvTranspose2d | nn.Linear):
                layer.weight.zero_()
    assert torch.allclose(autoencoder(torch.rand(1, 1, 28, 28)), torch.sigmoid(torch.tensor(-2.0)))


@pytest.mark.parametrize(
    "network", [WGANGenerator(8, 3, 32), WGANCritic(3, 32), ConvVAE(1, 28, 4), ConvAutoencoder(3, 64, 4)]
)
def test_init_config_rebuilds_the_network(network):
    rebuilt = instantiate(network.init_config)
    assert type(rebuilt) is type(network)
    rebuilt.load_state_dict(network.state_dict())  # strict: the same parameters and buffers, of the same shapes
    assert rebuilt.init_config == network.init_config


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: WGANGenerator(image_size=30), r"image_size must be one of \(28, 32, 64\)"),
        (lambda: WGANCritic(in_channels=0), "positive integer, got 0"),
        (lambda: ConvVAE(image_size=16), "image_size must be one of"),
        (lambda: ConvAutoencoder(latent_dim=0), "latent_dim must be a positive integer"),
        (lambda: GAN(WGANGenerator(out_channels=3), WGANCritic()), "3-channel 28 px images, the critic expects 1"),
        (lambda: GAN(WGANGenerator(image_size=32), WGANCritic()), "32 px images, the critic expects 1-channel 28"),
    ],
)
def test_bad_construction_is_a_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: WGANCritic()(torch.rand(2, 1, 32, 32)), r"1-channel 28x28 images.*got shape \(2, 1, 32, 32\)"),
        (lambda: WGANCritic(3, 32).features(torch.rand(2, 1, 32, 32)), "built for 3-channel 32x32"),
        (lambda: ConvVAE().encode(torch.rand(2, 3, 28, 28)), "built for 1-channel 28x28"),
        (lambda: ConvAutoencoder()(torch.rand(1, 28, 28)), r"expected images of shape \(N, C, H, W\)"),
        (lambda: ConvAutoencoder()(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)), "floating-point images"),
        (lambda: WGANGenerator()(torch.randn(2, 32)), r"latents of shape \(N, 64\), got \(2, 32\)"),
        (lambda: ConvVAE().decode(torch.randn(2, 16)), r"latents of shape \(N, 32\)"),
    ],
)
def test_mismatched_inputs_are_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
