from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from cfx.counterfactual import DISC, JSMA, DeDUCE, Wachter
from cfx.data import SyntheticImages
from cfx.nn import ClassGaussians, as_classifier
from cfx.tasks import ClassificationTask, load_classifier
from cfx.tasks.ddu import gaussians_main
from tests.trainers import quiet_trainer

SIZE, CLASSES = 8, 3


def _sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, CLASSES)
    )


def _data() -> SyntheticImages:
    return SyntheticImages(num_samples=90, num_classes=CLASSES, image_size=SIZE, noise=0.05, batch_size=16)


def test_sequential_split_at_the_feature_layer_matches_the_module():
    torch.manual_seed(0)
    module = _sequential()
    classifier = as_classifier(module, 1, CLASSES, SIZE, feature_layer="3", stage_layers=["1"])
    images = torch.rand(5, 1, SIZE, SIZE)
    features, stages = classifier.forward_features(images)
    expected_features = module[:4](images)
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(classifier.classify(features), module(images))
    assert classifier.feature_dim == 16 and classifier.stage_channels == (4,) and stages[0].shape == (5, 4, SIZE, SIZE)
    assert set(classifier.state_dict()) == {f"module.{key}" for key in module.state_dict()}


def test_any_module_with_a_named_feature_layer_and_head():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
            self.fc = nn.Linear(2 * 6 * 6, CLASSES)

        def forward(self, images):
            return self.fc(self.body(images))

    net = Net()
    classifier = as_classifier(net, 1, CLASSES, SIZE, feature_layer="body", head="fc")
    images = torch.rand(3, 1, SIZE, SIZE)
    torch.testing.assert_close(classifier.classify(classifier.forward_features(images)[0]), net(images))
    assert classifier.head is net.fc
    with pytest.raises(ValueError, match="pass head=..."):
        as_classifier(net, 1, CLASSES, SIZE, feature_layer="body")


def test_without_a_feature_layer_logits_work_and_features_name_what_to_pass():
    module = _sequential()
    classifier = as_classifier(module, 1, CLASSES)
    images = torch.rand(2, 1, SIZE, SIZE)
    torch.testing.assert_close(classifier(images), module(images))
    with pytest.raises(ValueError, match=r"cfx\.nn\.as_classifier\(module, \.\.\., feature_layer="):
        classifier.forward_features(images)
    with pytest.raises(ValueError, match="has no submodule 'nope'"):
        as_classifier(module, 1, CLASSES, SIZE, feature_layer="nope")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A plain nn.Sequential trained a few steps through ClassificationTask, with Gaussians from cfx-gaussians."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("byom") / "last.ckpt"
    network = as_classifier(_sequential(), 1, CLASSES, SIZE, feature_layer="3")
    task = ClassificationTask(network, functools.partial(torch.optim.Adam, lr=0.05))
    trainer = quiet_trainer(max_epochs=30)
    trainer.fit(task, _data())
    trainer.save_checkpoint(path)
    gaussians_main(["--checkpoint", str(path), "--data", "cfx.data.SyntheticImages"] + _data_args())
    return path


def _data_args() -> list[str]:
    values = {"num_samples": 90, "num_classes": CLASSES, "image_size": SIZE, "noise": 0.05}
    return [f"--data.init_args.{name}={value}" for name, value in values.items()]


def test_cfx_gaussians_fits_the_checkpoints_features(trained: Path):
    gaussians = ClassGaussians.load(trained.parent / "class_gaussians.pt")
    assert (gaussians.num_classes, gaussians.feature_dim) == (CLASSES, 16)


def test_cfx_gaussians_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gaussians_main(["--checkpoint", str(tmp_path / "absent.ckpt"), "--data", "cfx.data.SyntheticImages"])
    assert exit_info.value.code == 2
    assert "no checkpoint at" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_plain_module_is_explained_by_jsma_wachter_and_deduce(trained: Path):
    classifier = load_classifier(trained)
    data = _data()
    data.setup("test")
    batch = next(iter(data.eval_dataloader("test")))
    images = batch["image"][:6]
    predictions = classifier(images).argmax(1)
    targets = (predictions + 1) % CLASSES
    gaussians = ClassGaussians.load(trained.parent / "class_gaussians.pt")
    for explainer in (JSMA(classifier), Wachter(classifier), DeDUCE(classifier, gaussians)):
        result = explainer.explain(images, targets, batch["index"][:6])
        reached = classifier(result.counterfactuals).argmax(1) == targets
        assert result.counterfactuals.shape == images.shape
        assert torch.equal(result.success, reached) and reached.all(), type(explainer).__name__


def test_image_space_disc_explains_a_logits_only_module_and_latent_disc_names_what_to_pass(trained: Path):
    plain = as_classifier(load_classifier(trained).module, 1, CLASSES)  # the trained nn.Sequential, no feature layer
    data = _data()
    data.setup("test")
    batch = next(iter(data.eval_dataloader("test")))
    images, indices = batch["image"][:6], batch["index"][:6]
    targets = (plain(images).argmax(1) + 1) % CLASSES
    disc = DISC(plain, prior="pixel", semantic="image", lr=0.01, max_iterations=100, reconstruction_steps=0)
    result = disc.explain(images, targets, indices)
    reached = plain(result.counterfactuals).argmax(1) == targets
    assert torch.equal(result.success, reached) and reached.all()
    assert ((result.counterfactuals - images).abs().flatten(1).amax(1) > 0).all()
    with pytest.raises(ValueError, match=r"DISC semantic='latent'.*as_classifier\(module, \.\.\., feature_layer="):
        DISC(plain, prior="pixel", semantic="latent", max_iterations=5, reconstruction_steps=0).explain(
            images, targets, indices
        )
