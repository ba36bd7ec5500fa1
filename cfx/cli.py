"""The ``cfx`` command: one LightningCLI in subclass mode for every task and DataModule."""

from __future__ import annotations

import lightning as L
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cfx.data.base import ImageDataModule

DATA_FACTS = ("in_channels", "num_classes", "image_size")


def data_facts(data_config: Namespace) -> dict[str, int]:
    """Instantiate the DataModule of a parsed ``data`` config and read its facts (no data is loaded).

    Args:
        data_config: the ``data`` section (``class_path`` + ``init_args``) of a parsed cfx config.

    Returns:
        ``{"in_channels": ..., "num_classes": ..., "image_size": ...}``.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ImageDataModule, "data")
    datamodule = parser.instantiate_classes(Namespace(data=data_config)).data
    return {fact: getattr(datamodule, fact) for fact in DATA_FACTS}


class CfxCLI(LightningCLI):
    """LightningCLI that writes the data facts into the task's network and checkpoints every epoch to last.ckpt.

    Every task that trains a network takes it as the init argument ``network``; its ``in_channels``,
    ``num_classes`` and ``image_size`` are set from the DataModule before anything is instantiated, so a
    config never repeats them (and they are saved in the checkpoint's hyper-parameters).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                # Every epoch overwrites <dirpath>/last.ckpt, which `--ckpt_path last` resumes from. (With a
                # monitor, Lightning would refresh last.ckpt only in epochs that improve the monitored value.)
                "checkpoint.dirpath": "checkpoints/default",
                "checkpoint.filename": "last",
                "checkpoint.monitor": None,
                "checkpoint.save_top_k": 1,
                "checkpoint.enable_version_counter": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        network = config.model.init_args.get("network") if config.model.get("init_args") else None
        if isinstance(network, Namespace) and "class_path" in network:
            for fact, value in data_facts(config.data).items():
                network.init_args[fact] = value


def main(args: list[str] | None = None, run: bool = True) -> CfxCLI:
    """Run the ``cfx`` command line (``args`` defaults to ``sys.argv[1:]``).

    Args:
        args: command-line arguments, e.g. ``["fit", "-c", "configs/classifier/embedded_mnist_sn_resnet.yaml"]``.
        run: run the subcommand; with ``False`` the arguments take no subcommand and only the objects are built.

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` are there for inspection).
    """
    return CfxCLI(
        L.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        trainer_defaults={
            "default_root_dir": "runs",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs"},
            },
        },
        auto_configure_optimizers=False,
    )


def run() -> None:
    """Console entry point of ``cfx`` and ``python -m cfx`` (exits with status 0 on success)."""
    main()
