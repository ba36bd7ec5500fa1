"""The oracle realism measure: an independent classifier's verdict on every counterfactual (CounterfactualTask)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from cfx.data import SyntheticImages
from cfx.metrics import CounterfactualMetrics
from cfx.metrics.functional.counterfactual import (
    ORACLE_KEYS,
    PAIR_SCHEMA,
    PairInputs,
    measure_pairs,
    oracle_measures,
)
from cfx.nn import SmallCNN
from cfx.results import open_results
from cfx.tasks import ClassificationTask, CounterfactualTask, load_classifier
from tests.test_counterfactual_task import PatchExplainer, _synthetic
from tests.trainers import quiet_trainer

NUM_CLASSES = 3


def _checkpoint(folder: Path, seed: int, steps: int, network: SmallCNN) -> Path:
    """``network`` trained for ``steps`` steps on SyntheticImages of its classes, channels and size, in ``folder``."""
    torch.manual_seed(seed)
    facts = {"num_classes": network.num_classes, "in_channels": network.in_channels, "image_size": network.image_size}
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(ClassificationTask(network), SyntheticImages(num_samples=150, noise=0.3, batch_size=16, **facts))
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The explained classifier and an oracle of another architecture and seed (3 classes, 1 x 16 x 16 images)."""
    root = tmp_path_factory.mktemp("oracle")
    (root / "classifier").mkdir()
    (root / "oracle").mkdir()
    classifier = SmallCNN(in_channels=1, num_classes=NUM_CLASSES, channels=(4, 8), hidden=16, image_size=16)
    oracle = SmallCNN(in_channels=1, num_classes=NUM_CLASSES, channels=(6,), hidden=12, image_size=16)
    return {
        "classifier": _checkpoint(root / "classifier", seed=0, steps=8, network=classifier),
        "oracle": _checkpoint(root / "oracle", seed=1, steps=12, network=oracle),
    }


def _run(checkpoints: dict[str, Path], folder: Path, devices: int = 1, eval_batch_size: int = 4, **kwargs) -> tuple:
    task = CounterfactualTask(
        str(checkpoints["classifier"]), PatchExplainer, oracle=str(checkpoints["oracle"]), output_dir=str(folder),
        **kwargs,
    )  # fmt: skip
    trainer = quiet_trainer(devices, inference_mode=False)
    metrics = trainer.test(task, _synthetic(eval_batch_size=eval_batch_size), verbose=False)[0]
    results = open_results(folder)
    assert results.finished
    return {**results.record(), "metadata": results.metadata, "summary": results.summary()}, metrics


def _reference_counterfactuals(checkpoint: Path, results: dict) -> torch.Tensor:
    """The stored pairs' counterfactuals made afresh, in full precision, from the data set's queries."""
    dataset = _synthetic().dataset("test")
    position = {int(dataset[i]["index"]): i for i in range(len(dataset))}
    images = torch.stack([dataset[position[int(index)]]["image"] for index in results["index"]])
    explainer = PatchExplainer(load_classifier(checkpoint))
    return explainer.explain(images, results["target"], results["index"]).counterfactuals


def test_oracle_measures_equal_a_direct_computation(checkpoints, tmp_path):
    results, metrics = _run(checkpoints, tmp_path / "out", max_queries=10)
    counterfactuals = _reference_counterfactuals(checkpoints["classifier"], results)
    oracle = load_classifier(checkpoints["oracle"])
    with torch.no_grad():  # the oracle's softmax at the counterfactuals, in one batch
        probabilities = oracle(counterfactuals).softmax(dim=1).double()
        exact = oracle.double()(counterfactuals.double()).softmax(dim=1)
    targets, success = results["target"], results["success"]
    assert 0 < success.sum() < len(success)  # the summary over the successful pairs differs from all pairs
    target_probability = probabilities.gather(1, targets[:, None]).squeeze(1)
    original_probability = probabilities.gather(1, results["original_prediction"][:, None]).squeeze(1)
    assert all(results[key].dtype == PAIR_SCHEMA[key].dtype for key in ORACLE_KEYS)
    assert torch.allclose(results["oracle_target_probability"], target_probability, rtol=0, atol=1e-5)
    assert torch.allclose(results["oracle_original_probability"], original_probability, rtol=0, atol=1e-5)
    assert torch.equal(results["oracle_valid"], exact.argmax(dim=1) == targets)
    valid, summary = results["oracle_valid"].double(), results["summary"]  # the summary in float64
    assert summary["oracle_validity"] == pytest.approx(valid[success].mean().item(), rel=1e-12)
    assert summary["oracle_validity_all_pairs"] == pytest.approx(valid.mean().item(), rel=1e-12)
    assert summary["oracle_target_confidence"] == pytest.approx(target_probability[success].mean().item(), abs=1e-5)
    assert summary["oracle_original_confidence"] == pytest.approx(original_probability[success].mean().item(), abs=1e-5)
    assert all(metrics[f"test/{key}"] == pytest.approx(summary[key]) for key in summary if key.startswith("oracle"))
    assert results["metadata"]["oracle"] == {
        "path": str(checkpoints["oracle"]),
        "sha256": hashlib.sha256(checkpoints["oracle"].read_bytes()).hexdigest(),
    }
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["metrics"]["oracle_validity"] == results["summary"]["oracle_validity"]


def test_the_original_class_follows_query_class(checkpoints, tmp_path):
    results, _ = _run(checkpoints, tmp_path / "out", max_queries=8, query_class="label")
    counterfactuals = _reference_counterfactuals(checkpoints["classifier"], results)
    with torch.no_grad():
        probabilities = load_classifier(checkpoints["oracle"])(counterfactuals).softmax(dim=1).double()
    expected = probabilities.gather(1, results["label"][:, None]).squeeze(1)
    assert torch.allclose(results["oracle_original_probability"], expected, rtol=0, atol=1e-5)


def test_without_an_oracle_there_are_no_oracle_entries(checkpoints, tmp_path):
    task = CounterfactualTask(str(checkpoints["classifier"]), PatchExplainer, output_dir=str(tmp_path), max_queries=3)
    metrics = quiet_trainer(inference_mode=False).test(task, _synthetic(eval_batch_size=4), verbose=False)[0]
    results = open_results(tmp_path)
    assert not any(key in results.columns for key in ORACLE_KEYS) and results.metadata["oracle"] is None
    assert not any(key.startswith("test/oracle") for key in metrics)


@pytest.mark.ddp
def test_two_process_oracle_run_equals_one_process(checkpoints, tmp_path):
    # 13 queries in batches of 3: the two processes get 7 and 6 queries, in batches of uneven size
    runs = {devices: _run(checkpoints, tmp_path / str(devices), devices, 3, max_queries=13) for devices in (1, 2)}
    (one, one_metrics), (two, two_metrics) = runs[1], runs[2]
    assert one_metrics["test/pairs"] == len(one["index"]) > 0 and "test/oracle_validity" in one_metrics
    assert set(one_metrics) == set(two_metrics)
    for key, value in one_metrics.items():  # to the last digit
        if key != "test/seconds_per_counterfactual":
            assert two_metrics[key] == value or math.isnan(value) and math.isnan(two_metrics[key]), key
    for key in ("index", "target", "success", *ORACLE_KEYS):
        assert torch.equal(one[key], two[key]), key


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ({"num_classes": 4}, "it outputs 4 classes, the classifier 3"),
        ({"in_channels": 3}, r"it expects 3 channel\(s\), the classifier 1"),
        ({"image_size": 20}, "it was built for 20 px, the classifier for 16 px"),
    ],
)
def test_an_oracle_of_other_classes_channels_or_size_is_a_clear_error(checkpoints, tmp_path, facts, message):
    shape = {"num_classes": NUM_CLASSES, "in_channels": 1, "image_size": 16, **facts}
    network = SmallCNN(channels=(4,), hidden=8, **shape)
    oracle = _checkpoint(tmp_path, seed=2, steps=1, network=network)
    with pytest.raises(ValueError, match=f"the oracle {oracle} does not fit the classifier .*: {message}"):
        CounterfactualTask(str(checkpoints["classifier"]), PatchExplainer, oracle=str(oracle))


def test_oracle_measures_by_hand_and_bad_input():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    measured = oracle_measures(probabilities, torch.tensor([0, 1, 1]), torch.tensor([1, 2, 0]))
    assert list(measured) == list(ORACLE_KEYS)
    assert measured["oracle_valid"].tolist() == [True, False, True]
    assert torch.allclose(measured["oracle_target_probability"], torch.tensor([0.7, 0.3, 0.5], dtype=torch.float64))
    assert torch.allclose(measured["oracle_original_probability"], torch.tensor([0.2, 0.6, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected \(N, K\) floating-point probabilities"):
        oracle_measures(torch.ones(3), torch.tensor([0, 1, 1]), torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="expected 3 integer targets"):
        oracle_measures(probabilities, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match=r"classes must be classes 0..2 of the oracle"):
        oracle_measures(probabilities, torch.tensor([0, 1, 1]), torch.tensor([1, 3, 0]))


def test_the_metric_summarises_the_oracle_and_refuses_records_without_it():
    originals = torch.zeros(4, 1, 2, 2)
    given = {
        "index": torch.arange(4),
        "target": torch.tensor([1, 1, 0, 2]),
        "label": torch.zeros(4, dtype=torch.long),
        "original_prediction": torch.zeros(4, dtype=torch.long),
        "success": torch.tensor([True, True, False, True]),
        "target_probability": torch.full((4,), 0.9, dtype=torch.float64),
        "counterfactual_prediction": torch.tensor([1, 1, 0, 2]),
        "iterations": torch.ones(4, dtype=torch.long),
    }
    oracle = {
        "oracle_target_probability": torch.tensor([0.8, 0.1, 0.9, 0.3], dtype=torch.float64),
        "oracle_valid": torch.tensor([True, False, True, False]),
        "oracle_original_probability": torch.tensor([0.1, 0.7, 0.05, 0.6], dtype=torch.float64),
    }
    inputs = PairInputs(originals, originals + 0.5)
    metric = CounterfactualMetrics(oracle=True)
    metric.update(measure_pairs(inputs, {**given, **oracle}))
    summary = {key: float(value) for key, value in metric.compute().items()}
    assert summary["oracle_validity"] == pytest.approx(1 / 3)  # successful pairs 0, 1, 3: only pair 0 transfers
    assert summary["oracle_validity_all_pairs"] == pytest.approx(2 / 4)
    assert summary["oracle_target_confidence"] == pytest.approx((0.8 + 0.1 + 0.3) / 3)
    assert summary["oracle_original_confidence"] == pytest.approx((0.1 + 0.7 + 0.6) / 3)
    with pytest.raises(ValueError, match="required when the metric was built with oracle=True"):
        metric.update(measure_pairs(inputs, given))
    with pytest.raises(ValueError, match="built with oracle=False"):
        CounterfactualMetrics().update(measure_pairs(inputs, {**given, **oracle}))
