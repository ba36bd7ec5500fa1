from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn

from cfx.cli import main
from cfx.data import SyntheticImages
from cfx.tasks import CfxTask


class GradientTask(CfxTask):
    """Needs gradients in ``test``: records the input gradient of a linear map (its weight, a hand value)."""

    trainer_arguments = {"inference_mode": False}

    def __init__(self, scale: float = 3.0):
        super().__init__()
        self.save_hyperparameters()
        self.weight = nn.Parameter(torch.full((1,), scale))
        self.gradients: list[Tensor] = []

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.enable_grad():
            images = batch["image"].clone().requires_grad_(True)
            (self.weight * images).sum().backward()
        self.gradients.append(images.grad)


def _data() -> SyntheticImages:
    return SyntheticImages(num_samples=30, batch_size=8, image_size=4)


def test_a_plain_trainer_gets_the_declared_inference_mode():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.test_loop.inference_mode  # Lightning's default, which the task cannot run with
    task = GradientTask()
    trainer.test(task, _data(), verbose=False)
    assert not trainer.test_loop.inference_mode and not trainer.predict_loop.inference_mode
    gradients = torch.cat(task.gradients)
    assert len(gradients) > 0
    torch.testing.assert_close(gradients, torch.full_like(gradients, 3.0))


def test_the_cli_writes_the_declared_inference_mode_into_the_trainer_config(tmp_path: Path):
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {"class_path": "tests.test_task_base.GradientTask", "init_args": {"scale": 2.0}},
        "data": {"class_path": "cfx.data.SyntheticImages", "init_args": {"num_samples": 30, "image_size": 4}},
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["test", "-c", str(path)])
    assert cli.config.test.trainer.inference_mode is False
    gradients = torch.cat(cli.model.gradients)
    torch.testing.assert_close(gradients, torch.full_like(gradients, 2.0))


def test_a_task_declaring_an_unappliable_trainer_argument_is_refused():
    with pytest.raises(TypeError, match=r"declares \['max_epochs'\].*only \['inference_mode'\]"):

        class _Impossible(CfxTask):
            trainer_arguments = {"max_epochs": 1}


def test_checkpoints_of_python_built_tasks_name_their_class(tmp_path: Path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.test(GradientTask(), _data(), verbose=False)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    hyper_parameters = torch.load(tmp_path / "task.ckpt", weights_only=True)["hyper_parameters"]
    assert hyper_parameters == {"scale": 3.0, "_class_path": "tests.test_task_base.GradientTask"}
