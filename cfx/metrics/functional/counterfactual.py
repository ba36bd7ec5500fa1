"""Counterfactual quality per (original, counterfactual) pair, and summaries over per-pair records (pure torch).

A *record* is a dict of equally long 1-D tensors, one entry per pair, described once by :data:`PAIR_SCHEMA`
(name -> dtype, meaning, how it is measured and how it is summarised). The schema drives everything else: the
record of a batch (:func:`measure_pairs`), the check (:func:`check_record`), empty records, the metric states of
``cfx.metrics.CounterfactualMetrics``, the per-pair keys of a ``counterfactuals.pt`` file and the summary
(:func:`_counterfactual_compute`). Entries of a record outside the schema (e.g. the images of a
``counterfactuals.pt`` file) are ignored. Adding a measure = one schema entry (+ its measuring function).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from cfx.nn.gaussian import ClassGaussians


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


ORACLE_KEYS = ("oracle_target_probability", "oracle_valid", "oracle_original_probability")
"""The record entries an independent oracle classifier measures (:func:`oracle_measures`)."""


def oracle_measures(probabilities: Tensor, targets: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """What an independent classifier (the oracle) says about each counterfactual.

    A counterfactual that only fools the explained classifier is an adversarial example: an oracle trained
    separately (another architecture and seed) that also predicts the target says the change carries over.

    Args:
        probabilities: ``(N, K)`` the oracle's class probabilities at the counterfactuals.
        targets: ``(N,)`` target classes.
        classes: ``(N,)`` each query's original class (the class it is explained from).

    Returns:
        :data:`ORACLE_KEYS`: ``oracle_target_probability`` and ``oracle_original_probability`` (float64, the
        oracle's probability of the target and of the original class) and ``oracle_valid`` (bool, the oracle's
        prediction is the target), each ``(N,)``.
    """
    if probabilities.ndim != 2 or not probabilities.is_floating_point():
        raise ValueError(
            f"expected (N, K) floating-point probabilities, got {probabilities.dtype} {tuple(probabilities.shape)}"
        )
    size, num_classes = probabilities.shape
    for name, value in (("targets", targets), ("classes", classes)):
        if value.shape != (size,) or value.is_floating_point():
            raise ValueError(f"expected {size} integer {name}, got {value.dtype} {tuple(value.shape)}")
        if ((value < 0) | (value >= num_classes)).any():
            raise ValueError(f"{name} must be classes 0..{num_classes - 1} of the oracle, got {value.tolist()}")
    probabilities = probabilities.detach().to(torch.float64)
    return {
        "oracle_target_probability": probabilities.gather(1, targets.long()[:, None]).squeeze(1),
        "oracle_valid": probabilities.argmax(dim=1) == targets,
        "oracle_original_probability": probabilities.gather(1, classes.long()[:, None]).squeeze(1),
    }


@dataclass(frozen=True)
class PairInputs:
    """What the measured entries of a batch's record are computed from.

    Attributes:
        originals: ``(N, C, H, W)`` queries.
        counterfactuals: ``(N, C, H, W)`` counterfactuals (floating point, like the queries).
        seconds: the explainer's time for the whole batch (shared equally by its pairs).
        l0_tolerance: changes up to this size do not count for L0.
        concentration_threshold: the change a pixel needs to count for the concentration box.
    """

    originals: Tensor
    counterfactuals: Tensor
    seconds: float = 0.0
    l0_tolerance: float = 0.0
    concentration_threshold: float = 0.05

    def __post_init__(self) -> None:
        _check_pairs(self.originals, self.counterfactuals)
        if self.seconds < 0 or not math.isfinite(self.seconds):
            raise ValueError(f"seconds must be finite and >= 0, got {self.seconds}")
        if self.l0_tolerance < 0:
            raise ValueError(f"l0_tolerance must be >= 0, got {self.l0_tolerance}")


@dataclass(frozen=True)
class PairField:
    """One per-pair entry of a record.

    Attributes:
        dtype: its dtype in a record.
        description: what it is and how it is measured.
        measure: computes it from a batch's :class:`PairInputs`; ``None``: the caller gives it (e.g. from the
            explainer's result).
        success_mean: summary name of its mean over the successful pairs (``None``: not summarised so).
        success_median: summary name of its median over the successful pairs.
        pair_mean: summary name of its mean over all pairs.
        pair_mean_complement: summary name of ``1 -`` that mean.
        optional: in a record only when measured (the feature NLL needs class Gaussians).
    """

    dtype: torch.dtype
    description: str
    measure: Callable[[PairInputs], Tensor] | None = None
    success_mean: str | None = None
    success_median: str | None = None
    pair_mean: str | None = None
    pair_mean_complement: str | None = None
    optional: bool = False


def _seconds_share(inputs: PairInputs) -> Tensor:
    size = inputs.originals.shape[0]
    return torch.full((size,), inputs.seconds / max(size, 1), dtype=torch.float64, device=inputs.originals.device)


PAIR_SCHEMA: dict[str, PairField] = {
    "index": PairField(torch.int64, "dataset index of the query"),
    "target": PairField(torch.int64, "target class"),
    "label": PairField(torch.int64, "the query's label in the data"),
    "original_prediction": PairField(torch.int64, "the classifier's prediction on the query"),
    "success": PairField(
        torch.bool,
        "the target was reached (the explainer's confidence criterion)",
        pair_mean="validity",
        pair_mean_complement="failure_rate",
    ),
    "seconds": PairField(
        torch.float64,
        "the pair's share of the explainer's time for its batch",
        measure=_seconds_share,
        pair_mean="seconds_per_counterfactual",
    ),
    "l0": PairField(
        torch.float64,
        "entries changed by more than l0_tolerance (l0_distance)",
        measure=lambda inputs: l0_distance(inputs.originals, inputs.counterfactuals, inputs.l0_tolerance),
        success_mean="l0",
    ),
    "l1": PairField(
        torch.float64,
        "sum |x' - x| (l1_distance)",
        measure=lambda inputs: l1_distance(inputs.originals, inputs.counterfactuals),
        success_mean="l1",
    ),
    "mse": PairField(
        torch.float64,
        "mean (x' - x)^2 (mse)",
        measure=lambda inputs: mse(inputs.originals, inputs.counterfactuals),
        success_mean="mse",
    ),
    "concentration": PairField(
        torch.float64,
        "area fraction of the box around the changed pixels (concentration)",
        measure=lambda inputs: concentration(inputs.originals, inputs.counterfactuals, inputs.concentration_threshold),
        success_mean="concentration",
    ),
    "target_probability": PairField(
        torch.float64, "softmax probability of the target at the counterfactual", success_mean="target_confidence"
    ),
    "counterfactual_prediction": PairField(torch.int64, "the classifier's predicted class at the counterfactual"),
    "iterations": PairField(
        torch.int64, "optimisation steps the pair took", success_mean="iterations", success_median="iterations_median"
    ),
    "nll": PairField(
        torch.float64,
        "feature NLL under the target's class Gaussian (feature_nll: realism)",
        success_mean="nll",
        optional=True,
    ),
    # an independent oracle classifier (oracle_measures): does the counterfactual convince it too, or is it
    # adversarial to the explained classifier only? oracle_validity (the headline, DISC's question) is the
    # transfer rate over the successful pairs; oracle_validity_all_pairs counts every pair's counterfactual
    # (a failed search's last iterate too)
    "oracle_target_probability": PairField(
        torch.float64,
        "the oracle's softmax probability of the target at the counterfactual",
        success_mean="oracle_target_confidence",
        optional=True,
    ),
    "oracle_valid": PairField(
        torch.bool,
        "the oracle's prediction at the counterfactual is the target",
        success_mean="oracle_validity",
        pair_mean="oracle_validity_all_pairs",
        optional=True,
    ),
    "oracle_original_probability": PairField(
        torch.float64,
        "the oracle's softmax probability of the query's original class at the counterfactual",
        success_mean="oracle_original_confidence",
        optional=True,
    ),
    # the AnoGAN realism score under a WGAN of the data (cfx.metrics.functional.anogan.anogan_score, lower = more
    # realistic; DeDUCE's Table 1): the counterfactual's and, for comparison, its query's
    "anogan": PairField(
        torch.float64,
        "AnoGAN score of the counterfactual (anogan_score: realism, lower = more realistic)",
        success_mean="anogan",
        optional=True,
    ),
    "query_anogan": PairField(
        torch.float64,
        "AnoGAN score of the query the counterfactual was made from (anogan_score)",
        success_mean="query_anogan",
        optional=True,
    ),
}


def record_keys(optional: Collection[str] = ()) -> tuple[str, ...]:
    """The keys of a record in schema order: every required entry, plus the ``optional`` ones named.

    Raises:
        ValueError: a name in ``optional`` is not an optional entry of :data:`PAIR_SCHEMA`.
    """
    unknown = sorted(set(optional) - {key for key, field in PAIR_SCHEMA.items() if field.optional})
    if unknown:
        optional_keys = [key for key, field in PAIR_SCHEMA.items() if field.optional]
        raise ValueError(f"the optional record entries are {optional_keys}, got {unknown}")
    return tuple(key for key, field in PAIR_SCHEMA.items() if not field.optional or key in optional)


def empty_record(optional: Collection[str] = ()) -> dict[str, Tensor]:
    """A record without pairs: every key of :func:`record_keys` as an empty tensor of its schema dtype."""
    return {key: torch.zeros(0, dtype=PAIR_SCHEMA[key].dtype) for key in record_keys(optional)}


def measure_pairs(inputs: PairInputs, given: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The record of a batch of ``N`` pairs: every measured entry computed once, the others taken from ``given``.

    Args:
        inputs: the batch's images, time and measuring options.
        given: the entries without a ``measure`` (``index``, ``target``, ``label``, ``original_prediction``,
            ``success``, ``target_probability``, ``iterations``; ``nll`` and the :data:`ORACLE_KEYS`
            optionally), each ``(N,)``.

    Returns:
        The record in schema order, each entry detached and cast to its schema dtype (on the images' device).

    Raises:
        ValueError: an entry is missing, unknown, measured (so not to be given) or not of shape ``(N,)``.
    """
    measured = {key for key, field in PAIR_SCHEMA.items() if field.measure is not None}
    required = {key for key, field in PAIR_SCHEMA.items() if field.measure is None and not field.optional}
    missing = sorted(required - set(given))
    unexpected = sorted((set(given) - set(PAIR_SCHEMA)) | (set(given) & measured))
    if missing or unexpected:
        raise ValueError(
            f"expected the per-pair entries {sorted(required)} (optionally "
            f"{[key for key, field in PAIR_SCHEMA.items() if field.optional]}); missing {missing}, "
            f"unexpected or measured here {unexpected}"
        )
    size = inputs.originals.shape[0]
    wrong = {key: tuple(value.shape) for key, value in given.items() if tuple(value.shape) != (size,)}
    if wrong:
        raise ValueError(f"expected per-pair tensors of shape ({size},) like the {size} images, got {wrong}")
    device = inputs.originals.device
    record = {}
    for key, field in PAIR_SCHEMA.items():
        if field.measure is not None:
            record[key] = field.measure(inputs)
        elif key in given:
            record[key] = given[key]
        else:
            continue
        record[key] = record[key].detach().to(device=device, dtype=field.dtype)
    return record


def check_record(record: Mapping[str, Tensor]) -> int:
    """Raise ``ValueError`` unless ``record`` holds the schema's entries as 1-D tensors of one length and their dtypes.

    Every required entry of :data:`PAIR_SCHEMA` must be there; optional ones are checked when present; other
    keys are ignored.

    Returns:
        The number of pairs.
    """
    keys = record_keys(key for key, field in PAIR_SCHEMA.items() if field.optional and key in record)
    missing = [key for key in keys if not isinstance(record.get(key), Tensor)]
    if missing:
        raise ValueError(f"a counterfactual record needs the tensors {list(record_keys())}; missing {missing}")
    wrong_dtypes = {
        key: f"{record[key].dtype}, expected {PAIR_SCHEMA[key].dtype}"
        for key in keys
        if record[key].dtype != PAIR_SCHEMA[key].dtype
    }
    if wrong_dtypes:
        raise ValueError(f"a counterfactual record has entries of the wrong dtype: {wrong_dtypes}")
    shapes = {key: tuple(record[key].shape) for key in keys}
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


def _counterfactual_compute(record: Mapping[str, Tensor], selection: Tensor | None = None) -> dict[str, Tensor]:
    """Summary of the record's pairs (all, or those where ``selection`` is true), as :data:`PAIR_SCHEMA` says.

    ``pairs``, then each entry's ``pair_mean`` (and ``pair_mean_complement``) over the selected pairs
    (``validity``, ``failure_rate``, ``seconds_per_counterfactual``; with an oracle ``oracle_validity_all_pairs``),
    then each recorded entry's ``success_mean`` / ``success_median`` over the selected *successful* pairs
    (``l0``, ``l1``, ``mse``, ``concentration``, ``target_confidence``, ``iterations``, ``iterations_median``,
    ``nll``; with an oracle ``oracle_target_confidence``, ``oracle_validity`` — the transfer rate — and
    ``oracle_original_confidence``); NaN where there is nothing to average.

    Returns:
        A dict of float64 scalars.
    """
    size = check_record(record)
    device = record["index"].device
    selected = torch.ones(size, dtype=torch.bool, device=device) if selection is None else selection.bool()
    if selected.shape != (size,):
        raise ValueError(f"expected a selection of shape ({size},), got {tuple(selected.shape)}")
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    successes = selected & record["success"]
    summary = {"pairs": selected.sum().to(torch.float64)}
    for key, field in PAIR_SCHEMA.items():
        if field.pair_mean is not None and key in record:
            values = record[key].to(torch.float64)[selected]
            summary[field.pair_mean] = values.mean() if len(values) else nan
            if field.pair_mean_complement is not None:
                summary[field.pair_mean_complement] = 1 - summary[field.pair_mean]
    for key, field in PAIR_SCHEMA.items():
        if key in record:
            values = record[key].to(torch.float64)[successes]
            if field.success_mean is not None:
                summary[field.success_mean] = values.mean() if len(values) else nan
            if field.success_median is not None:
                summary[field.success_median] = torch.quantile(values, 0.5) if len(values) else nan
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
