"""The counterfactual metric suite as a torchmetrics class (``cat`` states, exact under DDP) and method tables."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cfx.metrics.functional.counterfactual import (
    RECORD_KEYS,
    _counterfactual_compute,
    _counterfactual_update,
    intersection_mask,
    sort_record,
)

_INTEGER_KEYS = ("index", "target", "iterations")


class CounterfactualMetrics(Metric):
    """Validity, distances, confidence, iterations, realism and time of a counterfactual method.

    Every pair's values are kept in ``cat`` states, so :meth:`compute` sees all processes' pairs and equals a
    one-process run. ``compute`` returns (see ``functional.counterfactual._counterfactual_compute``):
    ``pairs``, ``validity``, ``failure_rate`` and ``seconds_per_counterfactual`` over all pairs, and the means
    ``l0``, ``l1``, ``mse``, ``concentration``, ``target_confidence``, ``iterations`` (plus
    ``iterations_median``) and ``nll`` over the *successful* pairs. :meth:`record` returns the per-pair values,
    ordered by ``(index, target)``, for :func:`intersection_table`.

    Args:
        realism: expect the feature NLL under the class Gaussians in every ``update`` (adds ``nll``).
        l0_tolerance: changes up to this size do not count for L0.
        concentration_threshold: the change a pixel needs to count for the concentration box.
        **kwargs: see ``torchmetrics.Metric``.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self, realism: bool = False, l0_tolerance: float = 0.0, concentration_threshold: float = 0.05, **kwargs
    ):
        super().__init__(**kwargs)
        if l0_tolerance < 0:
            raise ValueError(f"l0_tolerance must be >= 0, got {l0_tolerance}")
        self.realism = realism
        self.l0_tolerance = l0_tolerance
        self.concentration_threshold = concentration_threshold
        self.keys = RECORD_KEYS + (("nll",) if realism else ())
        for key in self.keys:
            self.add_state(key, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)  # an empty process sends its share in this dtype

    def update(
        self,
        indices: Tensor,
        targets: Tensor,
        originals: Tensor,
        counterfactuals: Tensor,
        success: Tensor,
        target_probability: Tensor,
        iterations: Tensor,
        seconds: float = 0.0,
        nll: Tensor | None = None,
    ) -> None:
        """Add a batch of ``N`` pairs.

        Args:
            indices: ``(N,)`` dataset index of each pair's query.
            targets: ``(N,)`` target classes.
            originals: ``(N, C, H, W)`` queries.
            counterfactuals: ``(N, C, H, W)`` counterfactuals.
            success: ``(N,)`` bool, the target was reached.
            target_probability: ``(N,)`` target-class probability at the counterfactual.
            iterations: ``(N,)`` steps each pair took.
            seconds: the explainer's time for the whole batch (shared equally by its pairs).
            nll: ``(N,)`` feature NLL (``functional.feature_nll``); required with ``realism``, else ``None``.
        """
        distances = _counterfactual_update(originals, counterfactuals, self.l0_tolerance, self.concentration_threshold)
        size = originals.shape[0]
        per_pair = {
            "index": indices,
            "target": targets,
            "success": success,
            "target_probability": target_probability,
            "iterations": iterations,
            **({"nll": nll} if nll is not None else {}),
        }
        wrong = {key: tuple(value.shape) for key, value in per_pair.items() if value.shape != (size,)}
        if wrong:
            raise ValueError(f"expected per-pair tensors of shape ({size},) like the {size} images, got {wrong}")
        if (nll is not None) != self.realism:
            raise ValueError(
                "nll is required when the metric was built with realism=True"
                if self.realism
                else "got an nll but the metric was built with realism=False"
            )
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
        per_pair["seconds"] = torch.full((size,), seconds / max(size, 1), dtype=torch.float64)
        per_pair.update(distances)
        for key in self.keys:  # every state float64 (exact for indices < 2**53): one dtype for the gather
            getattr(self, key).append(per_pair[key].detach().to(device=self.device, dtype=torch.float64))

    def record(self) -> dict[str, Tensor]:
        """The per-pair values of every process, ordered by ``(index, target)``."""
        sync = self._to_sync and not self._is_synced  # inside ``compute`` the states are synced already
        with self.sync_context(should_sync=sync, should_unsync=sync):
            states = {key: getattr(self, key) for key in self.keys}
            record = {
                key: torch.zeros(0, dtype=torch.float64, device=self.device)
                if isinstance(value, list) and not value
                else dim_zero_cat(value)
                for key, value in states.items()
            }
        for key in _INTEGER_KEYS:
            record[key] = record[key].long()
        record["success"] = record["success"].bool()
        return sort_record(record)

    def compute(self) -> dict[str, Tensor]:
        return _counterfactual_compute(self.record())


def intersection_table(records: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Compare methods on the pairs ``(index, target)`` that every method solved (DeDUCE's Table-1 protocol).

    Args:
        records: method name -> its :meth:`CounterfactualMetrics.record`, or the dict of its ``counterfactuals.pt``
            (``cfx.tasks.load_counterfactual_results``).

    Returns:
        Method name -> metric -> value. ``pairs``, ``l0``, ``l1``, ``mse``, ``concentration``,
        ``target_confidence``, ``iterations``, ``iterations_median`` and ``nll`` are over the common pairs;
        ``failure_rate`` and ``seconds_per_counterfactual`` are over all of the method's own pairs.
    """
    masks = intersection_mask(records)
    table = {}
    for name, record in records.items():
        own = _counterfactual_compute(record)
        common = _counterfactual_compute(record, masks[name])
        common["failure_rate"] = own["failure_rate"]
        common["seconds_per_counterfactual"] = own["seconds_per_counterfactual"]
        del common["validity"]
        table[name] = {key: float(value) for key, value in common.items()}
    return table


def markdown_table(table: dict[str, dict[str, float]], digits: int = 4) -> str:
    """Render ``{row name: {column: value}}`` (e.g. :func:`intersection_table`) as a Markdown table."""
    columns = list(dict.fromkeys(column for row in table.values() for column in row))
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        cells = [f"{row[column]:.{digits}g}" if column in row else "" for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
