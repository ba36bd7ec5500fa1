from __future__ import annotations

import math

import pytest
import torch

from cfx.metrics import CounterfactualMetrics, intersection_table, markdown_table
from cfx.metrics.functional import concentration, feature_nll, l0_distance, l1_distance, mse, sort_record
from cfx.metrics.functional.counterfactual import (
    PAIR_SCHEMA,
    PairInputs,
    check_record,
    empty_record,
    measure_pairs,
    record_keys,
)
from cfx.nn import ClassGaussians
from tests.distributed import run_distributed


def _pairs(num_pairs: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pairs: sparse changes on 2-channel 6 x 5 images, deterministic per seed."""
    generator = torch.Generator().manual_seed(seed)
    originals = torch.rand(num_pairs, 2, 6, 5, generator=generator)
    changed = torch.rand(num_pairs, 2, 6, 5, generator=generator) < 0.15
    step = torch.rand(num_pairs, 2, 6, 5, generator=generator) - 0.5
    return {
        "indices": torch.arange(num_pairs) // 3 + 100,
        "targets": torch.arange(num_pairs) % 3,
        "labels": (torch.arange(num_pairs) + 1) % 3,
        "predictions": (torch.arange(num_pairs) + 2) % 3,
        "originals": originals,
        "counterfactuals": (originals + changed * step).clamp(0, 1),
        "success": torch.rand(num_pairs, generator=generator) < 0.7,
        "target_probability": torch.rand(num_pairs, generator=generator, dtype=torch.float64),
        "counterfactual_predictions": torch.arange(num_pairs) % 3,
        "iterations": torch.randint(0, 50, (num_pairs,), generator=generator),
        "nll": torch.randn(num_pairs, generator=generator, dtype=torch.float64) * 10,
    }


def _given(pairs: dict[str, torch.Tensor], rows, nll: bool) -> dict[str, torch.Tensor]:
    """The record entries a caller gives (everything but the measured distances and time)."""
    names = {
        "index": "indices",
        "target": "targets",
        "label": "labels",
        "original_prediction": "predictions",
        "success": "success",
        "target_probability": "target_probability",
        "counterfactual_prediction": "counterfactual_predictions",
        "iterations": "iterations",
        **({"nll": "nll"} if nll else {}),
    }
    return {key: pairs[name][rows] for key, name in names.items()}


def _update(metric: CounterfactualMetrics, pairs: dict[str, torch.Tensor], rows, seconds: float = 1.0) -> None:
    inputs = PairInputs(pairs["originals"][rows], pairs["counterfactuals"][rows], seconds=seconds)
    metric.update(measure_pairs(inputs, _given(pairs, rows, metric.realism)))


def test_distances_equal_direct_computation():
    pairs = _pairs()
    x, y = pairs["originals"].double(), pairs["counterfactuals"].double()
    for n in range(len(x)):
        difference = (y[n] - x[n]).flatten().tolist()
        assert l0_distance(x, y)[n] == sum(d != 0 for d in difference)
        assert l0_distance(x, y, tolerance=0.2)[n] == sum(abs(d) > 0.2 for d in difference)
        assert l1_distance(x, y)[n] == pytest.approx(sum(abs(d) for d in difference))
        assert mse(x, y)[n] == pytest.approx(sum(d * d for d in difference) / 60)


def test_l0_counts_exact_inequality_and_entries_of_every_channel():
    originals = torch.zeros(1, 3, 2, 2)
    counterfactuals = originals.clone()
    counterfactuals[0, 0, 0, 0] = 1e-7  # tiny but different: counts by default
    counterfactuals[0, 2, 0, 0] = 0.5
    counterfactuals[0, 1, 1, 1] = 0.25
    assert l0_distance(originals, counterfactuals).tolist() == [3.0]
    assert l0_distance(originals, counterfactuals, tolerance=0.25).tolist() == [1.0]  # strictly above counts
    assert l1_distance(originals, counterfactuals).item() == pytest.approx(0.7500001)
    assert mse(originals, counterfactuals).item() == pytest.approx((0.25 + 0.0625 + 1e-14) / 12)


def test_concentration_on_hand_made_images():
    originals = torch.full((4, 2, 10, 8), 0.5)
    counterfactuals = originals.clone()
    counterfactuals[0, 0, 2, 3] = 0.9  # one pixel: a 1 x 1 box
    counterfactuals[1, 0, 1, 1] = 0.0  # box rows 1..6, columns 1..5 (channel 1 drives one corner)
    counterfactuals[1, 1, 6, 5] = 0.7
    counterfactuals[1, 0, 4, 2] = 0.54  # below the threshold: ignored
    counterfactuals[2] += 0.04  # every pixel changed, none above 0.05
    counterfactuals[3, 1, 9, 0] = 0.0  # opposite corners: the whole image
    counterfactuals[3, 0, 0, 7] = 1.0
    expected = [1 / 80, 6 * 5 / 80, 0.0, 1.0]
    assert concentration(originals, counterfactuals).tolist() == pytest.approx(expected)
    assert concentration(originals, counterfactuals, threshold=0.03)[2] == 1.0


def test_feature_nll_is_minus_log_density_of_the_target_gaussian():
    generator = torch.Generator().manual_seed(1)
    means = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    roots = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    covariances = roots @ roots.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    gaussians = ClassGaussians(means, covariances, torch.zeros(2, dtype=torch.float64))
    features = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0, 1])
    expected = [
        -torch.distributions.MultivariateNormal(means[t], covariance_matrix=covariances[t]).log_prob(z).item()
        for z, t in zip(features, targets, strict=True)
    ]
    assert feature_nll(features, targets, gaussians).tolist() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="classes 0..1"):
        feature_nll(features, torch.tensor([0, 1, 2, 0, 1]), gaussians)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"same shape \(N, C, H, W\)"):
        l1_distance(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 3))
    with pytest.raises(ValueError, match="floating-point"):
        mse(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        l0_distance(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), tolerance=-1)
    pairs = _pairs(4)
    inputs = PairInputs(pairs["originals"], pairs["counterfactuals"])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        measure_pairs(inputs, {**_given(pairs, slice(None), nll=False), "index": pairs["indices"][:3]})
    with pytest.raises(ValueError, match=r"missing \['iterations'\]"):
        measure_pairs(
            inputs, {key: value for key, value in _given(pairs, slice(None), False).items() if key != "iterations"}
        )
    with pytest.raises(ValueError, match=r"measured here \['l1'\]"):
        measure_pairs(inputs, {**_given(pairs, slice(None), nll=False), "l1": torch.zeros(4)})
    with pytest.raises(ValueError, match="realism=False"):
        CounterfactualMetrics().update(measure_pairs(inputs, _given(pairs, slice(None), nll=True)))
    with pytest.raises(ValueError, match=r"\['nll'\] are required when the metric was built with realism=True"):
        CounterfactualMetrics(realism=True).update(measure_pairs(inputs, _given(pairs, slice(None), nll=False)))
    with pytest.raises(ValueError, match=r"\['anogan', 'query_anogan'\] are required .* anogan=True, got \[\]"):
        CounterfactualMetrics(anogan=True).update(measure_pairs(inputs, _given(pairs, slice(None), nll=False)))
    with pytest.raises(ValueError, match="seconds must be finite"):
        PairInputs(pairs["originals"], pairs["counterfactuals"], seconds=-1.0)
    with pytest.raises(ValueError, match="l0_tolerance must be >= 0"):
        PairInputs(pairs["originals"], pairs["counterfactuals"], l0_tolerance=-0.1)
    record = measure_pairs(inputs, _given(pairs, slice(None), nll=False))
    with pytest.raises(ValueError, match=r"wrong dtype: \{'iterations': 'torch.float64, expected torch.int64'\}"):
        CounterfactualMetrics().update({**record, "iterations": record["iterations"].double()})


def test_the_schema_drives_records_metric_states_and_empty_records():
    pairs = _pairs(5)
    inputs = PairInputs(pairs["originals"], pairs["counterfactuals"], seconds=2.5, l0_tolerance=0.1)
    record = measure_pairs(inputs, _given(pairs, slice(None), nll=True))
    assert list(record) == list(record_keys(("nll",)))  # every entry, in schema order
    assert {key: value.dtype for key, value in record.items()} == {key: PAIR_SCHEMA[key].dtype for key in record}
    x, y = pairs["originals"], pairs["counterfactuals"]
    assert torch.equal(record["l0"], l0_distance(x, y, tolerance=0.1)) and torch.equal(record["mse"], mse(x, y))
    assert record["seconds"].tolist() == [0.5] * 5 and torch.equal(record["iterations"], pairs["iterations"])
    assert check_record(record) == 5
    for realism in (False, True):
        metric = CounterfactualMetrics(realism=realism)
        optional = ("nll",) if realism else ()
        assert metric.keys == record_keys(optional) == tuple(empty_record(optional))
        assert tuple(metric._defaults) == metric.keys  # one cat state per entry
        metric.update({key: record[key] for key in metric.keys})
        assert {key: value.dtype for key, value in metric.record().items()} == {
            key: PAIR_SCHEMA[key].dtype for key in metric.keys
        }
    empty = empty_record(("nll",))
    assert list(empty) == list(record_keys(("nll",))) and check_record(empty) == 0
    assert all(value.dtype == PAIR_SCHEMA[key].dtype for key, value in empty.items())
    assert "nll" not in empty_record()
    optional = [key for key, field in PAIR_SCHEMA.items() if field.optional]
    assert optional[0] == "nll" and len(optional) > 1  # the feature NLL and the oracle's entries
    with pytest.raises(ValueError, match="the optional record entries are"):
        record_keys(("l1",))


def _expected_summary(pairs: dict[str, torch.Tensor], seconds_total: float) -> dict[str, float]:
    """The summary computed directly from the per-pair functional values, pair by pair."""
    x, y, success = pairs["originals"], pairs["counterfactuals"], pairs["success"]
    ok = [n for n in range(len(success)) if success[n]]

    def mean(values):
        return sum(float(values[n]) for n in ok) / len(ok)

    iterations = sorted(float(pairs["iterations"][n]) for n in ok)
    middle = len(iterations) // 2
    median = iterations[middle] if len(iterations) % 2 else (iterations[middle - 1] + iterations[middle]) / 2
    return {
        "pairs": len(success),
        "validity": len(ok) / len(success),
        "failure_rate": 1 - len(ok) / len(success),
        "seconds_per_counterfactual": seconds_total / len(success),
        "l0": mean(l0_distance(x, y)),
        "l1": mean(l1_distance(x, y)),
        "mse": mean(mse(x, y)),
        "concentration": mean(concentration(x, y)),
        "target_confidence": mean(pairs["target_probability"]),
        "iterations": mean(pairs["iterations"]),
        "iterations_median": median,
        "nll": mean(pairs["nll"]),
    }


@pytest.mark.parametrize("splits", [[12], [5, 7], [1, 3, 8], [0, 4, 0, 8]])
def test_class_metric_equals_functional_over_arbitrary_batches(splits):
    pairs = _pairs(12)
    metric = CounterfactualMetrics(realism=True)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(len(splits)))
    start = 0
    for size in splits:
        _update(metric, pairs, order[start : start + size], seconds=0.5 * size)
        start += size
    summary = {key: value.item() for key, value in metric.compute().items()}
    assert summary == pytest.approx(_expected_summary(pairs, seconds_total=6.0), rel=1e-12)
    record = metric.record()
    assert record["index"].tolist() == pairs["indices"].tolist()  # canonical (index, target) order
    assert record["target"].tolist() == pairs["targets"].tolist()
    assert record["success"].dtype == torch.bool and record["iterations"].dtype == torch.long
    assert record["l1"].tolist() == pytest.approx(l1_distance(pairs["originals"], pairs["counterfactuals"]).tolist())


def test_no_success_gives_nan_means_and_zero_validity():
    pairs = _pairs(4)
    pairs["success"] = torch.zeros(4, dtype=torch.bool)
    metric = CounterfactualMetrics()
    _update(metric, pairs, slice(None))
    summary = metric.compute()
    assert summary["validity"] == 0 and summary["failure_rate"] == 1 and summary["pairs"] == 4
    assert math.isnan(summary["l0"]) and math.isnan(summary["iterations_median"]) and "nll" not in summary


def _record(index, target, success, l0, seconds=None):
    size = len(index)
    return {
        "index": torch.tensor(index),
        "target": torch.tensor(target),
        "label": torch.zeros(size, dtype=torch.long),
        "original_prediction": torch.zeros(size, dtype=torch.long),
        "success": torch.tensor(success),
        "l0": torch.tensor(l0, dtype=torch.float64),
        "l1": torch.tensor(l0, dtype=torch.float64) / 10,
        "mse": torch.zeros(size, dtype=torch.float64),
        "concentration": torch.zeros(size, dtype=torch.float64),
        "target_probability": torch.full((size,), 0.6, dtype=torch.float64),
        "counterfactual_prediction": torch.zeros(size, dtype=torch.long),
        "iterations": torch.tensor(l0) * 2,
        "seconds": torch.tensor(seconds or [1.0] * size, dtype=torch.float64),
    }


def test_intersection_table_on_hand_made_records():
    records = {
        # pairs (index, target): A solves (1,2) (1,3) (2,0) (5,1), fails (2,1)
        "A": _record([1, 1, 2, 2, 5], [2, 3, 0, 1, 1], [True, True, True, False, True], [10, 20, 30, 40, 50]),
        # B lacks (5,1), fails (1,3), solves (2,1) and an extra (7,0); its rows are in another order
        "B": _record([7, 2, 1, 1, 2], [0, 1, 3, 2, 0], [True, True, False, True, True], [1, 2, 3, 4, 5]),
    }
    # solved by both: (1,2) and (2,0)
    table = intersection_table(records)
    assert table["A"]["pairs"] == table["B"]["pairs"] == 2
    assert table["A"]["l0"] == (10 + 30) / 2 and table["B"]["l0"] == (4 + 5) / 2
    assert table["A"]["l1"] == pytest.approx(2.0) and table["B"]["iterations"] == 9
    assert table["A"]["iterations_median"] == 40 and table["B"]["iterations_median"] == 9
    assert table["A"]["failure_rate"] == pytest.approx(1 / 5) and table["B"]["failure_rate"] == pytest.approx(1 / 5)
    assert table["A"]["seconds_per_counterfactual"] == 1.0
    markdown = markdown_table(table)
    assert markdown.splitlines()[0].startswith("| method | pairs | failure_rate |")
    assert "| A | 2 |" in markdown and "| B | 2 |" in markdown and len(markdown.splitlines()) == 4
    alone = intersection_table({"A": records["A"]})
    assert alone["A"]["pairs"] == 4 and alone["A"]["l0"] == (10 + 20 + 30 + 50) / 4


def test_sort_record_orders_by_index_then_target():
    record = sort_record(
        {"index": torch.tensor([3, 1, 3, 1]), "target": torch.tensor([0, 2, 1, 0]), "v": torch.arange(4)}
    )
    assert record["v"].tolist() == [3, 1, 0, 2]  # (1, 0), (1, 2), (3, 0), (3, 1)
    with pytest.raises(ValueError, match="one row per pair"):
        sort_record({"index": torch.arange(3), "target": torch.arange(2)})


SCENARIOS = (  # per rank, its batches of pair rows
    ([[0, 5, 2, 9], [11, 1, 7, 4, 3]], [[10, 6, 8]]),  # uneven shards
    ([list(range(12))], []),  # rank 1 has no pairs at all
)


def _metric(batches: list[list[int]]) -> CounterfactualMetrics:
    pairs, metric = _pairs(12), CounterfactualMetrics(realism=True)
    for batch in batches:
        _update(metric, pairs, torch.tensor(batch, dtype=torch.long), seconds=0.5 * len(batch))
    return metric


def _distributed_metrics(rank: int, world_size: int) -> list[dict]:
    results = []
    for scenario in SCENARIOS:
        metric = _metric(scenario[rank])
        results.append({"summary": metric.compute(), "record": metric.record()})
    return results


@pytest.mark.ddp
def test_two_process_metrics_equal_one_process():
    per_rank = run_distributed(_distributed_metrics)
    for number, scenario in enumerate(SCENARIOS):
        single = _metric(scenario[0] + scenario[1])
        expected, expected_record = single.compute(), single.record()
        for results in per_rank:
            summary, record = results[number]["summary"], results[number]["record"]
            assert summary.keys() == expected.keys()
            for key, value in expected.items():
                assert torch.equal(summary[key], value), key  # exact: the record is sorted before reducing
            for key, value in expected_record.items():
                assert torch.equal(record[key], value), key


def test_anogan_scores_are_averaged_over_the_successful_pairs_in_two_batches():
    pairs = _pairs(seed=3)
    generator = torch.Generator().manual_seed(9)
    scores = {key: torch.rand(12, generator=generator, dtype=torch.float64) * 30 for key in ("anogan", "query_anogan")}
    metric = CounterfactualMetrics(anogan=True)
    for rows in (slice(0, 5), slice(5, 12)):
        inputs = PairInputs(pairs["originals"][rows], pairs["counterfactuals"][rows], seconds=1.0)
        given = {**_given(pairs, rows, nll=False), **{key: value[rows] for key, value in scores.items()}}
        metric.update(measure_pairs(inputs, given))
    summary = metric.compute()
    success = pairs["success"].tolist()
    for key, values in scores.items():
        expected = sum(v for v, s in zip(values.tolist(), success, strict=True) if s) / sum(success)
        assert summary[key].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="built with anogan=False"):
        CounterfactualMetrics().update(measure_pairs(inputs, given))
