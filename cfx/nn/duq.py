"""DUQ (deterministic uncertainty quantification): an RBF head with moving-average class centroids."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cfx.nn.classifier import FeatureClassifier


class DUQHead(nn.Module):
    """Per-class embeddings ``W_c z`` compared with class centroids by an RBF kernel.

    ``K_c(z) = exp(-mean_j (W_c z - e_c)_j^2 / (2 sigma^2))`` with ``W`` of shape ``(embedding_dim, C, feature_dim)``.
    The centroids ``e_c = m_c / n_c`` are exponential moving averages of class-wise embedding sums ``m`` and
    counts ``n`` (buffers, so they are saved in checkpoints), updated by :meth:`update_centroids`.

    Args:
        feature_dim: size of the input features.
        num_classes: number of classes ``C``.
        embedding_dim: size of each class embedding (defaults to ``feature_dim``).
        length_scale: the kernel's sigma (0.5 in DISC).
        gamma: moving-average decay of the centroid statistics (0.999).
        initial_count: the starting count ``n_c`` of every class; the starting sums are ``N(0, 0.05^2)`` noise
            times this count, so early centroids move gradually.
    """

    centroid_sums: Tensor
    centroid_counts: Tensor

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        embedding_dim: int | None = None,
        length_scale: float = 0.5,
        gamma: float = 0.999,
        initial_count: float = 13.0,
    ):
        super().__init__()
        if length_scale <= 0:
            raise ValueError(f"length_scale must be positive, got {length_scale}")
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
        embedding_dim = feature_dim if embedding_dim is None else embedding_dim
        self.feature_dim, self.num_classes, self.embedding_dim = feature_dim, num_classes, embedding_dim
        self.length_scale, self.gamma = length_scale, gamma
        self.weight = nn.Parameter(torch.empty(embedding_dim, num_classes, feature_dim))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.register_buffer("centroid_counts", torch.full((num_classes,), float(initial_count)))
        self.register_buffer("centroid_sums", torch.randn(num_classes, embedding_dim) * 0.05 * initial_count)

    @property
    def centroids(self) -> Tensor:
        """``(C, embedding_dim)`` class centroids ``m_c / n_c``."""
        return self.centroid_sums / self.centroid_counts[:, None]

    def embed(self, features: Tensor) -> Tensor:
        """``(N, C, embedding_dim)`` class embeddings ``W_c z`` of ``(N, feature_dim)`` features."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (N, {self.feature_dim}), got {tuple(features.shape)}")
        return torch.einsum("nf,ecf->nce", features, self.weight)

    def kernel(self, embeddings: Tensor) -> Tensor:
        """``(N, C)`` RBF similarities of class embeddings to the class centroids, in ``(0, 1]``."""
        squared = (embeddings - self.centroids[None]).square().mean(dim=2)
        return torch.exp(-squared / (2 * self.length_scale**2))

    def forward(self, features: Tensor) -> Tensor:
        """``(N, C)`` kernel similarities ``K_c`` of the features to every class centroid."""
        return self.kernel(self.embed(features))

    @torch.no_grad()
    def update_centroids(self, embeddings: Tensor, one_hot: Tensor) -> None:
        """One moving-average step of the centroid statistics.

        ``n_c <- gamma n_c + (1 - gamma) sum_i y_ic`` and ``m_c <- gamma m_c + (1 - gamma) sum_i y_ic e_ic``.

        Under ``torch.distributed`` the batch's class-wise sums and counts are all-reduced first, so every rank
        applies the update of the global batch.

        Args:
            embeddings: ``(N, C, embedding_dim)`` class embeddings of the batch (see :meth:`embed`).
            one_hot: ``(N, C)`` one-hot labels.
        """
        if embeddings.shape[:2] != one_hot.shape or embeddings.shape[1:] != (self.num_classes, self.embedding_dim):
            raise ValueError(
                f"expected embeddings (N, {self.num_classes}, {self.embedding_dim}) and one-hot labels "
                f"(N, {self.num_classes}), got {tuple(embeddings.shape)} and {tuple(one_hot.shape)}"
            )
        one_hot = one_hot.to(self.centroid_sums.dtype)
        batch_counts = one_hot.sum(dim=0)
        batch_sums = torch.einsum("nce,nc->ce", embeddings.to(self.centroid_sums.dtype), one_hot)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_counts, op=dist.ReduceOp.SUM)
            dist.all_reduce(batch_sums, op=dist.ReduceOp.SUM)
        self.centroid_counts.mul_(self.gamma).add_(batch_counts, alpha=1 - self.gamma)
        self.centroid_sums.mul_(self.gamma).add_(batch_sums, alpha=1 - self.gamma)


class DUQClassifier(nn.Module):
    """A feature extractor with a DUQ head: ``forward(images) -> (N, C)`` kernel similarities.

    Args:
        network: the feature extractor (its ``classify`` layer is not used).
        head: the DUQ head over ``network``'s features.
    """

    def __init__(self, network: FeatureClassifier, head: DUQHead):
        super().__init__()
        if network.feature_dim != head.feature_dim:
            raise ValueError(f"the head expects {head.feature_dim} features, the network has {network.feature_dim}")
        self.network = network
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.network.forward_features(images)[0])

    def uncertainty(self, images: Tensor) -> Tensor:
        """``(N,)`` DUQ uncertainty ``-max_c K_c`` (higher = more likely out of distribution)."""
        return duq_uncertainty(self(images))


class DUQFeatureClassifier(FeatureClassifier):
    """A DUQ model as a :class:`FeatureClassifier` to explain: logits ``log K_c``, so ``softmax = K_c / sum_c K_c``.

    The prediction (``argmax_c K_c``) is DUQ's; the network's own ``classify`` layer (never trained by DUQTask) is
    not used. ``head`` is what DISC's DUQ manifold term reads.

    Args:
        network: the trained feature extractor.
        head: its trained DUQ head.
    """

    def __init__(self, network: FeatureClassifier, head: DUQHead):
        super().__init__()
        if network.feature_dim != head.feature_dim:
            raise ValueError(f"the head expects {head.feature_dim} features, the network has {network.feature_dim}")
        self.network, self.head = network, head
        self.in_channels, self.num_classes = network.in_channels, head.num_classes
        self.feature_dim, self.stage_channels, self.image_size = (
            network.feature_dim,
            network.stage_channels,
            network.image_size,
        )

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.network.forward_features(images)

    def classify(self, features: Tensor) -> Tensor:
        """``(N, C)`` logits ``log K_c(features)``."""
        return self.head(features).clamp_min(torch.finfo(features.dtype).tiny).log()


def duq_uncertainty(kernel_values: Tensor) -> Tensor:
    """``-max_c K_c`` of ``(N, C)`` kernel similarities."""
    return -kernel_values.max(dim=1).values


def gradient_penalty(inputs: Tensor, kernel_values: Tensor) -> Tensor:
    """DUQ's two-sided penalty ``mean_i (||d sum_c K_c(x_i) / d x_i||_2 - 1)^2``.

    Args:
        inputs: ``(N, ...)`` inputs with ``requires_grad`` that ``kernel_values`` were computed from.
        kernel_values: ``(N, C)`` kernel similarities.

    Returns:
        The scalar penalty, differentiable (the input gradient is built with ``create_graph=True``).
    """
    if not inputs.requires_grad:
        raise ValueError("the gradient penalty needs inputs with requires_grad=True")
    (gradients,) = torch.autograd.grad(kernel_values.sum(), inputs, create_graph=True)
    norms = gradients.flatten(1).norm(dim=1)
    return (norms - 1).square().mean()


def kernel_margin_loss(kernel_values: Tensor, source: Tensor, target: Tensor, margin: float = 0.5) -> Tensor:
    """DISC's DUQ manifold-consistency term ``max(K_source - K_target + margin, 0)`` per sample.

    Args:
        kernel_values: ``(N, C)`` kernel similarities of the counterfactuals.
        source: ``(N,)`` original classes.
        target: ``(N,)`` target classes.
        margin: the margin tau (0.5).

    Returns:
        ``(N,)`` per-sample losses.
    """
    source_similarity = kernel_values.gather(1, source[:, None]).squeeze(1)
    target_similarity = kernel_values.gather(1, target[:, None]).squeeze(1)
    return (source_similarity - target_similarity + margin).clamp(min=0)
