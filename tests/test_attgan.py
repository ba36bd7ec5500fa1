"""AttGAN networks and AttGANTask: shapes, errors, learning, exact resumption, load_generative, configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cfx.cli import main
from cfx.data import SyntheticImages
from cfx.data.base import TensorImages
from cfx.nn.attgan import AttGAN, AttGANDiscriminator, AttGANGenerator
from cfx.tasks import AttGANTask, load_generative
from tests.config_helpers import tiny_trainer
from tests.test_generative_tasks import CrashAt, RecordEpochMetrics, _checkpointing_trainer
from tests.test_resume import _assert_identical
from tests.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
NAMES = ("top", "left", "first_class")


class AttributedImages(SyntheticImages):
    """SyntheticImages with three 0/1 attributes read off the images: bright top half, bright left half, class 0."""

    attribute_names = NAMES

    def load_source(self) -> TensorImages:
        source = super().load_source()
        images, half = source.images.float(), source.images.shape[-1] // 2
        top, left = images[..., :half, :].mean((1, 2, 3)), images[..., :half].mean((1, 2, 3))
        attributes = torch.stack([top > top.median(), left > left.median(), source.labels == 0], dim=1).float()
        return TensorImages(source.images, source.labels, attributes, NAMES)


def _data(**settings: object) -> AttributedImages:
    """120 synthetic 28 px images with attributes: 84 for training (5 batches of 16), 12 for validation."""
    return AttributedImages(**{"num_samples": 120, "image_size": 28, "batch_size": 16, **settings})


def _task(**settings: object) -> AttGANTask:
    generator = AttGANGenerator(3, base_channels=4)
    discriminator = AttGANDiscriminator(3, base_channels=4, head_width=8)
    return AttGANTask(generator, discriminator, **{"critic_steps": 2, "grid_images": 2, **settings})


@pytest.mark.parametrize(
    ("size", "channels", "maps"), [(28, 1, [16, 8, 4]), (32, 3, [16, 8, 4]), (64, 3, [32, 16, 8, 4, 2])]
)
def test_networks_map_images_in_the_unit_range_to_images_and_scores_of_the_right_shapes(size, channels, maps):
    torch.manual_seed(0)
    generator = AttGANGenerator(5, channels, size, base_channels=4)
    discriminator = AttGANDiscriminator(5, channels, size, base_channels=4, head_width=8)
    images, attributes = torch.rand(3, channels, size, size), torch.rand(3, 5)
    features = generator.encode(images)
    assert [feature.shape[-1] for feature in features] == maps  # 28 px is padded to 32 first
    edited = generator.decode(features, attributes)
    assert edited.shape == images.shape and edited.min() >= 0 and edited.max() <= 1
    assert torch.equal(edited, generator(images, attributes))
    critic, logits = discriminator(images)
    assert critic.shape == (3,) and logits.shape == (3, 5)
    # the attributes reach the output: other attributes, other images
    assert not torch.allclose(generator(images, 1 - attributes), edited)


def test_the_decoder_reads_attributes_as_a_times_2_minus_1_times_half():
    torch.manual_seed(0)
    generator = AttGANGenerator(2, base_channels=4).eval()
    images, attributes = torch.rand(2, 1, 28, 28), torch.tensor([[0.0, 1.0], [0.25, 0.5]])
    first = generator.decoder[0][0]  # the first ConvT reads [last map, tiled (a * 2 - 1) * 0.5]
    seen = {}
    handle = first.register_forward_pre_hook(lambda module, inputs: seen.update(input=inputs[0]))
    generator(images, attributes)
    handle.remove()
    assert torch.equal(seen["input"][:, -2:, 0, 0], (attributes * 2 - 1) * 0.5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AttGANGenerator(3, image_size=27), r"image_size must be in 28..128 px, got 27"),
        (lambda: AttGANDiscriminator(3, image_size=129), r"image_size must be in 28..128 px, got 129"),
        (lambda: AttGANGenerator(3, in_channels=2), "in_channels must be 1 or 3, got 2"),
        (lambda: AttGANGenerator(0), "num_attributes must be an integer >= 1, got 0"),
        (
            lambda: AttGANDiscriminator(3, image_size=28, layers=5),
            r"5 layers reduce 28 px images below 2x2 \(at most 4",
        ),
        (lambda: AttGANGenerator(3, shortcut_layers=3), "shortcut_layers must be at most layers - 1 = 2, got 3"),
        (lambda: AttGAN(AttGANGenerator(3), AttGANDiscriminator(4)), "generator is built for 3 attributes"),
        (lambda: AttGAN(AttGANGenerator(3), AttGANDiscriminator(3), ("a", "b")), "3 attributes, got 2 attribute names"),
        (
            lambda: AttGANTask(AttGANGenerator(3), AttGANDiscriminator(3), attributes=["a"]),
            "must name the generator's 3",
        ),
        (
            lambda: AttGANTask(AttGANGenerator(3), AttGANDiscriminator(3), gradient_penalty=-1),
            "gradient_penalty must be",
        ),
    ],
)
def test_bad_arguments_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_inputs_are_clear_errors():
    generator = AttGANGenerator(3, base_channels=4)
    with pytest.raises(ValueError, match=r"expected attributes of shape \(2, 3\), got \(2, 4\)"):
        generator(torch.rand(2, 1, 28, 28), torch.rand(2, 4))
    with pytest.raises(ValueError, match="built for 1-channel 28x28 images"):
        generator(torch.rand(2, 1, 32, 32), torch.rand(2, 3))


def test_data_without_matching_attributes_is_a_clear_error():
    with pytest.raises(ValueError, match="AttGANTask needs data with attributes; SyntheticImages has none"):
        quiet_trainer(max_epochs=1).fit(_task(), SyntheticImages(num_samples=60, image_size=28))
    generator, discriminator = AttGANGenerator(2, base_channels=4), AttGANDiscriminator(2, base_channels=4)
    with pytest.raises(ValueError, match=r"AttributedImages has 3 attributes .* the AttGAN was built for 2"):
        quiet_trainer(max_epochs=1).fit(AttGANTask(generator, discriminator), _data())
    task = AttGANTask(generator, discriminator, attributes=["left", "round"])
    with pytest.raises(ValueError, match=r"AttributedImages has no attribute\(s\) \['round'\]"):
        quiet_trainer(max_epochs=1).fit(task, _data())


def test_selected_attributes_are_the_named_columns_and_are_recorded():
    generator, discriminator = AttGANGenerator(2, base_channels=4), AttGANDiscriminator(2, base_channels=4)
    task = AttGANTask(generator, discriminator, attributes=["first_class", "top"])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    data = _data()
    trainer.fit(task, data)
    assert task.network.attribute_names == ("first_class", "top")
    batch = next(iter(data.val_dataloader()))
    assert torch.equal(task.batch_attributes(batch), batch["attributes"][:, [2, 0]])


def test_the_losses_decrease_on_a_tiny_run():
    L.seed_everything(0)
    recorder = RecordEpochMetrics()
    quiet_trainer(max_epochs=4, callbacks=[recorder]).fit(_task(critic_steps=1, lr=1e-3), _data())
    reconstruction = [epoch["train/reconstruction_loss"] for epoch in recorder.epochs]
    attributes = [epoch["train/discriminator_attribute_loss"] for epoch in recorder.epochs]
    assert reconstruction[-1] < 0.8 * reconstruction[0]
    assert attributes[-1] < attributes[0]


def test_validation_metrics_are_per_image_reconstruction_l1_and_attribute_accuracy():
    L.seed_everything(0)
    task, data = _task(), _data(eval_batch_size=5)  # 12 validation images: batches of 5, 5 and 2
    metrics = quiet_trainer().validate(task, data, verbose=False)[0]
    samples = list(data.dataset("val"))
    images, attributes = torch.stack([s["image"] for s in samples]), torch.stack([s["attributes"] for s in samples])
    with torch.no_grad():
        task.eval()
        reconstruction = task.generator(images, attributes)
        logits = task.discriminator(images)[1]
    l1 = (reconstruction - images).abs().flatten(1).sum(1).mean()
    assert metrics["val/reconstruction_l1"] == pytest.approx(l1.item(), rel=1e-5)
    hits = [[float((logits[i, j] > 0) == (attributes[i, j] == 1)) for j in range(3)] for i in range(12)]
    assert metrics["val/attribute_accuracy"] == pytest.approx(sum(map(sum, hits)) / 36, rel=1e-6)


def test_resuming_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    L.seed_everything(0)
    straight_task, straight = _task(), _checkpointing_trainer(tmp_path / "straight", 3)
    straight.fit(straight_task, _data())
    L.seed_everything(0)
    crashing = _checkpointing_trainer(tmp_path / "resumed", 3, [CrashAt(epoch=1, batch=2)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(_task(), _data())
    checkpoint = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    L.seed_everything(0)
    resumed_task, resumed = _task(), _checkpointing_trainer(tmp_path / "resumed", 3)
    resumed.fit(resumed_task, _data(), ckpt_path=checkpoint)
    _assert_identical(straight_task.state_dict(), resumed_task.state_dict(), "state_dict")
    for position, optimizer in enumerate(straight.optimizers):
        _assert_identical(optimizer.state_dict(), resumed.optimizers[position].state_dict(), f"optimizer {position}")
    assert int(resumed_task.training_batches) == 3 * 5  # the 2-step alternation crosses the 5-batch epochs

    # the checkpoint loads as the AttGAN, knowing its attribute names; the per-epoch grid was written
    attgan = load_generative(tmp_path / "straight" / "ckpt" / "last.ckpt")
    assert isinstance(attgan, AttGAN) and attgan.attribute_names == NAMES
    assert not any(module.training for module in attgan.modules())
    images, attributes = torch.rand(2, 1, 28, 28), torch.rand(2, 3)
    with torch.no_grad():
        assert torch.allclose(attgan(images, attributes), straight_task.eval().generator(images, attributes))
    grids = sorted((tmp_path / "straight" / "attributes").glob("epoch_*.png"))
    assert [grid.name for grid in grids] == ["epoch_000.png", "epoch_001.png", "epoch_002.png"]


def test_the_attribute_grid_shows_each_image_its_reconstruction_and_each_attribute_flipped():
    torch.manual_seed(0)
    task = _task()
    images, attributes = torch.rand(2, 1, 28, 28), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    tiles = task.attribute_grid(images, attributes)
    assert tiles.shape == (2 * 5, 1, 28, 28)
    with torch.no_grad():
        generator = task.generator.eval()
        for i in range(2):
            assert torch.equal(tiles[5 * i], images[i])
            assert torch.allclose(tiles[5 * i + 1], generator(images[i : i + 1], attributes[i : i + 1])[0], atol=1e-6)
            for j in range(3):
                flipped = attributes[i : i + 1].clone()
                flipped[0, j] = 1 - flipped[0, j]
                assert torch.allclose(tiles[5 * i + 2 + j], generator(images[i : i + 1], flipped)[0], atol=1e-6)


def _run_config(config: dict, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(path), f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    return tmp_path / "ckpt" / "last.ckpt"


def _shrunk(config: dict) -> dict:
    """The config with tiny networks and a one-epoch, two-batch CPU run."""
    config["trainer"] = tiny_trainer(limit_train_batches=2, limit_val_batches=1)
    for name in ("generator", "discriminator"):
        config["model"]["init_args"][name]["init_args"].update(base_channels=4)
    config["model"]["init_args"]["discriminator"]["init_args"]["head_width"] = 8
    return config


def test_the_embedded_mnist_config_runs_on_data_with_attributes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / "configs" / "attgan" / "embedded_mnist.yaml").read_text())
    assert config["data"] == {
        "class_path": "cfx.data.EmbeddedMNIST",
        "init_args": {"attributes": "morphometric", "batch_size": 64},
    }
    config["data"] = {
        "class_path": "tests.test_attgan.AttributedImages",
        "init_args": {"num_samples": 60, "image_size": 28, "batch_size": 16, "num_workers": 0},
    }
    for name in ("generator", "discriminator"):
        config["model"]["init_args"][name]["init_args"]["num_attributes"] = 3
    attgan = load_generative(_run_config(_shrunk(config), tmp_path))
    assert isinstance(attgan, AttGAN) and attgan.attribute_names == NAMES


@pytest.mark.parametrize("size", [64, 128])
def test_the_celeba_configs_run_on_fake_celeba_with_13_selected_attributes(size, celeba_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / "configs" / "attgan" / f"celeba_{size}.yaml").read_text())
    assert (
        config["model"]["init_args"]["attributes"][-1] == "Young"
        and len(config["model"]["init_args"]["attributes"]) == 13
    )
    chosen = [f"Attr_{i}" for i in range(12)] + ["Young"]  # the fake files name 38 attributes Attr_i
    config["model"]["init_args"]["attributes"] = chosen
    config["data"]["init_args"].update(root=str(celeba_root), batch_size=4, num_workers=0, pin_memory=False)
    attgan = load_generative(_run_config(_shrunk(config), tmp_path))
    assert attgan.attribute_names == tuple(chosen) and attgan.image_size == size and attgan.in_channels == 3
