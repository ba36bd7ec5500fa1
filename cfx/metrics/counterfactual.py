"""The counterfactual metric suite as a torchmetrics class (``cat`` states, exact under DDP) and method tables."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cfx.metrics.functional.anogan import ANOGAN_KEYS
from cfx.metrics.functional.counterfactual import (
    ORACLE_KEYS,
    PAIR_SCHEMA,
    _counterfactual_compute,
    check_record,
    intersection_mask,
    record_keys,
    sort_record,
)


class CounterfactualMetrics(Metric):
    """Validity, distances, confidence, iterations, realism and time of a counterfactual method.

    One ``cat`` state per entry of ``functional.counterfactual.PAIR_SCHEMA``, so :meth:`compute` sees all
    processes' pairs and equals a one-process run. ``update`` takes a batch's record (made once per batch by
    ``functional.counterfactual.measure_pairs``). ``compute`` returns the schema's summary
    (``functional.counterfactual._counterfactual_compute``): ``pairs``, ``validity``, ``failure_rate`` and
    ``seconds_per_counterfactual`` over all pairs, and the means ``l0``, ``l1``, ``mse``, ``concentration``,
    ``target_confidence``, ``iterations`` (plus ``iterations_median``) and ``nll`` over the *successful* pairs;
    with an oracle ``oracle_validity`` (the transfer rate), ``oracle_target_confidence`` and
    ``oracle_original_confidence`` over the successful pairs and ``oracle_validity_all_pairs`` over all pairs;
    with AnoGAN scores ``anogan`` (of the counterfactual) and ``query_anogan`` over the successful pairs.
    :meth:`record` returns the per-pair values, ordered by ``(index, target)``, for :func:`intersection_table`.

    Args:
        realism: expect the feature NLL under the class Gaussians in every ``update`` (adds ``nll``).
        oracle: expect an independent oracle's measures (``functional.counterfactual.ORACLE_KEYS``) in every
            ``update``.
        anogan: expect the AnoGAN realism scores of counterfactual and query
            (``functional.anogan.ANOGAN_KEYS``) in every ``update``.
        **kwargs: see ``torchmetrics.Metric``.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, realism: bool = False, oracle: bool = False, anogan: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.realism, self.oracle, self.anogan = realism, oracle, anogan
        # argument name -> (whether expected, the record entries it adds)
        self.groups = {"realism": (realism, ("nll",)), "oracle": (oracle, ORACLE_KEYS), "anogan": (anogan, ANOGAN_KEYS)}
        self.optional = tuple(key for expected, keys in self.groups.values() if expected for key in keys)
        self.keys = record_keys(self.optional)
        for key in self.keys:
            self.add_state(key, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)  # an empty process sends its share in this dtype

    def update(self, record: dict[str, Tensor]) -> None:
        """Add a batch's pairs.

        Args:
            record: the batch's record (``functional.counterfactual.measure_pairs``); entries outside the
                schema (images) are ignored. It holds ``nll`` exactly when the metric was built with ``realism``,
                the oracle's entries exactly when built with ``oracle``, the AnoGAN scores exactly when built
                with ``anogan``.
        """
        check_record(record)
        for argument, (expected, keys) in self.groups.items():
            present = [key for key in keys if key in record]
            if present != (list(keys) if expected else []):
                raise ValueError(
                    f"the entries {list(keys)} are required when the metric was built with {argument}=True, "
                    f"got {present}"
                    if expected
                    else f"got the entries {present} but the metric was built with {argument}=False"
                )
        for key in self.keys:  # every state float64 (exact for indices < 2**53): one dtype for the gather
            getattr(self, key).append(record[key].detach().to(device=self.device, dtype=torch.float64))

    def record(self) -> dict[str, Tensor]:
        """The per-pair values of every process in their schema dtypes, ordered by ``(index, target)``."""
        sync = self._to_sync and not self._is_synced  # inside ``compute`` the states are synced already
        with self.sync_context(should_sync=sync, should_unsync=sync):
            states = {key: getattr(self, key) for key in self.keys}
            record = {
                key: torch.zeros(0, dtype=torch.float64, device=self.device)
                if isinstance(value, list) and not value
                else dim_zero_cat(value)
                for key, value in states.items()
            }
        return sort_record({key: value.to(PAIR_SCHEMA[key].dtype) for key, value in record.items()})

    def compute(self) -> dict[str, Tensor]:
        """The summary of every process's pairs (see the class docstring)."""
        return _counterfactual_compute(self.record())


def intersection_table(records: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Compare methods on the pairs ``(index, target)`` that every method solved (DeDUCE's Table-1 protocol).

    Args:
        records: method name -> its :meth:`CounterfactualMetrics.record`, or the dict of its ``counterfactuals.pt``
            (``cfx.tasks.load_counterfactual_results``).

    Returns:
        Method name -> metric -> value. ``pairs``, ``l0``, ``l1``, ``mse``, ``concentration``,
        ``target_confidence``, ``iterations``, ``iterations_median``, ``nll`` and the oracle's
        ``oracle_validity``, ``oracle_target_confidence``, ``oracle_original_confidence`` are over the common
        pairs; ``failure_rate``, ``seconds_per_counterfactual`` and ``oracle_validity_all_pairs`` are over all
        of the method's own pairs.
    """
    masks = intersection_mask(records)
    over_own_pairs = [
        name for field in PAIR_SCHEMA.values() for name in (field.pair_mean, field.pair_mean_complement) if name
    ]
    table = {}
    for name, record in records.items():
        own = _counterfactual_compute(record)
        common = _counterfactual_compute(record, masks[name])
        common.update({key: own[key] for key in over_own_pairs if key in own})
        del common["validity"]  # 1 - failure_rate
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
