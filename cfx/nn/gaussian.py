"""DDU class-conditional Gaussians: one full-covariance Gaussian per class over a classifier's features.

Fitted in float64 from per-class sums, outer products and counts (so a fit spread over several processes
reduces to exactly the statistics of one process); a singular covariance gets the smallest jitter of the
ladder 0, 1e-308, 1e-307, ..., 1e-1 that makes it positive definite, so classes with fewer samples than
feature dimensions never crash.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

from cfx.io import atomic_torch_save
from cfx.nn.classifier import FeatureClassifier

JITTER_LADDER: tuple[float, ...] = (0.0, *(10.0**exponent for exponent in range(-308, 0)))
FILE_FORMAT = "cfx.ClassGaussians"


def _positive_definite(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factors of a ``(C, D, D)`` stack and a ``(C,)`` mask of the matrices that were positive definite."""
    factors, info = torch.linalg.cholesky_ex(matrices)
    valid = (info == 0) & torch.isfinite(factors).all(dim=(-2, -1))
    return factors, valid


class ClassGaussians(nn.Module):
    """One Gaussian ``N(means[c], covariances[c] + jitter[c] * I)`` per class, evaluated in float64.

    Args:
        means: ``(C, D)`` class means.
        covariances: ``(C, D, D)`` symmetric class covariances (without jitter).
        jitter: ``(C,)`` diagonal jitter of each class; the jittered covariances must be positive definite.

    Buffers (saved in ``state_dict``, moved by ``.to(device)``): ``means``, ``covariances``, ``jitter`` and
    ``cholesky``, the lower Cholesky factor of each jittered covariance. They are float64: move the module
    with ``.to(device)`` but do not cast it (``.float()``), which would lose the precision the fit needs.
    """

    means: Tensor
    covariances: Tensor
    jitter: Tensor
    cholesky: Tensor

    def __init__(self, means: Tensor, covariances: Tensor, jitter: Tensor):
        super().__init__()
        if means.ndim != 2:
            raise ValueError(f"expected means of shape (C, D), got {tuple(means.shape)}")
        num_classes, dim = means.shape
        if covariances.shape != (num_classes, dim, dim):
            raise ValueError(
                f"expected covariances of shape ({num_classes}, {dim}, {dim}) to match means {tuple(means.shape)}, "
                f"got {tuple(covariances.shape)}"
            )
        if jitter.shape != (num_classes,):
            raise ValueError(f"expected jitter of shape ({num_classes},), got {tuple(jitter.shape)}")
        means, covariances, jitter = (t.detach().to(torch.float64) for t in (means, covariances, jitter))
        if not (torch.isfinite(means).all() and torch.isfinite(covariances).all() and torch.isfinite(jitter).all()):
            raise ValueError("means, covariances and jitter must be finite")
        identity = torch.eye(dim, dtype=torch.float64, device=means.device)
        factors, valid = _positive_definite(covariances + jitter[:, None, None] * identity)
        if not valid.all():
            bad = torch.nonzero(~valid).flatten().tolist()
            raise ValueError(f"the jittered covariances of classes {bad} are not positive definite")
        self.register_buffer("means", means)
        self.register_buffer("covariances", covariances)
        self.register_buffer("jitter", jitter)
        self.register_buffer("cholesky", factors)

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return self.means.shape[0]

    @property
    def feature_dim(self) -> int:
        """Feature dimension ``D``."""
        return self.means.shape[1]

    @classmethod
    def from_statistics(cls, counts: Tensor, sums: Tensor, outer_products: Tensor) -> ClassGaussians:
        """Solve for means, covariances ``X^T X / (n - 1)`` of the centred features, and the jitter of each class.

        Args:
            counts: ``(C,)`` number of samples per class (every class needs at least one).
            sums: ``(C, D)`` per-class feature sums.
            outer_products: ``(C, D, D)`` per-class sums of ``z z^T``.

        Returns:
            The fitted Gaussians. A class with a single sample gets a zero covariance plus the smallest jitter
            (1e-308): a near point mass whose log-density is -inf away from its sample.
        """
        counts, sums, outer_products = (t.detach().to(torch.float64) for t in (counts, sums, outer_products))
        if counts.ndim != 1 or sums.shape[:1] != counts.shape or outer_products.shape[:1] != counts.shape:
            raise ValueError(
                f"expected counts (C,), sums (C, D) and outer products (C, D, D); got {tuple(counts.shape)}, "
                f"{tuple(sums.shape)} and {tuple(outer_products.shape)}"
            )
        empty = torch.nonzero(counts < 1).flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples: cannot fit their Gaussians")
        means = sums / counts[:, None]
        centred = outer_products - counts[:, None, None] * means[:, :, None] * means[:, None, :]
        covariances = centred / (counts - 1).clamp(min=1)[:, None, None]
        covariances = (covariances + covariances.transpose(1, 2)) / 2
        return cls(means, covariances, choose_jitter(covariances))

    def log_prob(self, features: Tensor) -> Tensor:
        """Log-density of every sample under every class Gaussian.

        Args:
            features: ``(N, D)`` feature vectors (differentiable; computed in float64).

        Returns:
            ``(N, C)`` log p_c(z), in the dtype of ``features``.
        """
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"expected features of shape (N, {self.feature_dim}) (feature_dim {self.feature_dim}), "
                f"got {tuple(features.shape)} (dimension {features.shape[-1] if features.ndim else 'none'})"
            )
        log_density = self.distribution.log_prob(features.to(torch.float64)[:, None, :])  # (N, C)
        return log_density.to(features.dtype if features.is_floating_point() else torch.float64)

    @property
    def distribution(self) -> MultivariateNormal:
        """The ``C`` class Gaussians as one batched float64 ``MultivariateNormal`` (from the Cholesky factors)."""
        # the factors were checked at construction (lower triangular, positive diagonal): no re-validation per call
        return MultivariateNormal(
            self.means.to(torch.float64), scale_tril=self.cholesky.to(torch.float64), validate_args=False
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.log_prob(features)

    def log_density(self, features: Tensor) -> Tensor:
        """``(N,)`` log-density of the equal-weight mixture, ``logsumexp_c log p_c(z) - log C``.

        DDU's score: a low density means high epistemic uncertainty.
        """
        return torch.logsumexp(self.log_prob(features), dim=1) - math.log(self.num_classes)

    def save(self, path: str | Path) -> None:
        """Write the Gaussians to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
        payload = {
            "format": FILE_FORMAT,
            "means": self.means.cpu(),
            "covariances": self.covariances.cpu(),
            "jitter": self.jitter.cpu(),
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ClassGaussians:
        """Read Gaussians written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a readable ClassGaussians file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no class Gaussians at {path.resolve()} (fit them with the cfx.tasks.FitClassGaussians callback)"
            )
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{path} is not a readable ClassGaussians file ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a ClassGaussians file (expected a dict with format {FILE_FORMAT!r})")
        return cls(payload["means"], payload["covariances"], payload["jitter"])


def choose_jitter(covariances: Tensor) -> Tensor:
    """Per class, the first jitter of :data:`JITTER_LADDER` whose ``covariance + jitter * I`` is positive definite.

    Args:
        covariances: ``(C, D, D)`` symmetric float64 matrices.

    Returns:
        ``(C,)`` float64 jitters.

    Raises:
        ValueError: a class is not positive definite even with the largest jitter (e.g. non-finite values).
    """
    num_classes, dim = covariances.shape[0], covariances.shape[-1]
    identity = torch.eye(dim, dtype=covariances.dtype, device=covariances.device)
    jitter = torch.full((num_classes,), math.nan, dtype=covariances.dtype, device=covariances.device)
    pending = torch.arange(num_classes, device=covariances.device)
    for value in JITTER_LADDER:
        _, valid = _positive_definite(covariances[pending] + value * identity)
        jitter[pending[valid]] = value
        pending = pending[~valid]
        if len(pending) == 0:
            return jitter
    raise ValueError(
        f"the covariances of classes {pending.tolist()} are not positive definite even with jitter {JITTER_LADDER[-1]}"
    )


def class_feature_statistics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class counts, feature sums and sums of outer products, in float64.

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        ``counts (C,)``, ``sums (C, D)`` and ``outer_products (C, D, D)``.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"expected features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"expected integer labels, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    values = features.detach().to(torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("features contain NaN or infinite values")
    one_hot = nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)
    counts = one_hot.sum(dim=0)
    sums = one_hot.T @ values
    outer_products = torch.zeros(
        num_classes, values.shape[1], values.shape[1], dtype=torch.float64, device=values.device
    )
    for label in torch.unique(labels).tolist():  # one matrix product per class present (never a loop over samples)
        members = values[labels == label]
        outer_products[label] = members.T @ members
    return counts, sums, outer_products


def _all_reduce(tensors: Iterable[Tensor]) -> None:
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@torch.no_grad()
def fit_class_gaussians(classifier: FeatureClassifier, dataloader: Iterable, num_classes: int) -> ClassGaussians:
    """Fit one Gaussian per class to the classifier's features over a loader of cfx dict batches.

    Under ``torch.distributed`` each rank passes its own share of the data (e.g. ``datamodule.eval_dataloader``,
    which is unpadded); the statistics are all-reduced before solving, so every rank gets the Gaussians of
    the whole data set.

    Args:
        classifier: the feature extractor (evaluated in eval mode; its mode is restored afterwards).
        dataloader: yields dicts with ``"image"`` and ``"label"``.
        num_classes: number of classes.

    Returns:
        The fitted :class:`ClassGaussians`, on the classifier's device.
    """
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    counts = sums = outer_products = None
    try:
        for batch in dataloader:
            features = classifier.forward_features(batch["image"].to(device))[0]
            statistics = class_feature_statistics(features, batch["label"].to(device), num_classes)
            if counts is None:
                counts, sums, outer_products = statistics
            else:
                counts, sums, outer_products = (
                    a + b for a, b in zip((counts, sums, outer_products), statistics, strict=True)
                )
    finally:
        classifier.train(was_training)
    if counts is None:
        dim = classifier.feature_dim
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        outer_products = torch.zeros(num_classes, dim, dim, dtype=torch.float64, device=device)
    _all_reduce((counts, sums, outer_products))
    return ClassGaussians.from_statistics(counts, sums, outer_products)
