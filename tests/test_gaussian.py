from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.distributions import MultivariateNormal
from torch.utils.data import DataLoader

from cfx.cli import main
from cfx.data import SyntheticImages
from cfx.nn import SmallCNN
from cfx.nn.gaussian import JITTER_LADDER, ClassGaussians, class_feature_statistics, fit_class_gaussians
from cfx.tasks import (
    ClassificationTask,
    FitClassGaussians,
    fit_and_save_class_gaussians,
    load_classifier_and_gaussians,
)
from tests.config_helpers import tiny_trainer
from tests.distributed import run_distributed
from tests.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]


def _toy(num_samples: int = 90, dim: int = 4, num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    mixing = torch.randn(num_classes, dim, dim, generator=generator)
    noise = torch.randn(num_samples, dim, generator=generator)
    features = torch.einsum("nd,nde->ne", noise, mixing[labels]) + 3 * labels[:, None].float()
    return features.double(), labels


def _fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassGaussians:
    return ClassGaussians.from_statistics(*class_feature_statistics(features, labels, num_classes))


def test_means_and_covariances_equal_direct_computation():
    features, labels = _toy()
    gaussians = _fit(features, labels, 3)
    for c in range(3):
        members = features[labels == c]
        assert torch.allclose(gaussians.means[c], members.mean(0), atol=1e-12)
        assert torch.allclose(gaussians.covariances[c], torch.cov(members.T), atol=1e-10)
    assert gaussians.jitter.tolist() == [0.0, 0.0, 0.0]
    assert gaussians.means.dtype == torch.float64 and gaussians.covariances.dtype == torch.float64
    assert (gaussians.num_classes, gaussians.feature_dim) == (3, 4)


def test_log_prob_equals_torch_distributions_and_its_gradient():
    features, labels = _toy()
    gaussians = _fit(features, labels, 3)
    queries = (torch.randn(7, 4, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_(True)
    log_prob = gaussians.log_prob(queries)
    assert log_prob.shape == (7, 3) and log_prob.dtype == torch.float32
    reference_queries = queries.detach().double().requires_grad_(True)
    reference = torch.stack(
        [
            MultivariateNormal(gaussians.means[c], gaussians.covariances[c]).log_prob(reference_queries)
            for c in range(3)
        ],
        dim=1,
    )
    assert torch.allclose(log_prob.double(), reference, rtol=1e-5)
    # gradient of -log p_t(z) with per-sample targets, as DeDUCE uses it
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    (-log_prob.gather(1, targets[:, None]).sum()).backward()
    (-reference.gather(1, targets[:, None]).sum()).backward()
    assert torch.allclose(queries.grad.double(), reference_queries.grad, rtol=1e-4, atol=1e-6)


def test_results_do_not_depend_on_how_the_statistics_are_chunked():
    features, labels = _toy()
    whole = class_feature_statistics(features, labels, 3)
    parts = [class_feature_statistics(features[i : i + 17], labels[i : i + 17], 3) for i in range(0, 90, 17)]
    summed = [sum(part[k] for part in parts) for k in range(3)]
    for a, b in zip(whole, summed, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_fewer_samples_than_dimensions_gets_the_first_working_jitter():
    features, labels = _toy(num_samples=40, dim=6, num_classes=2)
    # class 2 has 3 samples in 6 dimensions (rank-deficient covariance), class 3 a single sample
    features = torch.cat([features, torch.randn(3, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)])
    labels = torch.cat([labels, torch.tensor([2, 2, 2, 3])])
    gaussians = _fit(features, labels, 4)
    assert gaussians.jitter[:2].tolist() == [0.0, 0.0]
    identity = torch.eye(6, dtype=torch.float64)
    for c in (2, 3):
        jitter = gaussians.jitter[c].item()
        assert jitter > 0
        previous = JITTER_LADDER[JITTER_LADDER.index(jitter) - 1]
        assert torch.linalg.cholesky_ex(gaussians.covariances[c] + jitter * identity).info == 0
        assert torch.linalg.cholesky_ex(gaussians.covariances[c] + previous * identity).info != 0
    assert torch.allclose(gaussians.covariances[3], torch.zeros(6, 6, dtype=torch.float64))
    log_prob = gaussians.log_prob(features)
    assert torch.isfinite(log_prob[:, :3]).all()
    # the single-sample class is a near point mass: finite only at its own sample
    assert torch.isfinite(log_prob[-1, 3]) and (log_prob[:-1, 3] < -1e100).all()


def test_bad_inputs_are_clear_errors():
    features, labels = _toy()
    gaussians = _fit(features, labels, 3)
    with pytest.raises(ValueError, match=r"\(N, 4\).*dimension 5"):
        gaussians.log_prob(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        class_feature_statistics(features, labels + 1, 3)
    with pytest.raises(ValueError, match="NaN"):
        class_feature_statistics(torch.full((2, 4), float("nan")), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"classes \[3\] have no samples"):
        _fit(features, labels, 4)


def test_save_load_round_trip_and_missing_or_corrupt_files(tmp_path):
    features, labels = _toy()
    gaussians = _fit(features, labels, 3)
    gaussians.save(tmp_path / "sub" / "class_gaussians.pt")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["class_gaussians.pt"]
    loaded = ClassGaussians.load(tmp_path / "sub" / "class_gaussians.pt")
    for name in ("means", "covariances", "jitter", "cholesky"):
        assert torch.equal(getattr(loaded, name), getattr(gaussians, name))
    with pytest.raises(FileNotFoundError, match="no class Gaussians at"):
        ClassGaussians.load(tmp_path / "absent.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(ValueError, match="not a readable ClassGaussians file"):
        ClassGaussians.load(tmp_path / "corrupt.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a ClassGaussians file"):
        ClassGaussians.load(tmp_path / "foreign.pt")


def _data_and_network() -> tuple[SyntheticImages, SmallCNN]:
    torch.manual_seed(0)
    datamodule = SyntheticImages(num_samples=150, num_classes=3, image_size=8, eval_batch_size=16)
    return datamodule, SmallCNN(in_channels=1, num_classes=3, channels=(4,), hidden=5)


def test_fit_over_a_loader_equals_direct_fit_on_all_features():
    datamodule, network = _data_and_network()
    network.train()
    gaussians = fit_class_gaussians(network, datamodule.eval_dataloader("train"), 3)
    assert network.training
    batch = next(iter(DataLoader(datamodule.dataset("train"), batch_size=1000)))
    with torch.no_grad():
        features = network.eval().forward_features(batch["image"])[0]
    direct = _fit(features, batch["label"], 3)
    assert torch.allclose(gaussians.means, direct.means, atol=1e-10)
    assert torch.allclose(gaussians.covariances, direct.covariances, atol=1e-10)


def _fit_on_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    datamodule, network = _data_and_network()
    gaussians = fit_class_gaussians(network, datamodule.eval_dataloader("train"), 3)
    return {"means": gaussians.means, "covariances": gaussians.covariances, "jitter": gaussians.jitter}


@pytest.mark.ddp
def test_two_process_fit_equals_one_process():
    single = _fit_on_rank(0, 1)
    for result in run_distributed(_fit_on_rank, world_size=2):
        for name, value in single.items():
            assert torch.allclose(result[name], value, atol=1e-10), name


TINY_CLASSIFIER = {
    "seed_everything": 0,
    "trainer": tiny_trainer(limit_train_batches=2),
    "model": {
        "class_path": "cfx.tasks.ClassificationTask",
        "init_args": {"network": {"class_path": "cfx.nn.SmallCNN", "init_args": {"channels": [4], "hidden": 5}}},
    },
    "data": {"class_path": "cfx.data.SyntheticImages", "init_args": {"num_samples": 90, "image_size": 8}},
}


def test_cli_fit_with_the_ddu_config_saves_gaussians_next_to_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "classifier.yaml"
    config.write_text(yaml.safe_dump(TINY_CLASSIFIER))
    main(["fit", "-c", str(config), "-c", str(REPO / "configs/ddu/fit_gaussians.yaml"), "--checkpoint.dirpath=ckpt"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["class_gaussians.pt", "last.ckpt"]
    classifier, gaussians = load_classifier_and_gaussians(tmp_path / "ckpt" / "last.ckpt")
    datamodule = SyntheticImages(num_samples=90, image_size=8)
    direct = fit_class_gaussians(classifier, datamodule.eval_dataloader("train"), 3)
    assert torch.allclose(gaussians.means, direct.means, atol=1e-12)
    assert torch.allclose(gaussians.covariances, direct.covariances, atol=1e-12)
    # the Python route writes the same file
    path = fit_and_save_class_gaussians(tmp_path / "ckpt" / "last.ckpt", datamodule, tmp_path / "again.pt")
    assert torch.allclose(ClassGaussians.load(path).covariances, direct.covariances, atol=1e-12)
    _fit(*_toy(dim=3), 3).save(tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="3 Gaussians over 3 features, the classifier has 3 classes and 5 features"):
        load_classifier_and_gaussians(tmp_path / "ckpt" / "last.ckpt", tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="no class Gaussians"):
        load_classifier_and_gaussians(tmp_path / "ckpt" / "last.ckpt", tmp_path / "absent.pt")


@pytest.mark.ddp
def test_callback_under_two_process_ddp_saves_the_one_process_fit(tmp_path):
    datamodule, network = _data_and_network()
    task = ClassificationTask(network)
    trainer = quiet_trainer(2, max_steps=2, callbacks=[FitClassGaussians(dirpath=str(tmp_path))])
    trainer.fit(task, datamodule)
    saved = ClassGaussians.load(tmp_path / "class_gaussians.pt")
    # ddp_spawn hands the trained weights back to this process: fit on all data here and compare
    direct = fit_class_gaussians(task.network, datamodule.eval_dataloader("train"), 3)
    assert torch.allclose(saved.means, direct.means, atol=1e-10)
    assert torch.allclose(saved.covariances, direct.covariances, atol=1e-10)
