"""Tiny classifiers and checks shared by the explainer tests (test_explainer_contract.py and one file per method)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from cfx.counterfactual import Explainer
from cfx.counterfactual.vlk import ClassEncodings
from cfx.data import EmbeddedMNIST
from cfx.nn import ClassGaussians, FeatureClassifier


class LinearFeatureClassifier(FeatureClassifier):
    """``z = W_f flatten(x)``, ``logits = W_c z + b``: gradients in closed form."""

    def __init__(self, feature_weight: Tensor, class_weight: Tensor, class_bias: Tensor, channels: int, size: int):
        super().__init__()
        self.in_channels, self.image_size = channels, size
        self.feature_dim, self.num_classes = feature_weight.shape[0], class_weight.shape[0]
        self.stage_channels = (channels,)
        self.features = nn.Linear(feature_weight.shape[1], self.feature_dim, bias=False)
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        with torch.no_grad():
            self.features.weight.copy_(feature_weight)
            self.head.weight.copy_(class_weight)
            self.head.bias.copy_(class_bias)

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.features(images.flatten(1)), [images]

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)


class MLPClassifier(FeatureClassifier):
    """flatten -> Linear -> LeakyReLU -> Linear -> LeakyReLU (features) -> Linear: trains on MNIST in a second."""

    def __init__(self, size: int = 28, hidden: int = 128, features: int = 32, classes: int = 10):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes, self.feature_dim = 1, size, classes, features
        self.stage_channels = (hidden,)
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(size * size, hidden),
            nn.LeakyReLU(0.01),
            nn.Linear(hidden, features),
            nn.LeakyReLU(0.01),
        )
        self.head = nn.Linear(features, classes)

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.body(images)
        return features, [features]

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)


def trained_mnist_mlp(num_test: int = 20) -> tuple[MLPClassifier, dict[str, Tensor], dict[str, Tensor]]:
    """An MLP trained for 5 epochs on the embedded MNIST training split (~95 % test accuracy, ~2 s).

    Returns:
        ``(classifier, train_batch, test_batch)``: the classifier in eval mode, the whole training split and the
        first ``num_test`` test samples as cfx dict batches.
    """
    datamodule = EmbeddedMNIST()
    datamodule.setup()
    train_set, test_set = datamodule.dataset("train"), datamodule.dataset("test")
    train = next(iter(DataLoader(train_set, batch_size=len(train_set))))
    test = next(iter(DataLoader(Subset(test_set, range(num_test)), batch_size=num_test)))
    torch.manual_seed(0)
    classifier = MLPClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(5):
        for start in range(0, len(train_set), 50):
            batch = slice(start, start + 50)
            loss = F.cross_entropy(classifier(train["image"][batch]), train["label"][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier.eval(), train, test


def linear_classifier(
    seed: int = 0, channels: int = 1, size: int = 4, features: int = 5, classes: int = 3
) -> LinearFeatureClassifier:
    """A seeded linear classifier with generic (tie-free) weights."""
    generator = torch.Generator().manual_seed(seed)
    pixels = channels * size * size
    return LinearFeatureClassifier(
        torch.randn(features, pixels, generator=generator),
        torch.randn(classes, features, generator=generator),
        torch.randn(classes, generator=generator),
        channels,
        size,
    ).eval()


def random_gaussians(num_classes: int, feature_dim: int, seed: int = 0) -> ClassGaussians:
    """Gaussians with random means and random well-conditioned covariances."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, feature_dim, generator=generator, dtype=torch.float64)
    factors = torch.randn(num_classes, feature_dim, feature_dim, generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) / feature_dim + torch.eye(feature_dim, dtype=torch.float64)
    return ClassGaussians(means, covariances, torch.zeros(num_classes, dtype=torch.float64))


class ConvClassifier(FeatureClassifier):
    """conv 3x3 -> LeakyReLU -> flatten -> Linear (features) -> LeakyReLU -> Linear: batched convolutions, and
    (unlike a globally pooled CNN at random init) logits that depend strongly on the input."""

    def __init__(self, size: int = 8, channels: int = 4, features: int = 6, classes: int = 3):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes, self.feature_dim = 1, size, classes, features
        self.stage_channels = (channels,)
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.features = nn.Linear(channels * size * size, features)
        self.head = nn.Linear(features, classes)

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        maps = F.leaky_relu(self.conv(images), 0.01)
        return F.leaky_relu(self.features(maps.flatten(1)), 0.01), [maps]

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)


def tiny_cnn(seed: int = 0) -> ConvClassifier:
    """A randomly initialised 3-class conv classifier on 1x8x8 images with spread-out logits, in eval mode."""
    torch.manual_seed(seed)
    network = ConvClassifier().eval()
    with torch.no_grad():
        network.features.weight.mul_(3)  # spread features and logits: a few steps can change the prediction,
        network.head.weight.mul_(30)  # so the batch tests mix successes, failures and unchanged queries
    return network


def queries(classifier: FeatureClassifier, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` random images in [0, 1] (some pixels exactly 0 or 1) and targets, a few equal to the prediction."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, classifier.in_channels, classifier.image_size, classifier.image_size)
    images = (torch.rand(shape, generator=generator) * 1.4 - 0.2).clamp(0, 1)
    targets = torch.randint(0, classifier.num_classes, (count,), generator=generator)
    with torch.no_grad():
        predictions = classifier(images).argmax(1)
    targets[:3] = predictions[:3]
    return images, targets


def assert_batch_invariant(
    explainer: Explainer, images: Tensor, targets: Tensor, indices: Tensor | None = None, tolerance: float = 0.0
) -> None:
    """A batched ``explain`` equals one call per query: images up to ``tolerance``, probabilities up to 1e-6 more.

    The classifier's logits of a row differ in the last bits between batch sizes (matmul blocking), so the
    reported probability can too even where the images are bit-identical.
    """
    indices = torch.arange(len(images)) if indices is None else indices
    batch = explainer.explain(images, targets, indices)
    singles = [explainer.explain(images[i : i + 1], targets[i : i + 1], indices[i : i + 1]) for i in range(len(images))]
    for name in ("counterfactuals", "target_probability", "path"):
        batched = getattr(batch, name)
        if batched is None:
            assert all(getattr(single, name) is None for single in singles)
            continue
        stacked = torch.cat([getattr(single, name) for single in singles])
        atol = tolerance + (1e-6 if name == "target_probability" else 0.0)
        torch.testing.assert_close(batched, stacked, atol=atol, rtol=0, msg=name)
    for name in ("success", "original_prediction", "iterations"):
        assert torch.equal(getattr(batch, name), torch.cat([getattr(single, name) for single in singles])), name


class SigmoidVAE(nn.Module):
    """``encode(x) = (E logit(x), 0)`` (pixels clamped to [1e-3, 1 - 1e-3]), ``decode(z) = sigmoid(D z + d)``.

    A stand-in for :class:`cfx.nn.generative.ConvVAE` at any image size (that one is built for 28, 32 or 64 px):
    the same methods and attributes, gradients in closed form, and with ``E = D = I``, ``d = 0`` a VAE whose
    reconstructions are the images (to 1e-3).
    """

    def __init__(self, encoder_weight: Tensor, decoder_weight: Tensor, decoder_bias: Tensor, channels: int, size: int):
        super().__init__()
        self.in_channels, self.image_size, self.latent_dim = channels, size, encoder_weight.shape[0]
        self.encoder = nn.Linear(encoder_weight.shape[1], self.latent_dim, bias=False)
        self.decoder = nn.Linear(self.latent_dim, decoder_weight.shape[0])
        with torch.no_grad():
            self.encoder.weight.copy_(encoder_weight)
            self.decoder.weight.copy_(decoder_weight)
            self.decoder.bias.copy_(decoder_bias)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.encoder(torch.logit(images.flatten(1).clamp(1e-3, 1 - 1e-3)))
        return mean, torch.zeros_like(mean)

    def decode(self, latents: Tensor) -> Tensor:
        shape = (len(latents), self.in_channels, self.image_size, self.image_size)
        return torch.sigmoid(self.decoder(latents)).view(shape)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, log_variance = self.encode(images)
        return self.decode(mean), mean, log_variance


def identity_vae(channels: int = 1, size: int = 8) -> SigmoidVAE:
    """A :class:`SigmoidVAE` with one latent per pixel whose reconstructions are the images (to 1e-3)."""
    pixels = channels * size * size
    return SigmoidVAE(torch.eye(pixels), torch.eye(pixels), torch.zeros(pixels), channels, size).eval()


def random_vae(seed: int = 0, channels: int = 1, size: int = 4, latent_dim: int = 5) -> SigmoidVAE:
    """A :class:`SigmoidVAE` with seeded random weights."""
    generator = torch.Generator().manual_seed(seed)
    pixels = channels * size * size
    return SigmoidVAE(
        torch.randn(latent_dim, pixels, generator=generator) / pixels**0.5,
        torch.randn(pixels, latent_dim, generator=generator),
        torch.randn(pixels, generator=generator) * 0.5,
        channels,
        size,
    ).eval()


class LinearAutoencoder(nn.Module):
    """``encode(x) = E flatten(x) + e``, ``decode(c) = D c + d``: a stand-in for
    :class:`cfx.nn.generative.ConvAutoencoder` at any image size, with VLK's terms in closed form."""

    def __init__(
        self,
        encoder_weight: Tensor,
        encoder_bias: Tensor,
        decoder_weight: Tensor,
        decoder_bias: Tensor,
        channels: int,
        size: int,
    ):
        super().__init__()
        self.in_channels, self.image_size, self.latent_dim = channels, size, encoder_weight.shape[0]
        self.encoder = nn.Linear(encoder_weight.shape[1], self.latent_dim)
        self.decoder = nn.Linear(self.latent_dim, decoder_weight.shape[0])
        with torch.no_grad():
            self.encoder.weight.copy_(encoder_weight)
            self.encoder.bias.copy_(encoder_bias)
            self.decoder.weight.copy_(decoder_weight)
            self.decoder.bias.copy_(decoder_bias)

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images.flatten(1))

    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(codes).view(len(codes), self.in_channels, self.image_size, self.image_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


def linear_autoencoder(seed: int = 0, channels: int = 1, size: int = 8, latent_dim: int = 4) -> LinearAutoencoder:
    """A :class:`LinearAutoencoder` with seeded random weights (reconstructions near mid-grey, not the images)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = channels * size * size
    return LinearAutoencoder(
        torch.randn(latent_dim, pixels, generator=generator) / pixels**0.5,
        torch.randn(latent_dim, generator=generator) * 0.1,
        torch.randn(pixels, latent_dim, generator=generator) * 0.1,
        0.5 + torch.randn(pixels, generator=generator) * 0.1,
        channels,
        size,
    ).eval()


def random_class_encodings(num_classes: int, latent_dim: int, per_class: int = 4, seed: int = 0) -> ClassEncodings:
    """``per_class`` random encodings for each class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes * per_class) % num_classes
    return ClassEncodings(torch.randn(len(labels), latent_dim, generator=generator), labels, num_classes)
