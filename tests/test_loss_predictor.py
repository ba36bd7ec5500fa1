from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cfx.cli import main
from cfx.nn import LossPredictingClassifier, LossPredictor, SmallCNN, pairwise_ranking_loss
from cfx.tasks import DEPTask, load_classifier
from cfx.tasks.dep import target_loss_quantiles
from tests.config_helpers import tiny_trainer
from tests.distributed import run_distributed


def test_ranking_loss_equals_hand_computed_values():
    # pairs (0, 3) and (1, 2): max(0, 1 + 0.5) and max(0, 1 + 3), mean 2.75
    predicted = torch.tensor([0.5, 2.0, -1.0, 0.0])
    target = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert pairwise_ranking_loss(predicted, target).item() == pytest.approx(2.75)
    # a correctly ordered pair beyond the margin costs nothing; margin 2 shifts the other pair
    assert pairwise_ranking_loss(torch.tensor([5.0, 0.0]), torch.tensor([1.0, 0.0])).item() == 0.0
    assert pairwise_ranking_loss(torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.0]), margin=2.0).item() == 1.5
    # equal true losses count as "not greater": sign -1
    assert pairwise_ranking_loss(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])).item() == 2.0


def test_odd_batches_leave_the_middle_sample_out():
    predicted = torch.tensor([1.0, 0.0, 9.0, 0.2, 3.0])
    target = torch.tensor([0.0, 1.0, 7.0, 2.0, 3.0])
    # pairs (0, 4): max(0, 1 - 2) = 0 and (1, 3): max(0, 1 - 0.2) = 0.8
    assert pairwise_ranking_loss(predicted, target).item() == pytest.approx(0.4)
    changed = predicted.clone()
    changed[2], target[2] = -50.0, -3.0
    assert pairwise_ranking_loss(changed, target).item() == pytest.approx(0.4)
    single = torch.tensor([1.0], requires_grad=True)
    loss = pairwise_ranking_loss(single, torch.tensor([2.0]))
    loss.backward()
    assert loss.item() == 0.0 and single.grad is not None
    with pytest.raises(ValueError, match=r"same shape \(N,\)"):
        pairwise_ranking_loss(torch.zeros(3), torch.zeros(4))


def test_loss_predictor_pools_each_stage():
    predictor = LossPredictor((3, 5), hidden=4)
    maps = [torch.randn(2, 3, 6, 6), torch.randn(2, 5, 3, 3)]
    manual = torch.cat(
        [
            torch.relu(predictor.stages[0](maps[0].mean((2, 3)))),
            torch.relu(predictor.stages[1](maps[1].mean((2, 3)))),
        ],
        dim=1,
    )
    assert torch.allclose(predictor(maps), predictor.output(manual).squeeze(1))
    # only the spatial mean matters: permuting pixels changes nothing
    shuffled = [m.flatten(2)[..., torch.randperm(m.shape[2] * m.shape[3])].view_as(m) for m in maps]
    assert torch.allclose(predictor(maps), predictor(shuffled), atol=1e-6)
    with pytest.raises(ValueError, match="expected 2 stage maps"):
        predictor(maps[:1])
    with pytest.raises(ValueError, match=r"\(N, 5, H, W\)"):
        predictor([maps[0], maps[0]])


TINY_DEP = {
    "seed_everything": 0,
    "trainer": tiny_trainer(limit_train_batches=3),
    "model": {
        "class_path": "cfx.tasks.DEPTask",
        "init_args": {
            "network": {"class_path": "cfx.nn.SmallCNN", "init_args": {"channels": [4, 8], "hidden": 16}},
            "ranking_weight": 0.5,
            "hidden": 8,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    },
    "data": {
        "class_path": "cfx.data.SyntheticImages",
        "init_args": {"num_samples": 90, "batch_size": 15, "noise": 0.8},
    },
}


def test_dep_task_trains_through_the_cli_logs_ranking_metrics_and_reloads(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "dep.yaml"
    config.write_text(yaml.safe_dump(TINY_DEP))
    cli = main(["fit", "-c", str(config), "--checkpoint.dirpath=ckpt"])
    task = cli.model
    assert isinstance(task, DEPTask) and task.hparams.ranking_weight == 0.5
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/ce", "train/ranking_loss", "val/ranking_acc", "val/spearman", "val/acc"):
        assert name in metrics, name
    assert 0 <= metrics["val/ranking_acc"] <= 1 and -1 <= metrics["val/spearman"] <= 1
    total = metrics["train/ce"].item() + 0.5 * metrics["train/ranking_loss"].item()
    assert metrics["train/loss"].item() == pytest.approx(total, rel=1e-5)
    model = load_classifier(tmp_path / "ckpt" / "last.ckpt")  # carries its loss predictor
    assert isinstance(model, LossPredictingClassifier) and isinstance(model.loss_predictor, LossPredictor)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = torch.rand(5, 1, 16, 16)
    logits, predicted = model.predict_loss(images)
    expected_logits, expected_predicted = task.eval()(images)
    assert torch.allclose(logits, expected_logits, atol=1e-6) and torch.allclose(
        predicted, expected_predicted, atol=1e-6
    )
    test = main(["test", "-c", str(config), "--ckpt_path=ckpt/last.ckpt"])
    assert 0 <= test.trainer.callback_metrics["test/ranking_acc"] <= 1
    assert torch.allclose(model(images), expected_logits, atol=1e-6)  # it classifies like the network


def test_dep_training_step_moves_predictor_towards_the_true_ranking():
    torch.manual_seed(0)
    task = DEPTask(SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16), hidden=8)
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    optimizer = torch.optim.Adam(task.predictor.parameters(), lr=0.03)
    with torch.no_grad():
        _, stage_maps = task.network.forward_features(images)
        target = torch.nn.functional.cross_entropy(task.network(images), labels, reduction="none")
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = pairwise_ranking_loss(task.predictor(stage_maps), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def quantile_setup() -> tuple[LossPredictingClassifier, dict[str, torch.Tensor]]:
    """A tiny DEP classifier and a hand-made labelled set of 23 images (classes 0..2, each present), seeded."""
    torch.manual_seed(0)
    network = SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16)
    model = LossPredictingClassifier(network, LossPredictor(network.stage_channels, hidden=8))
    labels = torch.tensor([0, 1, 2] * 7 + [1, 1])
    data = {"image": torch.rand(23, 1, 8, 8), "label": labels, "index": torch.arange(100, 123)}
    return model, data


def batches(data: dict[str, torch.Tensor], rows: range, size: int = 5) -> list[dict[str, torch.Tensor]]:
    rows = list(rows)
    return [{key: value[rows[i : i + size]] for key, value in data.items()} for i in range(0, len(rows), size)]


def test_target_loss_quantiles_equal_torch_quantile_per_class():
    model, data = quantile_setup()
    model.train()
    with torch.no_grad():
        values = model.eval().loss_predictor(model.forward_features(data["image"])[1])
    model.train()
    for quantile in (0.0, 0.25, 0.5, 0.9, 1.0):
        result = target_loss_quantiles(model, batches(data, range(23)), quantile, 3)
        expected = torch.stack([torch.quantile(values[data["label"] == k], quantile) for k in range(3)])
        assert result.shape == (3,) and result.dtype == torch.float32
        torch.testing.assert_close(result, expected)
    assert model.training  # its mode is restored
    torch.testing.assert_close(  # a repeated sample (same dataset index) counts once
        target_loss_quantiles(model, batches(data, [*range(23), 4, 5]), 0.25, 3),
        target_loss_quantiles(model, batches(data, range(23)), 0.25, 3),
    )
    with pytest.raises(ValueError, match="quantile must lie in"):
        target_loss_quantiles(model, batches(data, range(23)), 1.5, 3)
    with pytest.raises(ValueError, match="no images of class 3"):
        target_loss_quantiles(model, batches(data, range(23)), 0.5, 4)
    with pytest.raises(ValueError, match="missing \\['index'\\]"):
        target_loss_quantiles(model, [{"image": data["image"], "label": data["label"]}], 0.5, 3)
    with pytest.raises(ValueError, match="loss_predictor"):
        target_loss_quantiles(model.network, batches(data, range(23)), 0.5, 3)


def _quantiles_on_rank(rank: int, world_size: int) -> torch.Tensor:
    model, data = quantile_setup()
    # uneven shares, samples 10..14 read by both ranks (as a padding sampler would); the batches are those of the
    # one-process run, so the predictions are bit-identical and any difference would come from the gathering
    shares = [range(15), range(10, 23)] if world_size == 2 else [range(23)]
    return target_loss_quantiles(model, batches(data, shares[rank]), 0.3, 3)


@pytest.mark.ddp
def test_target_loss_quantiles_on_two_processes_equal_one_process():
    single = _quantiles_on_rank(0, 1)
    for result in run_distributed(_quantiles_on_rank, world_size=2):
        assert torch.equal(result, single)
