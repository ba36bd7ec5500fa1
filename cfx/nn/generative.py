"""Generative auxiliaries (pure torch): DeDUCE's WGAN, REVISE's VAE and VLK's autoencoder.

Images are ``(N, C, H, W)`` in ``[0, 1]`` with ``H = W = image_size``; each network is built for one image size and
channel count (the data's) and refuses others with one ``ValueError``. Three sizes are supported:

* **28 px** (MNIST, Fashion-MNIST): the reference layouts of ``REFERENCE.md`` (DeDUCE's AnoGAN WGAN, REVISE's VAE).
* **32 px** and **64 px** (RGB configs): DCGAN-style extensions with the same widths. The generator starts from a
  4x4 map (``ConvT k4 s1``) and doubles it with ``ConvT k4 s2 p1`` layers (channels 256-128-64 at 32 px,
  512-256-128-64 at 64 px). The critic keeps the reference's two ``k5 s2`` convolutions (its feature map ``f`` is
  still the second one's output, ``32 x S/4 x S/4``) and at 64 px adds one more (64 channels) before the ``k5 s2``
  output convolution, so it always ends in 2x2 = 4 scores. The VAE / autoencoder encoders halve the size with
  ``k5 s2 p2`` convolutions down to 8x8 (channels 32-64 at 32 px, 32-64-128 at 64 px); the decoders mirror them
  with ``ConvT k5 s2 p2`` (output padding 1, exact doubling) and end in a ``k3`` convolution to ``C`` channels.

Every network records its init arguments (:attr:`GenerativeNetwork.init_config`), so a checkpoint of a task built
in Python names it as a ``class_path`` + ``init_args`` config, like the classifiers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from cfx.init_args import class_path, init_arguments, is_plain, record_init_arguments

IMAGE_SIZES = (28, 32, 64)
#: Channels of the feature map ``f`` of :meth:`WGANCritic.features` (the second convolution's output).
CRITIC_FEATURE_CHANNELS = 32


def _check_size_and_channels(name: str, image_size: int, channels: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size not in IMAGE_SIZES:
        raise ValueError(f"{name}: image_size must be one of {IMAGE_SIZES} (pixels), got {image_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{name}: the number of image channels must be a positive integer, got {channels!r}")


def _check_latent_dim(name: str, latent_dim: int) -> None:
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"{name}: latent_dim must be a positive integer, got {latent_dim!r}")


class GenerativeNetwork(nn.Module):
    """Base of the generative networks: records init arguments and checks image batches.

    Attributes:
        image_size: the height (= width) the network is built for.
    """

    image_size: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record the arguments of each network's outermost ``__init__`` call, for :attr:`init_config`."""
        super().__init_subclass__(**kwargs)
        record_init_arguments(cls)

    @property
    def init_config(self) -> dict[str, Any] | None:
        """``{"class_path": ..., "init_args": {...}}`` that rebuilds this network (untrained), or ``None``."""
        arguments = init_arguments(self)
        if not is_plain(arguments):
            return None
        return {"class_path": class_path(type(self)), "init_args": arguments}

    def check_images(self, images: Tensor, channels: int) -> None:
        """Raise ``ValueError`` unless ``images`` is a float ``(N, channels, image_size, image_size)`` batch."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__}: expected images of shape (N, C, H, W), got {shape}")
        expected = (channels, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} was built for {channels}-channel {self.image_size}x{self.image_size} images "
                f"(N, {', '.join(map(str, expected))}), got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"{type(self).__name__}: expected floating-point images in [0, 1], got {images.dtype}")

    def check_latents(self, latents: Tensor, latent_dim: int) -> None:
        """Raise ``ValueError`` unless ``latents`` is a float ``(N, latent_dim)`` batch."""
        if not isinstance(latents, Tensor) or latents.ndim != 2 or latents.shape[1] != latent_dim:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"{type(self).__name__}: expected latents of shape (N, {latent_dim}), got {shape}")
        if not latents.is_floating_point():
            raise ValueError(f"{type(self).__name__}: expected floating-point latents, got {latents.dtype}")


def _up_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int = 0) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(in_channels, out_channels, kernel, stride, padding),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class WGANGenerator(GenerativeNetwork):
    """DeDUCE's WGAN generator: transposed convolutions with batch norm and ReLU from ``z``, a sigmoid output.

    ``z`` enters as a ``latent_dim x 1 x 1`` map. At 28 px (the reference): ConvT(L,256,k3,s2) -> 3x3,
    ConvT(256,128,k4,s1) -> 6x6, ConvT(128,64,k3,s2) -> 13x13, ConvT(64,C,k4,s2) -> 28x28. See the module docstring
    for 32 and 64 px. Put it in eval mode to generate from a trained model (batch norm then uses its running
    statistics).

    Args:
        latent_dim: size of ``z`` (64 in DeDUCE).
        out_channels: image channels.
        image_size: 28, 32 or 64.
    """

    def __init__(self, latent_dim: int = 64, out_channels: int = 1, image_size: int = 28):
        super().__init__()
        _check_size_and_channels(type(self).__name__, image_size, out_channels)
        _check_latent_dim(type(self).__name__, latent_dim)
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        if image_size == 28:
            layers = [
                *_up_block(latent_dim, 256, 3, 2),
                *_up_block(256, 128, 4, 1),
                *_up_block(128, 64, 3, 2),
                nn.ConvTranspose2d(64, out_channels, 4, 2),
            ]
        else:
            widths = (256, 128, 64) if image_size == 32 else (512, 256, 128, 64)
            layers = _up_block(latent_dim, widths[0], 4, 1)
            for previous, width in zip(widths, widths[1:], strict=False):
                layers += _up_block(previous, width, 4, 2, 1)
            layers.append(nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        """Map ``(N, latent_dim)`` latents to ``(N, out_channels, image_size, image_size)`` images in ``[0, 1]``."""
        self.check_latents(latents, self.latent_dim)
        return torch.sigmoid(self.layers(latents[:, :, None, None]))


def _sn_conv(in_channels: int, out_channels: int, padding: int, bias: bool) -> nn.Conv2d:
    return spectral_norm(nn.Conv2d(in_channels, out_channels, 5, 2, padding, bias=bias))


class WGANCritic(GenerativeNetwork):
    """DeDUCE's spectrally normalised WGAN critic (torch's spectral norm on every convolution).

    SN-Conv(C,16,k5,s2,p2) -> BN -> LeakyReLU(0.2) -> SN-Conv(16,32,k5,s2,p2) [= f] -> BN -> LeakyReLU(0.2) ->
    SN-Conv(32,1,k5,s2) -> 2x2 scores, whose mean is the critic's score. The feature map ``f`` (before its batch
    norm) is AnoGAN's feature: ``32 x 7 x 7`` at 28 px, ``32 x S/4 x S/4`` in general. The hidden convolutions have
    no bias (batch norm follows). At 64 px one more SN-Conv(32,64,k5,s2,p2) -> BN -> LeakyReLU precedes the output
    convolution.

    Args:
        in_channels: image channels.
        image_size: 28, 32 or 64.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        _check_size_and_channels(type(self).__name__, image_size, in_channels)
        self.in_channels, self.image_size = in_channels, image_size
        self.to_features = nn.Sequential(
            _sn_conv(in_channels, 16, 2, bias=False),
            nn.BatchNorm2d(16),
            nn.LeakyReLU(0.2),
            _sn_conv(16, CRITIC_FEATURE_CHANNELS, 2, bias=False),
        )
        head: list[nn.Module] = [nn.BatchNorm2d(CRITIC_FEATURE_CHANNELS), nn.LeakyReLU(0.2)]
        width = CRITIC_FEATURE_CHANNELS
        if image_size == 64:
            head += [_sn_conv(width, 64, 2, bias=False), nn.BatchNorm2d(64), nn.LeakyReLU(0.2)]
            width = 64
        head.append(_sn_conv(width, 1, 0, bias=True))
        self.head = nn.Sequential(*head)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape ``(32, S/4, S/4)`` of one image's feature map ``f`` (``(32, 7, 7)`` at 28 px)."""
        side = -(-self.image_size // 4)
        return (CRITIC_FEATURE_CHANNELS, side, side)

    def features(self, images: Tensor) -> Tensor:
        """AnoGAN's feature ``f``: the second convolution's output (before its batch norm), ``(N, *feature_shape)``."""
        self.check_images(images, self.in_channels)
        return self.to_features(images)

    def forward(self, images: Tensor) -> Tensor:
        """The critic's ``(N,)`` scores: the mean of its 2x2 outputs (higher = more like the training data)."""
        return self.head(self.features(images)).flatten(1).mean(dim=1)


class GAN(nn.Module):
    """A trained generator and its critic, as :func:`cfx.tasks.generative.load_generative` returns them.

    Args:
        generator: a :class:`WGANGenerator` (or any module with ``latent_dim``, ``out_channels``, ``image_size``).
        critic: a :class:`WGANCritic` (or any module with ``in_channels``, ``image_size`` and ``features``).

    Raises:
        ValueError: the generator's images do not have the channels or size the critic expects.
    """

    def __init__(self, generator: nn.Module, critic: nn.Module):
        super().__init__()
        made = (generator.out_channels, generator.image_size)
        expected = (critic.in_channels, critic.image_size)
        if made != expected:
            raise ValueError(
                f"the generator makes {made[0]}-channel {made[1]} px images, the critic expects {expected[0]}-channel "
                f"{expected[1]} px images"
            )
        self.generator, self.critic = generator, critic

    @property
    def latent_dim(self) -> int:
        """Size of the generator's latents."""
        return self.generator.latent_dim

    @property
    def in_channels(self) -> int:
        """Image channels of both networks."""
        return self.critic.in_channels

    @property
    def image_size(self) -> int:
        """Image size of both networks."""
        return self.critic.image_size

    def forward(self, latents: Tensor) -> Tensor:
        """The generator's images of ``(N, latent_dim)`` latents."""
        return self.generator(latents)


def _encoder_widths(image_size: int) -> tuple[int, ...]:
    """Channels of the ``k5 s2 p2`` encoder convolutions: down to 7x7 (28 px) or 8x8."""
    return (32, 64) if image_size in (28, 32) else (32, 64, 128)


class ConvCoder(GenerativeNetwork):
    """Shared layout of :class:`ConvVAE` and :class:`ConvAutoencoder`: a convolutional encoder, a mirrored decoder.

    The encoder maps images to flat features, the decoder ``latent_dim`` codes to images. Encoder:
    Conv(C,32,k5,s2,p2) ReLU -> Conv(32,64,k5,s2,p2) ReLU (-> Conv(64,128,...) ReLU at 64 px) -> flatten (3136 values
    at 28 px). Decoder: Linear(latent_dim, 3136) ReLU -> ConvT(64,32,k5,s2,p2) ReLU (13x13) ->
    ConvT(32,32,k5,s2,p1) ReLU (27x27) -> zero padding of one row and column at the bottom and right (28x28) ->
    ConvT(32,C,k3,s1,p1) -> sigmoid (REVISE's reference at 28 px; see the module docstring for 32 and 64 px).

    The output layer's bias starts at ``output_bias`` (-2: sigmoid 0.12, near the mean pixel of MNIST-like data).
    With torch's default bias (output about 0.5), the first Adam steps on a squared error drive every output to
    black on embedded MNIST: the sigmoid saturates and training stalls at the all-black reconstruction (seen at
    lr 1e-3 and 1e-4).

    Args:
        in_channels: image channels.
        image_size: 28, 32 or 64.
        latent_dim: size of the codes the decoder takes.
        output_bias: initial bias of the output layer (a logit).
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int, output_bias: float):
        super().__init__()
        _check_size_and_channels(type(self).__name__, image_size, in_channels)
        _check_latent_dim(type(self).__name__, latent_dim)
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        widths = _encoder_widths(image_size)
        encoder: list[nn.Module] = []
        for previous, width in zip((in_channels, *widths), widths, strict=False):
            encoder += [nn.Conv2d(previous, width, 5, 2, 2), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        side = 7 if image_size == 28 else 8
        self.code_shape = (widths[-1], side, side)
        self.flat_dim = widths[-1] * side * side
        decoder: list[nn.Module] = [nn.Linear(latent_dim, self.flat_dim), nn.ReLU(), nn.Unflatten(1, self.code_shape)]
        if image_size == 28:
            decoder += [
                nn.ConvTranspose2d(64, 32, 5, 2, 2),
                nn.ReLU(),
                nn.ConvTranspose2d(32, 32, 5, 2, 1),
                nn.ReLU(),
                nn.ZeroPad2d((0, 1, 0, 1)),
            ]
        else:
            mirrored = (*widths[::-1], 32)  # 64-32(-32) or 128-64-32(-32)
            for previous, width in zip(mirrored, mirrored[1:], strict=False):
                decoder += [nn.ConvTranspose2d(previous, width, 5, 2, 2, output_padding=1), nn.ReLU()]
        output_layer = nn.ConvTranspose2d(32, in_channels, 3, 1, 1)
        nn.init.constant_(output_layer.bias, output_bias)
        decoder += [output_layer, nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    def encode_features(self, images: Tensor) -> Tensor:
        """The encoder's flat ``(N, flat_dim)`` features of checked images."""
        self.check_images(images, self.in_channels)
        return self.encoder(images)

    def decode(self, codes: Tensor) -> Tensor:
        """Map ``(N, latent_dim)`` codes to ``(N, C, image_size, image_size)`` images in ``[0, 1]``."""
        self.check_latents(codes, self.latent_dim)
        return self.decoder(codes)


class ConvVAE(ConvCoder):
    """REVISE's convolutional VAE: the :class:`ConvCoder` layout with one linear head for mean and log-variance.

    Args:
        in_channels: image channels.
        image_size: 28, 32 or 64.
        latent_dim: size of the latent (32 in DeDUCE's REVISE baseline).
        output_bias: initial bias of the output layer (see :class:`ConvCoder`).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 32, output_bias: float = -2.0):
        super().__init__(in_channels, image_size, latent_dim, output_bias)
        self.to_moments = nn.Linear(self.flat_dim, 2 * latent_dim)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's ``(mean, log_variance)``, each ``(N, latent_dim)``."""
        mean, log_variance = self.to_moments(self.encode_features(images)).chunk(2, dim=1)
        return mean, log_variance

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, mean, log_variance)``.

        In training mode the reconstruction decodes a reparameterised sample ``mean + exp(log_variance / 2) * eps``
        with ``eps ~ N(0, I)`` drawn from ``generator`` (the global generator if ``None``); in eval mode it decodes
        the mean.
        """
        mean, log_variance = self.encode(images)
        latents = mean
        if self.training:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * log_variance) * noise
        return self.decode(latents), mean, log_variance


def kl_divergence(mean: Tensor, log_variance: Tensor) -> Tensor:
    """Per-sample ``KL(N(mean, exp(log_variance)) || N(0, I))``, summed over latent dimensions, shape ``(N,)``."""
    return 0.5 * (mean.square() + log_variance.exp() - 1 - log_variance).sum(dim=1)


class ConvAutoencoder(ConvCoder):
    """A deterministic convolutional autoencoder (VLK's ``AE`` and ``ENC``): :class:`ConvCoder` with flat codes.

    A linear bottleneck maps the encoder's features to ``latent_dim`` codes.

    Args:
        in_channels: image channels.
        image_size: 28, 32 or 64.
        latent_dim: size of the codes.
        output_bias: initial bias of the output layer (see :class:`ConvCoder`).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 16, output_bias: float = -2.0):
        super().__init__(in_channels, image_size, latent_dim, output_bias)
        self.to_code = nn.Linear(self.flat_dim, latent_dim)

    def encode(self, images: Tensor) -> Tensor:
        """The ``(N, latent_dim)`` codes of ``images`` (the encoder, usable on its own)."""
        return self.to_code(self.encode_features(images))

    def forward(self, images: Tensor) -> Tensor:
        """The reconstruction ``decode(encode(images))``, in ``[0, 1]``."""
        return self.decode(self.encode(images))
