"""Counterfactual quality per (original, counterfactual) pair, and summaries over per-pair records (pure torch).

A *record* is a dict of equally long 1-D tensors, one entry per pair: ``index`` (dataset index of the query),
``target``, ``success`` (bool), ``l0``, ``l1``, ``mse``, ``concentration``, ``target_probability``,
``iterations``, ``seconds`` (the pair's share of the explainer's time) and optionally ``nll``; other entries
(e.g. the images and strings of a ``counterfactuals.pt`` file) are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cfx.nn.gaussian import ClassGaussians

RECORD_KEYS = (
    "index",
    "target",
    "success",
    "l0",
    "l1",
    "mse",
    "concentration",
    "target_probability",
    "iterations",
    "seconds",
)
# summary name -> record key of the means over successful pairs
SUCCESS_MEANS = {
    "l0": "l0",
    "l1": "l1",
    "mse": "mse",
    "concentration": "concentration",
    "target_confidence": "target_probability",
    "iterations": "iterations",
    "nll": "nll",
}


def _check_pairs(originals: Tensor, counterfactuals: Tensor) -> None:
    if originals.ndim != 4 or originals.shape != counterfactuals.shape:
        raise ValueError(
            f"expected originals and counterfactuals of the same shape (N, C, H, W), got {tuple(originals.shape)} "
            f"and {tuple(counterfactuals.shape)}"
        )
    if not (originals.is_floating_point() and counterfactuals.is_floating_point()):
        raise ValueError(
            f"expected floating-point images, got {originals.dtype} originals and {counterfactuals.dtype} "
            "counterfactuals"
        )


def _differences(originals: Tensor, counterfactuals: Tensor) -> Tensor:
    _check_pairs(originals, counterfactuals)
    return (counterfactuals.detach().to(torch.float64) - originals.detach().to(torch.float64)).flatten(1)


def l0_distance(originals: Tensor, counterfactuals: Tensor, tolerance: float = 0.0) -> Tensor:
    """Number of changed entries, ``#{|x' - x| > tolerance}`` over the ``C * H * W`` entries of each pair.

    Args:
        originals: ``(N, C, H, W)`` queries.
        counterfactuals: ``(N, C, H, W)`` counterfactuals.
        tolerance: changes up to this size do not count (0: exact inequality).

    Returns:
        ``(N,)`` float64 counts.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return (_differences(originals, counterfactuals).abs() > tolerance).sum(dim=1).to(torch.float64)


def l1_distance(originals: Tensor, counterfactuals: Tensor) -> Tensor:
    """``sum |x' - x|`` over the ``C * H * W`` entries of each pair, ``(N,)`` float64."""
    return _differences(originals, counterfactuals).abs().sum(dim=1)


def mse(originals: Tensor, counterfactuals: Tensor) -> Tensor:
    """``mean (x' - x)^2`` over the ``C * H * W`` entries of each pair, ``(N,)`` float64."""
    return _differences(originals, counterfactuals).square().mean(dim=1)


def concentration(originals: Tensor, counterfactuals: Tensor, threshold: float = 0.05) -> Tensor:
    """DISC's concentration: area fraction of the smallest axis-aligned box holding every changed pixel.

    A pixel is changed when the channel maximum of ``|x - x'|`` exceeds ``threshold``; a pair without changed
    pixels has concentration 0. Lower = more concentrated changes.

    Args:
        originals: ``(N, C, H, W)`` queries.
        counterfactuals: ``(N, C, H, W)`` counterfactuals.
        threshold: the change a pixel needs to count.

    Returns:
        ``(N,)`` float64 fractions in ``[0, 1]``.
    """
    _check_pairs(originals, counterfactuals)
    height, width = originals.shape[-2:]
    changed = (counterfactuals.detach() - originals.detach()).abs().amax(dim=1) > threshold  # (N, H, W)
    return (_extent(changed.any(dim=2)) * _extent(changed.any(dim=1))).to(torch.float64) / (height * width)


def _extent(occupied: Tensor) -> Tensor:
    """Length of the span from the first to the last ``True`` of each row of ``(N, L)``; 0 for an empty row."""
    length = occupied.shape[1]
    first = occupied.to(torch.uint8).argmax(dim=1)
    last = length - 1 - occupied.flip(1).to(torch.uint8).argmax(dim=1)
    return torch.where(occupied.any(dim=1), last - first + 1, 0)


def feature_nll(features: Tensor, targets: Tensor, gaussians: ClassGaussians) -> Tensor:
    """Realism: ``-log p_target(z)`` of each feature vector under its target class's Gaussian (DDU).

    Args:
        features: ``(N, D)`` penultimate features of the counterfactuals.
        targets: ``(N,)`` target classes.
        gaussians: the class Gaussians fitted to the classifier's training features.

    Returns:
        ``(N,)`` float64 negative log-densities (lower = more realistic).
    """
    if targets.shape != features.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"expected {features.shape[0]} integer targets for features {tuple(features.shape)}, got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if ((targets < 0) | (targets >= gaussians.num_classes)).any():
        raise ValueError(f"targets must be classes 0..{gaussians.num_classes - 1}, got {targets.tolist()}")
    log_prob = gaussians.log_prob(features.detach().to(torch.float64))
    return -log_prob.gather(1, targets.long()[:, None]).squeeze(1)


def _counterfactual_update(
    originals: Tensor, counterfactuals: Tensor, l0_tolerance: float = 0.0, concentration_threshold: float = 0.05
) -> dict[str, Tensor]:
    """The per-pair distances of a batch: ``{"l0", "l1", "mse", "concentration"}``, each ``(N,)`` float64."""
    return {
        "l0": l0_distance(originals, counterfactuals, l0_tolerance),
        "l1": l1_distance(originals, counterfactuals),
        "mse": mse(originals, counterfactuals),
        "concentration": concentration(originals, counterfactuals, concentration_threshold),
    }


def check_record(record: dict[str, Tensor]) -> int:
    """Raise ``ValueError`` unless ``record`` holds the per-pair keys as equally long 1-D tensors; return the length."""
    missing = [key for key in RECORD_KEYS if not isinstance(record.get(key), Tensor)]
    if missing:
        raise ValueError(f"a counterfactual record needs the tensors {list(RECORD_KEYS)}; missing {missing}")
    shapes = {key: tuple(record[key].shape) for key in (*RECORD_KEYS, *(("nll",) if "nll" in record else ()))}
    if len(set(shapes.values())) != 1 or len(shapes["index"]) != 1:
        raise ValueError(f"a counterfactual record needs 1-D tensors of one length, got shapes {shapes}")
    return shapes["index"][0]


def sort_record(record: dict[str, Tensor]) -> dict[str, Tensor]:
    """The pairs of ``record`` (tensors with one row per pair, incl. ``index`` and ``target``) by ``(index, target)``.

    The order is canonical: independent of batching, devices and the order processes are gathered in.
    """
    if "index" not in record or "target" not in record:
        raise ValueError(f"a record to sort needs 'index' and 'target', got keys {sorted(record)}")
    lengths = {key: len(value) for key, value in record.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every entry of a record needs one row per pair, got lengths {lengths}")
    order = torch.argsort(record["target"], stable=True)
    order = order[torch.argsort(record["index"][order], stable=True)]
    return {key: value[order] for key, value in record.items()}


def _counterfactual_compute(record: dict[str, Tensor], selection: Tensor | None = None) -> dict[str, Tensor]:
    """Summary of the record's pairs (all, or those where ``selection`` is true).

    ``pairs``, ``validity`` (success rate), ``failure_rate`` and ``seconds_per_counterfactual`` are over the
    selected pairs; ``l0``, ``l1``, ``mse``, ``concentration``, ``target_confidence``, ``iterations``,
    ``iterations_median`` and ``nll`` (if recorded) are means (median) over the selected *successful* pairs,
    NaN when none succeeded.

    Returns:
        A dict of float64 scalars.
    """
    size = check_record(record)
    device = record["index"].device
    selected = torch.ones(size, dtype=torch.bool, device=device) if selection is None else selection.bool()
    if selected.shape != (size,):
        raise ValueError(f"expected a selection of shape ({size},), got {tuple(selected.shape)}")
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    pairs = selected.sum().to(torch.float64)
    successes = selected & record["success"].bool()
    validity = successes.sum() / pairs if pairs > 0 else nan
    summary = {
        "pairs": pairs,
        "validity": validity,
        "failure_rate": 1 - validity,
        "seconds_per_counterfactual": record["seconds"].to(torch.float64)[selected].sum() / pairs if pairs > 0 else nan,
    }
    for name, key in SUCCESS_MEANS.items():
        if key in record:
            values = record[key].to(torch.float64)[successes]
            summary[name] = values.mean() if len(values) else nan
            if name == "iterations":
                summary["iterations_median"] = torch.quantile(values, 0.5) if len(values) else nan
    return summary


def intersection_mask(records: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """For each method's record, the pairs ``(index, target)`` that every method has and every method solved.

    Args:
        records: method name -> its record.

    Returns:
        Method name -> ``(N_method,)`` bool mask of its pairs in the common successful set.
    """
    if not records:
        raise ValueError("need at least one method's record")
    for record in records.values():
        check_record(record)
    num_targets = 1 + max(int(record["target"].max()) if len(record["target"]) else 0 for record in records.values())
    keys = {name: record["index"].long() * num_targets + record["target"].long() for name, record in records.items()}
    common = None
    for name, record in records.items():
        solved = keys[name][record["success"].bool()]
        common = solved if common is None else common[torch.isin(common, solved)]
    return {name: torch.isin(key, common) & records[name]["success"].bool() for name, key in keys.items()}
