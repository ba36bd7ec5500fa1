"""GANTask, VAETask, AutoencoderTask: learning, exact resumption, metrics, sample grids, configs, load_generative."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from cfx.cli import main
from cfx.data import SyntheticImages
from cfx.nn import GAN, ConvAutoencoder, ConvVAE, SmallCNN, WGANCritic, WGANGenerator
from cfx.nn.generative import kl_divergence
from cfx.tasks import AutoencoderTask, ClassificationTask, GANTask, VAETask, load_generative
from tests.config_helpers import tiny_trainer
from tests.processes import kill_when
from tests.test_resume import _assert_identical
from tests.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
GENERATIVE_CONFIGS = sorted(
    path.relative_to(REPO)
    for folder in ("gan", "vae", "autoencoder")
    for path in (REPO / "configs" / folder).glob("*.yaml")
)
EPOCHS = 3


def _data(**settings: object) -> SyntheticImages:
    """120 synthetic 28 px images: 84 for training (5 batches of 16), 12 for validation."""
    return SyntheticImages(
        **{"num_samples": 120, "num_classes": 3, "in_channels": 1, "image_size": 28, "batch_size": 16, **settings}
    )


TASKS: dict[str, Callable[[], L.LightningModule]] = {
    "gan": lambda: GANTask(WGANGenerator(8), WGANCritic(), critic_steps=3, gradient_penalty=1.0, grid_samples=4),
    "vae": lambda: VAETask(ConvVAE(latent_dim=4), kl_warmup_epochs=2.0, grid_images=4),
    "autoencoder": lambda: AutoencoderTask(ConvAutoencoder(latent_dim=4), grid_images=4),
}


class CrashAt(Callback):
    """Raises at the start of batch ``batch`` of epoch ``epoch``, as a crash would."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


class RecordEpochMetrics(Callback):
    """Keeps a copy of the logged metrics after every training epoch."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({key: float(value) for key, value in trainer.callback_metrics.items()})


def _checkpointing_trainer(root: Path, max_epochs: int, callbacks: list[Callback] = ()) -> L.Trainer:
    """A CPU Trainer writing ``root/ckpt/last.ckpt`` after every epoch, as the ``cfx`` command does, and its logs
    (the sample grids) to ``root``."""
    checkpoint = ModelCheckpoint(
        dirpath=root / "ckpt", filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=CSVLogger(root, name="", version=""),
        callbacks=[checkpoint, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("name", TASKS)
def test_resuming_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(name, tmp_path):
    L.seed_everything(0)
    straight_task, straight = TASKS[name](), _checkpointing_trainer(tmp_path / "straight", EPOCHS)
    straight.fit(straight_task, _data())

    L.seed_everything(0)
    crashing = _checkpointing_trainer(tmp_path / "resumed", EPOCHS, [CrashAt(epoch=1, batch=2)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(TASKS[name](), _data())
    checkpoint = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 0
    L.seed_everything(0)
    resumed_task, resumed = TASKS[name](), _checkpointing_trainer(tmp_path / "resumed", EPOCHS)
    resumed.fit(resumed_task, _data(), ckpt_path=checkpoint)

    expected, actual = straight_task.state_dict(), resumed_task.state_dict()
    assert expected.keys() == actual.keys()
    differing = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert differing == [], f"{len(differing)} of {len(expected)} tensors differ: {differing[:5]}"
    for position, optimizer in enumerate(straight.optimizers):
        _assert_identical(optimizer.state_dict(), resumed.optimizers[position].state_dict(), f"optimizer {position}")
    assert int(resumed_task.training_batches) == EPOCHS * 5
    if name == "gan":  # the 3-batch alternation crosses the 5-batch epochs: it is counted in the checkpoint
        steps = [int(next(iter(optimizer.state.values()))["step"]) for optimizer in resumed.optimizers]
        assert steps == [EPOCHS * 5 // 3, EPOCHS * 5]  # generator, critic
        assert resumed.global_step == sum(steps)  # Lightning counts the steps of both optimisers


def _fit_recording(task: L.LightningModule, epochs: int, **trainer_settings) -> list[dict[str, float]]:
    recorder = RecordEpochMetrics()
    quiet_trainer(max_epochs=epochs, callbacks=[recorder], **trainer_settings).fit(task, _data())
    return recorder.epochs


def test_vae_and_autoencoder_losses_decrease_and_the_kl_weight_warms_up():
    L.seed_everything(0)
    vae_epochs = _fit_recording(VAETask(ConvVAE(latent_dim=4), kl_warmup_epochs=2.0, kl_weight=0.5), 4)
    losses = [epoch["train/loss"] for epoch in vae_epochs]
    assert losses[-1] < 0.8 * losses[0]
    # beta of batch b (of 5) in epoch e is 0.5 * min(1, (e + b / 5) / 2): epoch means 0.1, 0.35, 0.5, 0.5
    weights = [epoch["train/kl_weight"] for epoch in vae_epochs]
    assert weights == pytest.approx(
        [0.5 * np.mean([b / 10 for b in range(5)]), 0.5 * np.mean([0.5 + b / 10 for b in range(5)]), 0.5, 0.5]
    )
    L.seed_everything(0)
    autoencoder_epochs = _fit_recording(AutoencoderTask(ConvAutoencoder(latent_dim=4)), 4)
    losses = [epoch["train/loss"] for epoch in autoencoder_epochs]
    assert losses[-1] < 0.8 * losses[0]


def test_each_gan_player_lowers_its_loss_against_a_fixed_opponent():
    # The generator never steps (critic_steps beyond the run): the critic loss falls.
    L.seed_everything(0)
    task = GANTask(WGANGenerator(8), WGANCritic(), critic_steps=10**6, lr_critic=1e-3, grid_samples=2)
    critic_losses = [epoch["train/critic_loss"] for epoch in _fit_recording(task, 3)]
    assert critic_losses[-1] < critic_losses[0] - 0.1
    # The critic never learns (learning rate 0): the generator loss falls.
    L.seed_everything(0)
    task = GANTask(WGANGenerator(8), WGANCritic(), critic_steps=1, lr_critic=0.0, lr_generator=1e-3, grid_samples=2)
    generator_losses = [epoch["train/generator_loss"] for epoch in _fit_recording(task, 3)]
    assert generator_losses[-1] < generator_losses[0]


def test_vae_validation_metrics_are_sample_weighted_means_of_per_image_values(tmp_path):
    L.seed_everything(0)
    task = VAETask(ConvVAE(latent_dim=4), kl_weight=0.7)
    data = _data(eval_batch_size=5)  # 12 validation images: batches of 5, 5 and 2
    metrics = quiet_trainer(default_root_dir=tmp_path).validate(task, data, verbose=False)[0]
    assert not any(tmp_path.iterdir())  # no logger, no reconstruction grid
    images = torch.stack([sample["image"] for sample in data.dataset("val")])
    with torch.no_grad():
        mean, log_variance = task.network.eval().encode(images)
        reconstruction = task.network.decode(mean)
    kl = kl_divergence(mean, log_variance)
    errors = (reconstruction - images).flatten(1)
    assert metrics["val/reconstruction_l1"] == pytest.approx(errors.abs().sum(1).mean().item(), rel=1e-5)
    assert metrics["val/reconstruction_mse"] == pytest.approx(errors.square().mean().item(), rel=1e-5)
    assert metrics["val/kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx((errors.square().sum(1) + 0.7 * kl).mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[L.LightningModule, Path, Path]]:
    """Each task after one epoch: ``(task, checkpoint, log_dir)``."""
    results = {}
    for name, build in TASKS.items():
        root = tmp_path_factory.mktemp(name)
        L.seed_everything(0)
        task = build()
        _checkpointing_trainer(root, 1).fit(task, _data())
        results[name] = (task, root / "ckpt" / "last.ckpt", root)
    return results


def test_load_generative_returns_the_frozen_trained_models(trained):
    latents, images = torch.randn(3, 8), torch.rand(3, 1, 28, 28)
    gan = load_generative(trained["gan"][1])
    assert isinstance(gan, GAN) and isinstance(gan.generator, WGANGenerator) and isinstance(gan.critic, WGANCritic)
    task = trained["gan"][0].eval()
    assert torch.allclose(gan.generator(latents), task.generator(latents))
    assert torch.allclose(gan.critic(images), task.critic(images))
    assert torch.allclose(gan.critic.features(images), task.critic.features(images))
    vae = load_generative(trained["vae"][1])
    assert isinstance(vae, ConvVAE)
    assert torch.allclose(vae(images)[0], trained["vae"][0].network.eval()(images)[0])
    autoencoder = load_generative(trained["autoencoder"][1])
    assert isinstance(autoencoder, ConvAutoencoder)
    assert torch.allclose(autoencoder(images), trained["autoencoder"][0].network.eval()(images))
    for model in (gan, vae, autoencoder):
        assert not any(module.training for module in model.modules())
        assert not any(parameter.requires_grad for parameter in model.parameters())


def test_load_generative_refuses_other_checkpoints(tmp_path):
    classifier = ClassificationTask(SmallCNN(in_channels=1, num_classes=3, channels=(4,), hidden=8))
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(classifier, _data())
    trainer.save_checkpoint(tmp_path / "classifier.ckpt")
    with pytest.raises(ValueError, match="checkpoint of .*ClassificationTask, expected one of GANTask, VAETask"):
        load_generative(tmp_path / "classifier.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_generative(tmp_path / "absent.ckpt")


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_each_epoch_writes_its_grid(trained):
    # 4 tiles of 56 px (28 px upscaled by 2) per row, 2 px gaps: 4 * 58 + 2 = 234 px wide.
    samples = _png(trained["gan"][2] / "samples" / "epoch_000.png")
    assert samples.shape == (3, 60, 234)
    task = trained["gan"][0]
    with torch.no_grad():
        first = task.generator.eval()(task.grid_latents[:1])[0, 0]
    assert torch.allclose(samples[0, 2:58, 2:58], first.repeat_interleave(2, 0).repeat_interleave(2, 1), atol=1 / 255)
    for name in ("vae", "autoencoder"):
        grid = _png(trained[name][2] / "reconstructions" / "epoch_000.png")
        assert grid.shape == (3, 118, 234)  # a row of 4 validation images above their 4 reconstructions
        first_image = _data().dataset("val")[0]["image"][0]
        with torch.no_grad():
            reconstruction = trained[name][0].network.eval()(first_image[None, None])
        reconstruction = reconstruction[0] if name == "vae" else reconstruction
        expected = torch.stack([first_image, reconstruction[0, 0]])
        shown = torch.stack([grid[0, 2:58, 2:58], grid[0, 60:116, 2:58]])
        assert torch.allclose(shown, expected.repeat_interleave(2, 1).repeat_interleave(2, 2), atol=1 / 255)


@pytest.mark.parametrize(
    ("build", "data", "message"),
    [
        (TASKS["gan"], _data(image_size=16), "SyntheticImages does not match WGANGenerator: the data is 16 px"),
        (
            TASKS["vae"],
            _data(in_channels=3),
            r"does not match ConvVAE: the data has 3 channel\(s\), the network expects 1",
        ),
        (TASKS["autoencoder"], _data(image_size=32), "the network was built for 28 px"),
    ],
)
def test_data_not_matching_the_networks_is_a_clear_error(build, data, message):
    with pytest.raises(ValueError, match=message):
        quiet_trainer(max_epochs=1).fit(build(), data)


def test_bad_task_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="critic_steps must be a positive integer"):
        GANTask(WGANGenerator(), WGANCritic(), critic_steps=0)
    with pytest.raises(ValueError, match="gradient_penalty must be >= 0"):
        GANTask(WGANGenerator(), WGANCritic(), gradient_penalty=-1.0)
    with pytest.raises(ValueError, match="the critic expects 3-channel"):
        GANTask(WGANGenerator(), WGANCritic(in_channels=3))
    with pytest.raises(ValueError, match="kl_weight and kl_warmup_epochs must be >= 0"):
        VAETask(ConvVAE(), kl_warmup_epochs=-1)


def _synthetic_override(tmp_path: Path, num_samples: int = 60, **trainer_settings: object) -> Path:
    """A config replacing the data by small synthetic MNIST-sized images and shortening the run."""
    override = {
        "trainer": tiny_trainer(**trainer_settings),
        "data": {
            "class_path": "cfx.data.SyntheticImages",
            "init_args": {"num_samples": num_samples, "image_size": 28, "batch_size": 16, "num_workers": 0},
        },
    }
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.parametrize("config", GENERATIVE_CONFIGS, ids=str)
def test_config_runs_through_the_cli_and_its_checkpoint_loads(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    override = _synthetic_override(tmp_path, limit_train_batches=2)
    cli = main(["fit", "-c", str(REPO / config), "-c", str(override), "--checkpoint.dirpath=ckpt"])
    assert int(cli.model.training_batches) == 2
    model = load_generative(tmp_path / "ckpt" / "last.ckpt")
    expected = {"gan": GAN, "vae": ConvVAE, "autoencoder": ConvAutoencoder}[config.parts[1]]
    assert isinstance(model, expected)
    assert list((tmp_path / "runs").rglob("epoch_000.png"))


def test_a_killed_gan_fit_resumed_from_last_ends_bit_identical(tmp_path):
    # 350 training images: 21 batches of 16 per epoch, so the kill lands well before the third epoch ends.
    override = _synthetic_override(tmp_path, num_samples=500, max_epochs=EPOCHS, limit_val_batches=0)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(folder: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cfx",
            "fit",
            "-c",
            "configs/gan/embedded_mnist.yaml",
            "-c",
            str(override),
            "--model.init_args.generator.init_args.latent_dim=8",
            "--model.init_args.gradient_penalty=1.0",
            f"--checkpoint.dirpath={folder}",
            f"--trainer.default_root_dir={folder}",
            f"--trainer.logger.init_args.save_dir={folder}",
            *extra,
        ]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = subprocess.run(command(straight), cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    kill_when(command(resumed), REPO, environment, (resumed / "last.ckpt").exists)
    assert torch.load(resumed / "last.ckpt", weights_only=False)["epoch"] < EPOCHS - 1
    result = subprocess.run(
        command(resumed, "--ckpt_path=last"), cwd=REPO, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = (torch.load(d / "last.ckpt", weights_only=False) for d in (straight, resumed))
    assert int(actual["state_dict"]["training_batches"]) == EPOCHS * 21
    for key in ("state_dict", "optimizer_states", "cfx_random_states", "epoch", "global_step"):
        _assert_identical(expected[key], actual[key], key)
