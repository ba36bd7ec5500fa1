from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from cfx.cli import main
from cfx.data import SyntheticImages
from cfx.nn import SmallCNN
from cfx.tasks import ClassificationTask, load_classifier
from tests.config_helpers import tiny_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
TRAINER_ONLY = {"trainer"}

TINY = {
    "seed_everything": 0,
    "trainer": tiny_trainer(),
    "model": {
        "class_path": "cfx.tasks.ClassificationTask",
        "init_args": {
            "network": {"class_path": "cfx.nn.SmallCNN", "init_args": {"channels": [4, 8], "hidden": 16}},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    },
    "data": {
        "class_path": "cfx.data.SyntheticImages",
        "init_args": {"num_samples": 120, "batch_size": 16, "in_channels": 2},
    },
}


class CrashDuringEpoch(Callback):
    """Simulates a crash in the middle of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch: int = 2):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 2:
            raise RuntimeError("simulated crash")


class RecordStart(Callback):
    """Remembers the epoch and global step at which fitting (re)started."""

    def on_train_start(self, trainer, pl_module):
        self.start = (trainer.current_epoch, trainer.global_step)


def _write_config(tmp_path: Path, **overrides) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config.update(overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sections = set(yaml.safe_load(config.read_text()))
    base = [] if sections - TRAINER_ONLY else ["-c", str(REPO / "configs/classifier/embedded_mnist_sn_resnet.yaml")]
    subcommand = "test" if "counterfactual" in config.parts else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *base, "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("command", [["cfx"], [sys.executable, "-m", "cfx"]])
def test_help_works(command):
    executable = [str(Path(sys.executable).parent / "cfx")] if command == ["cfx"] else command
    result = subprocess.run([*executable, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "test" in result.stdout


def test_cfx_command_exits_with_status_zero_after_a_run(tmp_path):
    config = _write_config(tmp_path)
    executable = Path(sys.executable).parent / "cfx"
    result = subprocess.run(
        [str(executable), "fit", "-c", str(config), "--checkpoint.dirpath=ckpt"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_fit_links_data_facts_writes_last_checkpoint_and_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", str(_write_config(tmp_path)), "--checkpoint.dirpath=ckpt"])
    network = cli.model.network
    assert (network.in_channels, network.num_classes) == (2, 3)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    loaded = load_classifier(tmp_path / "ckpt" / "last.ckpt")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(4, 2, 16, 16)
    assert torch.allclose(loaded(images), network.eval()(images), atol=1e-6)
    test = main(["test", "-c", str(_write_config(tmp_path)), "--ckpt_path=ckpt/last.ckpt"])
    assert 0 <= test.trainer.callback_metrics["test/acc"] <= 1


def test_interrupted_fit_resumes_from_the_saved_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _write_config(tmp_path, trainer={**TINY["trainer"], "max_epochs": 4})
    crash = ["--trainer.callbacks+=tests.test_cli.CrashDuringEpoch", "--trainer.callbacks.epoch=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", "-c", str(config), "--checkpoint.dirpath=ckpt", *crash])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 1
    cli = main(
        [
            "fit",
            "-c",
            str(config),
            "--checkpoint.dirpath=ckpt",
            "--ckpt_path=last",
            "--trainer.callbacks+=tests.test_cli.RecordStart",
        ]
    )
    steps_per_epoch = saved["global_step"] // 2
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordStart))
    assert recorder.start == (2, 2 * steps_per_epoch)
    assert cli.trainer.current_epoch == 4 and cli.trainer.global_step == 4 * steps_per_epoch


def test_data_not_matching_the_network_is_a_clear_error():
    task = ClassificationTask(SmallCNN(in_channels=3, num_classes=3, image_size=32))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match=r"1 channel\(s\), the network expects 3.*16 px, the network was built for 32"):
        trainer.fit(task, SyntheticImages(num_samples=30, num_classes=3, in_channels=1, image_size=16))


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_classifier(tmp_path / "absent.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_classifier(tmp_path / "corrupt.ckpt")


def test_help_starts_with_what_cfx_is_and_version_prints_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    usage, description = help_text.split("\n\n")[:2]
    assert usage.startswith("usage: cfx ") and description == "cfx: counterfactual explanations of image classifiers."
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"cfx {importlib.metadata.version('cfx')}\n"


@pytest.fixture(scope="module")
def cli_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A ClassificationTask and a DEPTask checkpoint written by `cfx fit` (1 epoch each)."""
    folder = tmp_path_factory.mktemp("cli_checkpoints")
    paths = {}
    for name, task in (("classification", "cfx.tasks.ClassificationTask"), ("dep", "cfx.tasks.DEPTask")):
        config = yaml.safe_load(yaml.safe_dump(TINY))
        config["model"]["class_path"] = task
        config["trainer"]["default_root_dir"] = str(folder / name)
        config["trainer"]["logger"] = False
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        main(["fit", "-c", str(path), f"--checkpoint.dirpath={folder / name}"])
        paths[name] = folder / name / "last.ckpt"
    paths["config"] = folder / "classification.yaml"
    return paths


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", r"no checkpoint at .*absent\.ckpt"),
        ("empty", r"empty\.ckpt is empty \(0 bytes\), expected a Lightning \.ckpt"),
        ("truncated", r"truncated\.ckpt is not a readable checkpoint, expected a Lightning \.ckpt"),
        (
            "other task",
            r"dep/last\.ckpt is a checkpoint of cfx\.tasks\..*DEPTask, the config's model is .*ClassificationTask",
        ),
    ],
)
def test_bad_ckpt_path_is_one_line_naming_the_file(cli_checkpoints, tmp_path, capsys, case, expected):
    real = cli_checkpoints["classification"].read_bytes()
    paths = {
        "missing": tmp_path / "absent.ckpt",
        "empty": tmp_path / "empty.ckpt",
        "truncated": tmp_path / "truncated.ckpt",
        "other task": cli_checkpoints["dep"],
    }
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(real[: len(real) // 2])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", str(cli_checkpoints["config"]), f"--ckpt_path={paths[case]}"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(expected, last_line), last_line
    assert "Traceback" not in last_line


def test_the_real_checkpoint_of_the_configured_task_runs(cli_checkpoints, tmp_path):
    checkpoint = cli_checkpoints["classification"]
    cli = main(
        [
            "test",
            "-c",
            str(cli_checkpoints["config"]),
            f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert 0 <= cli.trainer.callback_metrics["test/acc"] <= 1
