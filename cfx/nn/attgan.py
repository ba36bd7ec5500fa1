"""AttGAN (pure torch): an attribute-conditioned encoder-decoder generator and its two-headed discriminator.

The layout follows REFERENCE.md (AttGAN's 2019 reference implementations), made to fit any image size from 28 to
128 px with 1 or 3 channels:

* **Encoder**: ``layers`` x [Conv 4x4 s2 p1 + BatchNorm + LeakyReLU(0.2)], channels ``base_channels * 2^i`` capped
  at ``max_channels``. By default 3 layers below 64 px (28-32 px: MNIST-sized data) and 5 from 64 px on (CelebA
  64-128 px), as AttGAN uses 5 at 128 px and 3 for small images.
* **Sizes that do not halve ``layers`` times** (28 px: 28 -> 14 -> 7 -> 4 would need uneven paddings) are padded:
  the input is replicate-padded (edge pixels repeated: black for MNIST-like digits, no artificial frame for
  photos) to the next multiple of ``2^layers`` (28 -> 32, so 32 -> 16 -> 8 -> 4), the generator's output is
  centre-cropped back (32 -> 28). The discriminator pads the same way. The final encoder map must be at least 2x2.
* **Decoder**: its input is the last encoder map concatenated with the attribute vector tiled to its size;
  ``layers - 1`` x [ConvT 4x4 s2 p1 + BatchNorm + ReLU] (channels mirroring the encoder's), then ConvT 4x4 s2 p1 to
  ``C`` channels + tanh. One **shortcut** layer (after the first decoder layer, the encoder map of that size is
  concatenated) and one **injection** layer (after the first decoder layer, the attributes are tiled again and
  concatenated); both counts are arguments (0 to ``layers - 1``).
* **Discriminator**: ``layers`` x [Conv 4x4 s2 p1 + InstanceNorm (affine) + LeakyReLU(0.2)], then two heads on the
  flattened map: FC -> ``head_width`` -> ReLU -> FC -> 1 (the WGAN critic score) and FC -> ``head_width`` -> ReLU
  -> FC -> ``num_attributes`` (attribute logits). Instance norm keeps every image's scores independent of the rest
  of the batch (needed by the WGAN-GP penalty's per-image input gradients).

Conventions: images are ``(N, C, H, W)`` in ``[0, 1]`` outside; inside, the networks work in ``[-1, 1]`` (``x * 2 -
1`` on the way in, ``(tanh + 1) / 2`` on the way out). Attributes are ``(N, A)`` in ``[0, 1]`` (0/1 for binary
attributes; values in between are allowed, e.g. for a continuous attribute search); the networks feed them as
``(a * 2 - 1) * 0.5`` (AttGAN's 2019 convention with ``thres_int = 0.5``, not the later ``a * 2 - 1``), so a flip
moves an attribute input from -0.5 to 0.5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.nn.generative import GenerativeNetwork

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 28, 128
#: Image sizes below this use 3 encoder / discriminator layers by default, from it on 5.
LARGE_IMAGE_SIZE = 64
#: Scale of the attribute input: the networks read ``(a * 2 - 1) * ATTRIBUTE_INPUT_SCALE``.
ATTRIBUTE_INPUT_SCALE = 0.5


def default_layers(image_size: int) -> int:
    """The number of encoder (and discriminator) layers for ``image_size``: 3 below 64 px, 5 from 64 px on."""
    return 3 if image_size < LARGE_IMAGE_SIZE else 5


def _check_positive_int(name: str, argument: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {argument} must be an integer >= {minimum}, got {value!r}")


def _check_layout(name: str, num_attributes: int, in_channels: int, image_size: int, layers: int) -> None:
    _check_positive_int(name, "num_attributes", num_attributes)
    if isinstance(in_channels, bool) or in_channels not in (1, 3):
        raise ValueError(f"{name}: in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"{name}: image_size must be an integer number of pixels, got {image_size!r}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"{name}: image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px, got {image_size}")
    _check_positive_int(name, "layers", layers)
    if padded_size(image_size, layers) // 2**layers < 2:
        raise ValueError(
            f"{name}: {layers} layers reduce {image_size} px images below 2x2 (at most "
            f"{(image_size - 1).bit_length() - 1} layers at this size)"
        )


def padded_size(image_size: int, layers: int) -> int:
    """``image_size`` rounded up to a multiple of ``2^layers`` (the size the networks work at)."""
    step = 2**layers
    return -(-image_size // step) * step


def _widths(base_channels: int, max_channels: int, layers: int) -> list[int]:
    return [min(base_channels * 2**i, max_channels) for i in range(layers)]


def _tile(attributes: Tensor, like: Tensor) -> Tensor:
    """The ``(N, A)`` attribute inputs as ``(N, A, h, w)`` maps of ``like``'s size."""
    return attributes[:, :, None, None].expand(-1, -1, *like.shape[-2:])


class _Padding(nn.Module):
    """Replicate padding of ``(N, C, S, S)`` images to ``(N, C, P, P)`` and the matching centre crop."""

    def __init__(self, image_size: int, layers: int):
        super().__init__()
        self.image_size, self.size = image_size, padded_size(image_size, layers)
        before = (self.size - image_size) // 2
        self.sides = (before, self.size - image_size - before)

    def pad(self, images: Tensor) -> Tensor:
        if self.size == self.image_size:
            return images
        return F.pad(images, (*self.sides, *self.sides), mode="replicate")

    def crop(self, images: Tensor) -> Tensor:
        start = self.sides[0]
        return images[..., start : start + self.image_size, start : start + self.image_size]


class AttGANGenerator(GenerativeNetwork):
    """AttGAN's generator: an encoder of images and a decoder conditioned on attributes (module docstring).

    Args:
        num_attributes: length ``A`` of the attribute vectors.
        in_channels: image channels (1 or 3).
        image_size: height (= width) of the images, 28 to 128 px.
        layers: encoder layers (the decoder has as many); ``None`` = :func:`default_layers` (3 below 64 px, else 5).
        base_channels: channels of the first encoder layer (64 in AttGAN); layer ``i`` has ``base * 2^i``.
        max_channels: cap of the channels (1024 in AttGAN).
        shortcut_layers: decoder layers followed by a shortcut from the encoder map of their size.
        injection_layers: decoder layers followed by the tiled attributes again.

    Raises:
        ValueError: an argument outside the ranges above.
    """

    def __init__(
        self,
        num_attributes: int,
        in_channels: int = 1,
        image_size: int = 28,
        layers: int | None = None,
        base_channels: int = 64,
        max_channels: int = 1024,
        shortcut_layers: int = 1,
        injection_layers: int = 1,
    ):
        super().__init__()
        name = type(self).__name__
        layers = default_layers(image_size) if layers is None else layers
        _check_layout(name, num_attributes, in_channels, image_size, layers)
        _check_positive_int(name, "base_channels", base_channels)
        _check_positive_int(name, "max_channels", max_channels)
        for argument, value in (("shortcut_layers", shortcut_layers), ("injection_layers", injection_layers)):
            _check_positive_int(name, argument, value, minimum=0)
            if value > layers - 1:
                raise ValueError(f"{name}: {argument} must be at most layers - 1 = {layers - 1}, got {value}")
        self.num_attributes, self.in_channels, self.image_size = num_attributes, in_channels, image_size
        self.layers, self.shortcut_layers, self.injection_layers = layers, shortcut_layers, injection_layers
        self.padding = _Padding(image_size, layers)
        widths = _widths(base_channels, max_channels, layers)
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(previous, width, 4, 2, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2))
            for previous, width in zip((in_channels, *widths), widths, strict=False)
        )
        decoder: list[nn.Module] = []
        incoming = widths[-1] + num_attributes
        for i in range(layers - 1):
            width = widths[-2 - i]  # the mirror of the encoder: the size of encoder map -2 - i
            decoder.append(
                nn.Sequential(nn.ConvTranspose2d(incoming, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
            )
            incoming = width + (widths[-2 - i] if i < shortcut_layers else 0)
            incoming += num_attributes if i < injection_layers else 0
        decoder.append(nn.Sequential(nn.ConvTranspose2d(incoming, in_channels, 4, 2, 1), nn.Tanh()))
        self.decoder = nn.ModuleList(decoder)

    def check_attributes(self, attributes: Tensor, count: int) -> None:
        """Raise ``ValueError`` unless ``attributes`` is a float ``(count, num_attributes)`` batch."""
        expected = (count, self.num_attributes)
        if not isinstance(attributes, Tensor) or tuple(attributes.shape) != expected:
            shape = tuple(attributes.shape) if isinstance(attributes, Tensor) else type(attributes).__name__
            raise ValueError(f"{type(self).__name__}: expected attributes of shape {expected}, got {shape}")
        if not attributes.is_floating_point():
            raise ValueError(
                f"{type(self).__name__}: expected floating-point attributes in [0, 1], got {attributes.dtype}"
            )

    def encode(self, images: Tensor) -> list[Tensor]:
        """The encoder's maps of ``(N, C, S, S)`` images in ``[0, 1]``, from the first (largest) to the last."""
        self.check_images(images, self.in_channels)
        features, current = [], self.padding.pad(images * 2 - 1)
        for layer in self.encoder:
            current = layer(current)
            features.append(current)
        return features

    def decode(self, features: list[Tensor], attributes: Tensor) -> Tensor:
        """Images in ``[0, 1]`` of encoder maps (:meth:`encode`) with ``(N, A)`` attributes in ``[0, 1]``."""
        if not isinstance(features, list | tuple) or len(features) != self.layers:
            count = len(features) if isinstance(features, list | tuple) else type(features).__name__
            raise ValueError(f"{type(self).__name__}: expected the {self.layers} encoder maps of encode(), got {count}")
        self.check_attributes(attributes, len(features[-1]))
        inputs = (attributes * 2 - 1) * ATTRIBUTE_INPUT_SCALE
        current = torch.cat([features[-1], _tile(inputs, features[-1])], dim=1)
        for i, layer in enumerate(self.decoder):
            current = layer(current)
            if i < self.shortcut_layers:
                current = torch.cat([current, features[-2 - i]], dim=1)
            if i < self.injection_layers:
                current = torch.cat([current, _tile(inputs, current)], dim=1)
        return self.padding.crop((current + 1) / 2)

    def forward(self, images: Tensor, attributes: Tensor) -> Tensor:
        """``decode(encode(images), attributes)``: the images edited to have ``attributes``, in ``[0, 1]``."""
        return self.decode(self.encode(images), attributes)


class AttGANDiscriminator(GenerativeNetwork):
    """AttGAN's discriminator: a convolutional trunk with a critic head and an attribute-classification head.

    Args:
        num_attributes: attributes the classification head predicts.
        in_channels: image channels (1 or 3).
        image_size: 28 to 128 px.
        layers: convolution layers; ``None`` = :func:`default_layers`.
        base_channels: channels of the first layer (64 in AttGAN), doubling per layer.
        max_channels: cap of the channels (1024 in AttGAN).
        head_width: hidden width of both heads (1024 in AttGAN).

    Raises:
        ValueError: an argument outside the ranges above.
    """

    def __init__(
        self,
        num_attributes: int,
        in_channels: int = 1,
        image_size: int = 28,
        layers: int | None = None,
        base_channels: int = 64,
        max_channels: int = 1024,
        head_width: int = 1024,
    ):
        super().__init__()
        name = type(self).__name__
        layers = default_layers(image_size) if layers is None else layers
        _check_layout(name, num_attributes, in_channels, image_size, layers)
        for argument, value in (("base_channels", base_channels), ("max_channels", max_channels)):
            _check_positive_int(name, argument, value)
        _check_positive_int(name, "head_width", head_width)
        self.num_attributes, self.in_channels, self.image_size, self.layers = (
            num_attributes,
            in_channels,
            image_size,
            layers,
        )
        self.padding = _Padding(image_size, layers)
        widths = _widths(base_channels, max_channels, layers)
        trunk: list[nn.Module] = []
        for previous, width in zip((in_channels, *widths), widths, strict=False):
            trunk += [nn.Conv2d(previous, width, 4, 2, 1), nn.InstanceNorm2d(width, affine=True), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*trunk, nn.Flatten())
        flat = widths[-1] * (self.padding.size // 2**layers) ** 2

        def head(outputs: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(flat, head_width), nn.ReLU(), nn.Linear(head_width, outputs))

        self.critic_head, self.attribute_head = head(1), head(num_attributes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(critic scores (N,), attribute logits (N, A))`` of images in ``[0, 1]``."""
        self.check_images(images, self.in_channels)
        features = self.trunk(self.padding.pad(images * 2 - 1))
        return self.critic_head(features)[:, 0], self.attribute_head(features)


class AttGAN(nn.Module):
    """A trained AttGAN generator and discriminator, as :func:`cfx.tasks.generative.load_generative` returns them.

    ``attribute_names`` (the data's names of the attributes, in order; empty if unknown) travel in the state dict
    (as extra state), so a checkpoint of the training task restores them.

    Args:
        generator: an :class:`AttGANGenerator`.
        discriminator: an :class:`AttGANDiscriminator` for the same attributes, channels and image size.
        attribute_names: names of the ``num_attributes`` attributes, or empty.

    Raises:
        ValueError: the networks do not match, or the names are not ``num_attributes`` distinct strings.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, attribute_names: tuple[str, ...] = ()):
        super().__init__()
        made = (generator.num_attributes, generator.in_channels, generator.image_size)
        expected = (discriminator.num_attributes, discriminator.in_channels, discriminator.image_size)
        if made != expected:
            raise ValueError(
                "the AttGAN generator is built for {} attributes of {}-channel {} px images, the discriminator for "
                "{} attributes of {}-channel {} px images".format(*made, *expected)
            )
        self.generator, self.discriminator = generator, discriminator
        self.attribute_names = attribute_names

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The names of the attributes, in the order of the attribute vectors (empty if unknown)."""
        return self._attribute_names

    @attribute_names.setter
    def attribute_names(self, names: tuple[str, ...] | list[str]) -> None:
        names = tuple(names)
        if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise ValueError(f"attribute_names must be distinct strings, got {names}")
        if names and len(names) != self.num_attributes:
            raise ValueError(
                f"the AttGAN has {self.num_attributes} attributes, got {len(names)} attribute names: {names}"
            )
        self._attribute_names = names

    @property
    def num_attributes(self) -> int:
        """Length of the attribute vectors."""
        return self.generator.num_attributes

    @property
    def in_channels(self) -> int:
        """Image channels of both networks."""
        return self.generator.in_channels

    @property
    def image_size(self) -> int:
        """Image size of both networks."""
        return self.generator.image_size

    def encode(self, images: Tensor) -> list[Tensor]:
        """The generator's encoder maps of images in ``[0, 1]``."""
        return self.generator.encode(images)

    def decode(self, features: list[Tensor], attributes: Tensor) -> Tensor:
        """The generator's images of encoder maps with ``(N, A)`` attributes in ``[0, 1]``."""
        return self.generator.decode(features, attributes)

    def forward(self, images: Tensor, attributes: Tensor) -> Tensor:
        """The generator's images: ``images`` edited to have ``attributes``."""
        return self.generator(images, attributes)

    def get_extra_state(self) -> dict[str, Any]:
        """The attribute names, for the state dict."""
        return {"attribute_names": list(self.attribute_names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the attribute names of a state dict."""
        self.attribute_names = tuple(state["attribute_names"])
