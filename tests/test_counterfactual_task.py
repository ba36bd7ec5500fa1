from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image

from cfx.cli import main
from cfx.counterfactual import JSMA, DeDUCE
from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.data import EmbeddedMNIST, SyntheticImages
from cfx.metrics import intersection_table
from cfx.metrics.functional import concentration, l0_distance, l1_distance, mse
from cfx.metrics.functional import counterfactual as functional_counterfactual
from cfx.metrics.functional.counterfactual import PAIR_SCHEMA, record_keys
from cfx.nn import SmallCNN
from cfx.results import open_results
from cfx.results.pictures import store_grid
from cfx.tasks import ClassificationTask, CounterfactualTask, fit_and_save_class_gaussians, load_classifier
from cfx.tasks.counterfactual import random_targets
from cfx.tasks.dep import target_loss_quantiles
from tests.config_helpers import tiny_trainer
from tests.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


class PatchExplainer(Explainer):
    """A deterministic stand-in explainer: brightens a target-dependent patch; its outcome depends on the pair only."""

    def __init__(self, classifier, strength: float = 0.5):
        super().__init__(classifier)
        self.strength = strength

    def explain(self, images, targets, indices=None):
        self.check_query(images, targets)
        indices = torch.arange(len(images)) if indices is None else indices
        counterfactuals = images.clone()
        for target in range(self.classifier.num_classes):  # a loop over classes, not samples
            rows = targets == target
            counterfactuals[rows, :, 2 * target : 2 * target + 3, 1:4] += self.strength
        counterfactuals = counterfactuals.clamp(0, 1)
        with torch.no_grad():
            probabilities = self.classifier(counterfactuals).softmax(1)
            original_prediction = self.classifier(images).argmax(1)
        return CounterfactualResult(
            counterfactuals=counterfactuals,
            success=(indices + targets) % 3 != 0,
            target_probability=probabilities.gather(1, targets[:, None]).squeeze(1),
            original_prediction=original_prediction,
            iterations=indices % 5 + targets,
        )


def _synthetic(**kwargs) -> SyntheticImages:
    return SyntheticImages(num_samples=150, num_classes=NUM_CLASSES, noise=0.3, batch_size=16, **kwargs)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory) -> Path:
    """A SmallCNN trained for a few steps on SyntheticImages, saved as a ClassificationTask checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "last.ckpt"
    task = ClassificationTask(SmallCNN(in_channels=1, num_classes=NUM_CLASSES, channels=(4, 8), hidden=16))
    trainer = quiet_trainer(max_steps=8)
    trainer.fit(task, _synthetic())
    trainer.save_checkpoint(path)
    return path


def _config(tmp_path: Path, checkpoint: Path, **task_args) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": tiny_trainer(),  # no inference_mode: the task declares it
        "model": {
            "class_path": "cfx.tasks.CounterfactualTask",
            "init_args": {
                "classifier": str(checkpoint),
                "explainer": {"class_path": "tests.test_counterfactual_task.PatchExplainer"},
                "output_dir": str(tmp_path / "out"),
                **task_args,
            },
        },
        "data": {
            "class_path": "cfx.data.SyntheticImages",
            "init_args": {"num_samples": 150, "num_classes": NUM_CLASSES, "noise": 0.3, "eval_batch_size": 4},
        },
    }
    path = tmp_path / "counterfactual.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _load(folder: Path) -> dict:
    """Everything a finished store in ``folder`` holds, read back: columns, images, metadata and summary."""
    results = open_results(folder)
    assert results.finished
    images = {key: results.images(key) for key in results.image_keys}
    return {**results.record(), **images, "metadata": results.metadata, "summary": results.summary()}


def _queries(count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` test samples of the synthetic data, in data set order."""
    dataset = _synthetic().dataset("test")
    samples = [dataset[i] for i in range(count)]
    return {key: torch.stack([sample[key] for sample in samples]) for key in ("image", "label", "index")}


def test_cli_test_runs_every_other_target_and_writes_the_results(classifier_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["test", "-c", str(_config(tmp_path, classifier_checkpoint, max_queries=10, grid_size=5))])
    classifier = load_classifier(classifier_checkpoint)
    queries = _queries(10)
    predictions = classifier(queries["image"]).argmax(1)
    expected_pairs = sorted(
        (int(index), target)
        for index, prediction in zip(queries["index"], predictions, strict=True)
        for target in range(NUM_CLASSES)
        if target != prediction
    )
    results = _load(tmp_path / "out")
    pairs = list(zip(results["index"].tolist(), results["target"].tolist(), strict=True))
    assert pairs == expected_pairs  # 2 pairs per query, ordered by (index, target)
    position = {int(index): n for n, index in enumerate(queries["index"])}
    rows = torch.tensor([position[index] for index, _ in pairs])
    assert torch.equal(results["originals"], queries["image"][rows])
    assert torch.equal(results["label"], queries["label"][rows])
    assert torch.equal(results["original_prediction"], predictions[rows])
    # one batched call of the explainer over all pairs gives the same results as the task's batches of 4 queries
    direct = PatchExplainer(classifier).explain(results["originals"], results["target"], results["index"])
    assert torch.equal(results["counterfactuals"], direct.counterfactuals.half().float())  # not k/255: float16
    assert torch.equal(results["success"], direct.success)
    assert torch.allclose(results["target_probability"], direct.target_probability.double())  # schema: float64
    x, y, success = results["originals"], direct.counterfactuals, results["success"]  # measured before storing
    assert torch.equal(results["l0"], l0_distance(x, y)) and torch.equal(results["concentration"], concentration(x, y))
    metrics = cli.trainer.callback_metrics
    assert metrics["test/pairs"] == len(pairs)
    assert metrics["test/validity"] == pytest.approx(success.double().mean().item())
    assert metrics["test/l1"] == pytest.approx(l1_distance(x, y)[success].mean().item())
    assert metrics["test/mse"] == pytest.approx(mse(x, y)[success].mean().item())
    assert metrics["test/iterations"] == pytest.approx(results["iterations"][success].double().mean().item())
    assert metrics["test/target_confidence"] == pytest.approx(results["target_probability"][success].mean().item())
    assert metrics["test/seconds_per_counterfactual"] > 0 and "test/nll" not in metrics
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["method"] == "PatchExplainer" and written["metrics"]["pairs"] == len(pairs)
    assert results["summary"] == written["metrics"]  # metrics.json: the store's summary
    store_grid(open_results(tmp_path / "out"), tmp_path / "expected_grid.png", count=5)  # the first 5 pairs
    with Image.open(tmp_path / "out" / "grid.png") as grid, Image.open(tmp_path / "expected_grid.png") as expected:
        assert grid.size == expected.size and grid.tobytes() == expected.tobytes()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["grid.png", "metrics.json", "results.h5"]
    alone = intersection_table({"patch": results})["patch"]  # a result file is a record
    assert alone["pairs"] == success.sum() and alone["l1"] == pytest.approx(metrics["test/l1"].item())


def _task(checkpoint: Path, **kwargs) -> CounterfactualTask:
    return CounterfactualTask(str(checkpoint), PatchExplainer, **kwargs)


def test_target_modes_produce_the_right_pairs(classifier_checkpoint):
    indices = torch.tensor([10, 11, 12, 13])
    labels = torch.tensor([0, 1, 2, 2])
    predictions = torch.tensor([0, 2, 2, 1])
    others = _task(classifier_checkpoint).make_pairs(indices, predictions, predictions)
    assert sorted(zip(*(t.tolist() for t in others), strict=True)) == [
        (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 2)
    ]  # fmt: skip
    by_label = _task(classifier_checkpoint, query_class="label").make_pairs(indices, labels, predictions)
    # query 1 (label 1, predicted 2) keeps only target 0: its target 2 already is the prediction
    assert sorted(zip(*(t.tolist() for t in by_label), strict=True)) == [(0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (3, 0)]
    fixed = _task(classifier_checkpoint, targets="fixed", target_class=2).make_pairs(indices, predictions, predictions)
    assert fixed[0].tolist() == [0, 3] and fixed[1].tolist() == [2, 2]
    mapping = _task(classifier_checkpoint, targets="mapping", target_mapping={0: 1, 2: 0})
    assert [t.tolist() for t in mapping.make_pairs(indices, labels, predictions)] == [[0, 2, 3], [1, 0, 0]]
    random = _task(classifier_checkpoint, targets="random", seed=3)
    positions, targets = random.make_pairs(indices, predictions, predictions)
    assert positions.tolist() == [0, 1, 2, 3] and (targets != predictions).all()
    singles = [
        random.make_pairs(indices[i : i + 1], predictions[i : i + 1], predictions[i : i + 1])[1] for i in range(4)
    ]
    assert torch.cat(singles).tolist() == targets.tolist()  # seeded by the index: independent of the batch


def test_random_targets_are_seeded_uniform_and_never_the_class():
    indices = torch.arange(5000)
    classes = indices % 10
    targets = random_targets(indices, classes, 10, seed=0)
    assert not (targets == classes).any()
    counts = torch.bincount(torch.remainder(targets - classes, 10), minlength=10)
    assert counts[0] == 0 and (counts[1:] - 5000 / 9).abs().max() < 5 * (5000 / 9) ** 0.5  # within 5 sigma
    assert torch.equal(random_targets(indices, classes, 10, seed=0), targets)
    assert (random_targets(indices, classes, 10, seed=1) != targets).float().mean() > 0.8
    assert torch.equal(random_targets(indices.flip(0), classes.flip(0), 10, seed=0), targets.flip(0))
    assert set(random_targets(indices, indices % 2, 2, seed=5).tolist()) == {0, 1}


def test_bad_options_are_clear_errors(classifier_checkpoint):
    with pytest.raises(ValueError, match="target_class goes with targets='fixed'"):
        _task(classifier_checkpoint, targets="fixed")
    with pytest.raises(ValueError, match="target_mapping goes with targets='mapping'"):
        _task(classifier_checkpoint, target_mapping={0: 1})
    with pytest.raises(ValueError, match=r"classes 0..2 of the classifier"):
        _task(classifier_checkpoint, targets="fixed", target_class=3)
    with pytest.raises(ValueError, match="must build a cfx.counterfactual.Explainer"):
        CounterfactualTask(str(classifier_checkpoint), lambda classifier: classifier)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        CounterfactualTask("absent.ckpt", PatchExplainer)


def test_a_default_trainer_works_and_outer_inference_mode_is_a_clear_error(classifier_checkpoint, tmp_path):
    task = _task(classifier_checkpoint, output_dir=str(tmp_path / "out"), max_queries=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.test_loop.inference_mode  # Lightning's default, which the task overrides in setup
    metrics = trainer.test(task, _synthetic(eval_batch_size=4), verbose=False)[0]
    results = _load(tmp_path / "out")
    assert metrics["test/pairs"] == len(results["index"]) == 8  # 4 queries x the 2 classes they are not
    assert not trainer.test_loop.inference_mode and not trainer.predict_loop.inference_mode
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch.inference_mode\(\)"):
        trainer.test(task, _synthetic(eval_batch_size=4), verbose=False)


def test_predict_returns_and_writes_fixed_target_pairs(classifier_checkpoint, tmp_path):
    task = _task(
        classifier_checkpoint, output_dir=str(tmp_path / "out"), max_queries=9, targets="fixed", target_class=1
    )
    trainer = L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False)
    batches = trainer.predict(task, _synthetic(eval_batch_size=4))
    returned = torch.cat([batch["index"] for batch in batches if batch])
    results = _load(tmp_path / "out")
    predictions = load_classifier(classifier_checkpoint)(_queries(9)["image"]).argmax(1)
    assert results["index"].tolist() == returned.tolist() == _queries(9)["index"][predictions != 1].tolist()
    assert (results["target"] == 1).all() and (results["original_prediction"] != 1).all()
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert summary["pairs"] == len(returned) and summary["validity"] == results["success"].double().mean().item()


@pytest.mark.ddp
def test_two_process_run_equals_one_process(classifier_checkpoint, tmp_path):
    # 13 queries in batches of 3: the two processes get 7 and 6 queries, in batches of uneven size
    results, metrics = {}, {}
    for devices in (1, 2):
        task = _task(classifier_checkpoint, output_dir=str(tmp_path / str(devices)), max_queries=13, targets="random")
        trainer = quiet_trainer(devices, inference_mode=False)
        metrics[devices] = trainer.test(task, _synthetic(eval_batch_size=3), verbose=False)[0]
        results[devices] = _load(tmp_path / str(devices))
    assert metrics[1]["test/pairs"] == len(results[1]["index"]) > 0
    for key, value in metrics[1].items():  # to the last digit: every per-pair value is batch-invariant
        if key != "test/seconds_per_counterfactual":
            assert metrics[2][key] == value or math.isnan(value) and math.isnan(metrics[2][key]), key
    per_pair = ("index", "target", "success", "originals", "counterfactuals", "l0", "l1", "mse", "iterations")
    for key in (*per_pair, "target_probability"):
        assert torch.equal(results[1][key], results[2][key]), key


def test_embedded_mnist_configs_run_deduce_and_jsma(tmp_path, monkeypatch):
    """The shipped configs, on a SmallCNN trained for a few batches of embedded MNIST (with class Gaussians)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    datamodule = EmbeddedMNIST(batch_size=64, eval_batch_size=500)
    task = ClassificationTask(SmallCNN(in_channels=1, num_classes=10, channels=(4, 8), hidden=16))
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False)
    trainer.fit(task, datamodule)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    gaussians = fit_and_save_class_gaussians(tmp_path / "tiny.ckpt", datamodule)
    overrides = [
        f"--model.classifier={tmp_path / 'tiny.ckpt'}",
        "--model.max_queries=2",
        "--model.explainer.init_args.max_iterations=15",
        "--data.init_args.eval_batch_size=2",
        "--trainer.enable_progress_bar=false",
    ]
    for method in ("deduce", "jsma"):
        extra = [f"--model.gaussians={gaussians}"]  # one path: the task builds DeDUCE with its Gaussians
        config = REPO / "configs" / "counterfactual" / f"embedded_mnist_{method}.yaml"
        cli = main(["test", "-c", str(config), *overrides, *(extra if method == "deduce" else [])])
        results = _load(tmp_path / "runs" / "counterfactual" / f"embedded_mnist_{method}")
        assert len(results["index"]) == 18 and results["iterations"].max() <= 15
        assert cli.trainer.callback_metrics["test/pairs"] == 18
        assert ("test/nll" in cli.trainer.callback_metrics) == (method == "deduce")
        changed = (results["counterfactuals"] != results["originals"]).flatten(1).sum(1)
        assert torch.equal(results["l0"], changed.double())


def test_celeba_configs_fit_dep_and_run_disc_on_fake_celeba(celeba_root, tmp_path, monkeypatch):
    """configs/dep/celeba_smiling.yaml and the CelebA DISC config, end to end on CelebA's file layout (tiny sizes)."""
    monkeypatch.chdir(tmp_path)
    data = [
        f"--data.init_args.root={celeba_root}",
        "--data.init_args.image_size=32",
        "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false",
        "--trainer.enable_progress_bar=false",
    ]
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "dep" / "celeba_smiling.yaml"),
            *data,
            "--data.init_args.batch_size=4",  # even batches for the ranking loss: 8 training faces
            "--model.init_args.network.init_args.width=4",
            "--trainer.max_epochs=1",
            f"--checkpoint.dirpath={tmp_path / 'dep'}",
        ]
    )
    checkpoint = tmp_path / "dep" / "last.ckpt"
    explainer = "--model.explainer.init_args"
    cli = main(
        [
            "test",
            "-c",
            str(REPO / "configs" / "counterfactual" / "celeba_smiling_lso_inr_dep.yaml"),
            *data,
            "--data.init_args.eval_batch_size=2",
            f"--model.classifier={checkpoint}",
            f"{explainer}.prior_options={{width: 16, depth: 2, num_frequencies: 8, sigma: 10.0, omega_0: 30.0}}",
            f"{explainer}.reconstruction_steps=5",
            f"{explainer}.steps_per_stage=2",
            f"{explainer}.max_iterations=6",
            f"{explainer}.target_loss=quantile",  # s* from the DEP predictor on the 8 training faces
            f"{explainer}.target_loss_quantile=0.25",
            "--model.targets=others",  # the other class for each of the 2 test faces, whatever the tiny net predicts
            "--model.target_class=null",
            f"--model.output_dir={tmp_path / 'out'}",
        ]
    )
    results = _load(tmp_path / "out")
    assert results["index"].tolist() == [10, 11]  # the two faces of the test partition
    assert results["counterfactuals"].shape == (2, 3, 32, 32)
    assert results["counterfactuals"].min() >= 0 and results["counterfactuals"].max() <= 1
    assert (results["iterations"] <= 6).all()
    assert cli.trainer.callback_metrics["test/pairs"] == 2
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert written["method"] == "DISC" and written["metrics"]["pairs"] == 2
    expected = target_loss_quantiles(load_classifier(checkpoint), cli.datamodule.eval_dataloader("train"), 0.25, 2)
    assert torch.equal(cli.model.explainer.target_loss, expected)
    assert written["metadata"]["target_loss"] == expected.tolist() == results["metadata"]["target_loss"]
    assert (written["metrics"]["l0"] is None) == (not results["success"].any())  # no success: nothing to average


@pytest.fixture(scope="module")
def gaussians_file(classifier_checkpoint) -> Path:
    """Class Gaussians of the tiny classifier, fitted on its synthetic training split."""
    return fit_and_save_class_gaussians(classifier_checkpoint, _synthetic(eval_batch_size=50))


def _test_run(task: CounterfactualTask, eval_batch_size: int = 4) -> dict:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, _synthetic(eval_batch_size=eval_batch_size), verbose=False)
    return _load(Path(task.output_dir))


def test_results_hold_the_schema_the_path_and_what_made_them(classifier_checkpoint, gaussians_file, tmp_path):
    jsma = functools.partial(JSMA, max_iterations=6, path_every=2)
    task = CounterfactualTask(
        str(classifier_checkpoint), jsma, gaussians=str(gaussians_file), output_dir=str(tmp_path / "out"), max_queries=5
    )
    results = _test_run(task)
    per_pair = [key for key in results if isinstance(results[key], torch.Tensor)]
    assert per_pair == [*record_keys(("nll",)), "originals", "counterfactuals", "path"]  # nll: it has Gaussians
    assert all(results[key].dtype == PAIR_SCHEMA[key].dtype for key in record_keys(("nll",)))
    assert results["path"].shape == (10, 4, 1, 16, 16)  # 5 queries x 2 targets; steps 0, 2, 4, 6
    assert torch.equal(results["path"][:, 0], results["originals"].half().float())  # the path: float16
    assert torch.equal(results["path"][:, -1], results["counterfactuals"].half().float())
    metadata = results["metadata"]
    assert metadata["classifier"] == {
        "path": str(classifier_checkpoint),
        "sha256": hashlib.sha256(classifier_checkpoint.read_bytes()).hexdigest(),
    }
    assert metadata["gaussians"]["sha256"] == hashlib.sha256(gaussians_file.read_bytes()).hexdigest()
    assert metadata["cfx_version"] == importlib.metadata.version("cfx")
    assert metadata["explainer"] == task.explainer.params
    assert metadata["explainer"]["class_path"] == "cfx.counterfactual.JSMA"
    assert metadata["explainer"]["init_args"]["path_every"] == 2 and metadata["seed"] == 0
    assert metadata["task"]["max_queries"] == 5 and metadata["task"]["gaussians"] == str(gaussians_file)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["metadata"] == json.loads(json.dumps(metadata))


def test_every_measure_is_computed_once_per_batch(classifier_checkpoint, tmp_path, monkeypatch):
    calls = {"l1_distance": 0, "concentration": 0}
    for name in calls:
        original = getattr(functional_counterfactual, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(functional_counterfactual, name, counting)
    results = _test_run(_task(classifier_checkpoint, output_dir=str(tmp_path / "out"), max_queries=9))
    assert calls == {"l1_distance": 3, "concentration": 3}  # batches of 4, 4 and 1 queries, each with pairs
    stored_images_l1 = l1_distance(results["originals"], results["counterfactuals"])  # float16 counterfactuals
    assert torch.allclose(results["l1"], stored_images_l1, rtol=1e-2, atol=1e-2)


def test_deduce_is_built_with_the_tasks_gaussians(classifier_checkpoint, gaussians_file, tmp_path):
    deduce = functools.partial(DeDUCE, max_iterations=5)
    task = CounterfactualTask(
        str(classifier_checkpoint),
        deduce,
        gaussians=str(gaussians_file),
        output_dir=str(tmp_path / "out"),
        max_queries=3,
    )
    assert task.explainer.gaussians is task.gaussians  # loaded once, by the task
    results = _test_run(task)
    assert results["metadata"]["explainer"]["init_args"]["gaussians"] == str(gaussians_file)
    assert len(results["index"]) == 6 and (results["iterations"] <= 5).all()
    with pytest.raises(ValueError, match="DeDUCE needs class Gaussians: set the CounterfactualTask's `gaussians:`"):
        CounterfactualTask(str(classifier_checkpoint), deduce)
    with pytest.raises(ValueError, match="the class Gaussians are named twice"):
        CounterfactualTask(
            str(classifier_checkpoint),
            functools.partial(DeDUCE, gaussians=str(gaussians_file)),
            gaussians=str(gaussians_file),
        )


class DetailedPatchExplainer(PatchExplainer):
    """PatchExplainer with two per-query details: the target doubled and the dataset index as a float."""

    def detail_fields(self):
        return {"double_target": (torch.int64, (2,)), "position": (torch.float32, ())}

    def explain(self, images, targets, indices=None):
        result = super().explain(images, targets, indices)
        indices = torch.arange(len(images)) if indices is None else indices
        details = {"double_target": torch.stack([targets, 2 * targets], dim=1), "position": indices.float()}
        return dataclasses.replace(result, details=details)


class CollidingPatchExplainer(DetailedPatchExplainer):
    def detail_fields(self):
        return {"index": (torch.float32, ())}


def test_details_are_stored_per_pair_and_a_store_of_other_details_is_refused(classifier_checkpoint, tmp_path):
    folder = tmp_path / "out"
    task = CounterfactualTask(str(classifier_checkpoint), DetailedPatchExplainer, output_dir=str(folder), max_queries=5)
    _test_run(task, eval_batch_size=2)
    results = open_results(folder)
    assert results.finished and results.extra_fields == DetailedPatchExplainer.detail_fields(None)
    assert torch.equal(results["double_target"], torch.stack([results["target"], 2 * results["target"]], dim=1))
    assert torch.equal(results["position"], results["index"].float())
    with pytest.raises(ValueError, match=r"CollidingPatchExplainer's details \['index'\] are named like per-pair"):
        CounterfactualTask(str(classifier_checkpoint), CollidingPatchExplainer)
    other = CounterfactualTask(str(classifier_checkpoint), PatchExplainer, output_dir=str(folder), max_queries=5)
    with pytest.raises(ValueError, match=r"stores the details .*double_target.* PatchExplainer returns \{\}"):
        _test_run(other)
    own = CounterfactualTask(str(classifier_checkpoint), PatchExplainer, targets="own", output_dir=str(tmp_path / "o"))
    predictions = torch.tensor([0, 2, 1])
    positions, targets = own.make_pairs(torch.tensor([5, 6, 7]), predictions, predictions)
    assert positions.tolist() == [0, 1, 2] and torch.equal(targets, predictions)  # prototypes: the own class kept
