from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cfx.cli import main
from cfx.nn import DUQFeatureClassifier, DUQHead, duq_uncertainty, gradient_penalty, kernel_margin_loss
from cfx.tasks import DUQTask, load_classifier, load_duq_classifier
from tests.config_helpers import tiny_trainer
from tests.distributed import run_distributed


def test_kernel_equals_its_definition():
    torch.manual_seed(0)
    head = DUQHead(feature_dim=3, num_classes=2, embedding_dim=4, length_scale=0.7)
    features = torch.randn(5, 3)
    kernel = head(features)
    for n in range(5):
        for c in range(2):
            embedding = head.weight[:, c, :] @ features[n]
            distance = ((embedding - head.centroids[c]) ** 2).mean()
            assert kernel[n, c].item() == pytest.approx(math.exp(-distance.item() / (2 * 0.7**2)), rel=1e-5)
    assert torch.equal(duq_uncertainty(kernel), -kernel.max(1).values)


def test_centroid_moving_average_equals_closed_form():
    gamma, steps = 0.9, 4
    head = DUQHead(feature_dim=2, num_classes=3, embedding_dim=2, gamma=gamma, initial_count=5.0)
    initial_sums, initial_counts = head.centroid_sums.clone(), head.centroid_counts.clone()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 3, (6,), generator=generator)
        embeddings = torch.randn(6, 3, 2, generator=generator)
        batches.append((embeddings, nn.functional.one_hot(labels, 3)))
        head.update_centroids(*batches[-1])
    # n_T = g^T n_0 + sum_t g^(T-1-t) (1-g) c_t, the same for the sums
    counts, sums = gamma**steps * initial_counts, gamma**steps * initial_sums
    for t, (embeddings, one_hot) in enumerate(batches):
        weight = gamma ** (steps - 1 - t) * (1 - gamma)
        counts = counts + weight * one_hot.sum(0)
        for n in range(6):
            label = one_hot[n].argmax()
            sums[label] += weight * embeddings[n, label]
    assert torch.allclose(head.centroid_counts, counts, atol=1e-6)
    assert torch.allclose(head.centroid_sums, sums, atol=1e-6)
    assert torch.allclose(head.centroids, sums / counts[:, None], atol=1e-6)
    with pytest.raises(ValueError, match=r"embeddings \(N, 3, 2\)"):
        head.update_centroids(torch.zeros(6, 3, 5), batches[0][1])


def test_gradient_penalty_matches_finite_differences():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh()).double()
    head = DUQHead(feature_dim=5, num_classes=3, embedding_dim=4).double()
    inputs = torch.randn(4, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    penalty = gradient_penalty(inputs, head(network(inputs)))

    def summed_kernel(x: torch.Tensor) -> torch.Tensor:
        return head(network(x)).sum(1)  # per sample: sum_c K_c

    eps = 1e-6
    gradient = torch.zeros(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for j in range(6):
            step = torch.zeros(4, 6, dtype=torch.float64)
            step[:, j] = eps
            step = step.view(4, 1, 2, 3)
            gradient[:, j] = (summed_kernel(inputs + step) - summed_kernel(inputs - step)) / (2 * eps)
    expected = ((gradient.norm(dim=1) - 1) ** 2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    # the penalty is differentiable in the weights (built with create_graph)
    assert torch.autograd.gradcheck(
        lambda weight: gradient_penalty(inputs, head.kernel(torch.einsum("nf,ecf->nce", network(inputs), weight))),
        (head.weight.detach().clone().requires_grad_(True),),
    )
    with pytest.raises(ValueError, match="requires_grad"):
        gradient_penalty(inputs.detach(), head(network(inputs.detach())))


def test_kernel_margin_loss_equals_hand_computed_values():
    kernel = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.3, 0.95]])
    loss = kernel_margin_loss(kernel, source=torch.tensor([0, 2]), target=torch.tensor([1, 1]), margin=0.5)
    assert torch.allclose(loss, torch.tensor([1.2, 1.15]))
    # the target already more similar than the source by more than the margin: no loss
    assert kernel_margin_loss(kernel, torch.tensor([1]), torch.tensor([0]))[0].item() == 0.0


def _update_on_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    head = DUQHead(feature_dim=4, num_classes=3, embedding_dim=3, gamma=0.8)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        embeddings = torch.randn(10, 3, 3, generator=generator)
        one_hot = nn.functional.one_hot(torch.randint(0, 3, (10,), generator=generator), 3)
        share = slice(rank * 10 // world_size, (rank + 1) * 10 // world_size)
        head.update_centroids(embeddings[share], one_hot[share])
    return {"sums": head.centroid_sums, "counts": head.centroid_counts}


@pytest.mark.ddp
def test_two_process_centroid_update_equals_one_process():
    single = _update_on_rank(0, 1)
    for result in run_distributed(_update_on_rank, world_size=2):
        assert torch.allclose(result["sums"], single["sums"], atol=1e-6)
        assert torch.allclose(result["counts"], single["counts"], atol=1e-6)


TINY_DUQ = {
    "seed_everything": 0,
    "trainer": tiny_trainer(limit_train_batches=3),
    "model": {
        "class_path": "cfx.tasks.DUQTask",
        "init_args": {
            "network": {"class_path": "cfx.nn.SmallCNN", "init_args": {"channels": [4, 8], "hidden": 16}},
            "embedding_dim": 6,
            "gamma": 0.5,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    },
    "data": {
        "class_path": "cfx.data.SyntheticImages",
        "init_args": {"num_samples": 90, "batch_size": 15},
    },
}


def test_duq_task_trains_through_the_cli_updates_centroids_each_step_and_reloads(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "duq.yaml"
    config.write_text(yaml.safe_dump(TINY_DUQ))
    cli = main(["fit", "-c", str(config), "--checkpoint.dirpath=ckpt"])
    task = cli.model
    assert isinstance(task, DUQTask)
    assert not any(p.requires_grad for p in task.network.fc.parameters())
    assert all(p.requires_grad for p in task.network.convs.parameters())
    # 3 steps of 15 samples: total count 13 * 3 classes -> 0.5^3 * 39 + (1 - 0.5^3) * 15
    assert task.head.centroid_counts.sum().item() == pytest.approx(0.125 * 39 + 0.875 * 15, rel=1e-5)
    assert 0 <= cli.trainer.callback_metrics["val/acc"] <= 1
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(saved["head.centroid_sums"], task.head.centroid_sums)
    model = load_duq_classifier(tmp_path / "ckpt" / "last.ckpt")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = torch.rand(4, 1, 16, 16)
    assert torch.allclose(model(images), task.eval()(images), atol=1e-6)
    assert torch.allclose(model.uncertainty(images), -task(images).max(1).values, atol=1e-6)
    test = main(["test", "-c", str(config), "--ckpt_path=ckpt/last.ckpt"])
    assert 0 <= test.trainer.callback_metrics["test/acc"] <= 1
    explained = load_classifier(tmp_path / "ckpt" / "last.ckpt")  # what counterfactual runs explain
    assert isinstance(explained, DUQFeatureClassifier) and explained.num_classes == 3
    kernel_values = task(images)
    assert torch.allclose(explained(images), kernel_values.log(), atol=1e-5)
    assert torch.allclose(explained(images).softmax(1), kernel_values / kernel_values.sum(1, keepdim=True), atol=1e-6)
