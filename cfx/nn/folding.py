"""Inference copies of a classifier for search loops: parametrisations baked in, eval-mode batch norm folded.

An explainer evaluates the same frozen classifier thousands of times per query. In eval mode a batch norm is an
affine map per channel, so it can be folded into the convolution before it (``W' = W * s``, ``b' = (b - mu) * s +
beta`` with ``s = gamma / sqrt(var + eps)``), and a weight parametrisation (soft spectral norm) is a constant that
need not be recomputed at every forward. :func:`inference_copy` does both on a deep copy; the user's module is
never changed. Folding changes floating-point rounding (logits agree to about 1e-6 relative, not bit for bit).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cfx.nn.classifier import FeatureClassifier


@torch.no_grad()
def bake_parametrizations(module: nn.Module) -> int:
    """Replace every parametrised tensor of ``module`` by a plain parameter holding its current value, in place.

    Unlike ``torch.nn.utils.parametrize.remove_parametrizations``, this never edits the parametrised class,
    which a deep copy shares with its original (removing it there would break the original). Call it on a
    module in eval mode: a parametrisation such as spectral norm may update its buffers in training mode.

    Returns:
        How many tensors were baked.
    """
    baked = 0
    for layer in list(module.modules()):
        if not parametrize.is_parametrized(layer):
            continue
        values = {name: getattr(layer, name).detach().clone() for name in layer.parametrizations}
        del layer._modules["parametrizations"]
        layer.__class__ = layer.__class__.__bases__[0]  # the class before parametrisation
        for name, value in values.items():
            layer.register_parameter(name, nn.Parameter(value, requires_grad=False))
        baked += len(values)
    return baked


@torch.no_grad()
def fold_into_convolution(convolution: nn.Conv2d, batch_norm: nn.BatchNorm2d) -> None:
    """Fold the eval-mode ``batch_norm`` that follows ``convolution`` into the convolution's weight and bias."""
    if batch_norm.running_mean is None or batch_norm.running_var is None:
        raise ValueError("cannot fold a batch norm without running statistics (track_running_stats=False)")
    if batch_norm.num_features != convolution.out_channels:
        raise ValueError(
            f"cannot fold a batch norm over {batch_norm.num_features} channels into a convolution with "
            f"{convolution.out_channels} outputs"
        )
    weight = convolution.weight
    gamma = batch_norm.weight if batch_norm.affine else torch.ones_like(batch_norm.running_mean)
    beta = batch_norm.bias if batch_norm.affine else torch.zeros_like(batch_norm.running_mean)
    scale = (gamma / torch.sqrt(batch_norm.running_var + batch_norm.eps)).to(weight.dtype)
    bias = convolution.bias if convolution.bias is not None else torch.zeros_like(scale)
    convolution.weight = nn.Parameter(weight * scale.view(-1, *([1] * (weight.ndim - 1))), requires_grad=False)
    convolution.bias = nn.Parameter((bias - batch_norm.running_mean) * scale + beta, requires_grad=False)


def _fold_children(module: nn.Module) -> int:
    """Fold each BatchNorm2d registered right after a Conv2d of the same parent; replace it by Identity."""
    folded = 0
    children = list(module.named_children())
    for (_, previous), (name, current) in zip(children, children[1:], strict=False):
        if isinstance(previous, nn.Conv2d) and type(current) is nn.BatchNorm2d:
            fold_into_convolution(previous, current)
            setattr(module, name, nn.Identity())
            folded += 1
    for _, child in children:
        folded += _fold_children(child)
    return folded


def inference_copy(
    classifier: FeatureClassifier, fold_batch_norm: bool = True, probe: Tensor | None = None, tolerance: float = 1e-4
) -> FeatureClassifier:
    """A frozen eval-mode deep copy of ``classifier`` with parametrisations baked in and batch norms folded.

    A batch norm is folded into the convolution registered right before it in the same parent module (the
    order of ``nn.Sequential`` and of the blocks of cfx's ResNet). Registration order need not be the order of
    computation in a user's network, so the copy is checked on ``probe`` images: its logits must match the
    original's.

    Args:
        classifier: the network to copy (left unchanged).
        fold_batch_norm: fold batch norms (``False``: only bake parametrisations).
        probe: ``(N, C, H, W)`` images for the check (default: 4 seeded uniform images when the classifier
            declares its ``image_size``; no check without either).
        tolerance: the largest accepted ``|logits' - logits|``, relative to ``max |logits|``.

    Returns:
        The copy, in eval mode, with ``requires_grad=False`` on every parameter.

    Raises:
        ValueError: the copy's logits differ from the original's on the probe (a batch norm that does not follow
            the convolution it was paired with).
    """
    was_training = classifier.training
    classifier.eval()
    try:
        copied = copy.deepcopy(classifier).eval()
    finally:
        classifier.train(was_training)
    bake_parametrizations(copied)
    if fold_batch_norm:
        _fold_children(copied)
    copied.requires_grad_(False)
    if probe is None and classifier.image_size is not None:
        generator = torch.Generator().manual_seed(0)
        size = classifier.image_size
        probe = torch.rand(4, classifier.in_channels, size, size, generator=generator)
    if probe is not None:
        _check_same_logits(classifier, copied, probe, tolerance)
    return copied


@torch.no_grad()
def _check_same_logits(original: nn.Module, copied: nn.Module, probe: Tensor, tolerance: float) -> None:
    device = next(original.parameters()).device
    was_training = original.training
    original.eval()
    try:
        expected = original(probe.to(device))
    finally:
        original.train(was_training)
    actual = copied.to(device)(probe.to(device))
    error = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    if not error <= tolerance * scale:
        raise ValueError(
            f"the folded copy of {type(original).__name__} changes its logits by {error:.3g} (allowed "
            f"{tolerance * scale:.3g}): a batch norm does not act on the convolution registered before it; "
            "use fold_batch_norm=False"
        )
