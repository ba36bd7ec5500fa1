"""The ``cfx`` command: one LightningCLI in subclass mode for every task and DataModule."""

from __future__ import annotations

import importlib.metadata
import sys

import lightning as L
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import import_object
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cfx.data.base import ImageDataModule
from cfx.tasks.base import CfxTask
from cfx.tasks.classification import read_checkpoint

DATA_FACTS = ("in_channels", "num_classes", "image_size")
LIGHTNING_CKPT_PATHS = ("last", "best", "hpc")
DESCRIPTION = "cfx: counterfactual explanations of image classifiers."
EPILOG = (
    "`cfx report RUN_DIR [RUN_DIR ...] --output DIR` (also `cfx-report`) writes an HTML report of counterfactual runs."
)


def _import(class_path: str) -> object:
    try:
        return import_object(class_path)
    except (ImportError, AttributeError, ValueError):
        return None


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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """Lightning's parsers, with cfx's one-line description in ``cfx --help`` and ``cfx --version``."""
        super().setup_parser(
            add_subcommands,
            {"prog": "cfx", "description": DESCRIPTION, "epilog": EPILOG, **main_kwargs},
            subparser_kwargs,
        )
        self.parser.add_argument(
            "--version", action="version", version=f"cfx {importlib.metadata.version('cfx')}", help="Print the version."
        )

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

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything is built, then take the model config from the checkpoint.

        A missing, empty, truncated or unreadable file, or a checkpoint of a task other than the config's, ends
        the command with one line naming the file and what was expected (exit status 2). Lightning's special
        values (``last``, ``best``, ...) are left to Lightning.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_PATHS or str(ckpt_path).startswith("registry"):
            return
        try:
            # weights_only, like the Trainer that reads it next
            payload = read_checkpoint(ckpt_path, weights_only=True)
        except (FileNotFoundError, ValueError) as error:
            self.parser.error(f"--ckpt_path: {error}")
        hyper_parameters = dict(payload.get("hyper_parameters") or {})
        hyper_parameters.pop("_instantiator", None)
        written_by = hyper_parameters.pop("_class_path", None)
        configured = self.config[subcommand].model.get("class_path")
        if written_by is not None and configured is not None and _import(written_by) is not _import(configured):
            self.parser.error(
                f"--ckpt_path: {ckpt_path} is a checkpoint of {written_by}, the config's model is {configured}"
            )
        if written_by is not None and hyper_parameters:
            model = {"class_path": written_by, "dict_kwargs": hyper_parameters}
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        network = config.model.init_args.get("network") if config.model.get("init_args") else None
        if isinstance(network, Namespace) and "class_path" in network:
            for fact, value in data_facts(config.data).items():
                network.init_args[fact] = value
        self._apply_trainer_arguments(config)

    def _apply_trainer_arguments(self, config: Namespace) -> None:
        """Write the task's declared ``trainer_arguments`` into the Trainer config (they replace its values)."""
        task_class = import_object(config.model.class_path)
        if isinstance(task_class, type) and issubclass(task_class, CfxTask):
            for name, value in task_class.trainer_arguments.items():
                config.trainer[name] = value


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
    """Console entry point of ``cfx`` and ``python -m cfx`` (exits with status 0 on success).

    ``cfx report ...`` is ``cfx-report ...`` (:func:`cfx.results.report.main`), handled before LightningCLI.
    """
    if sys.argv[1:2] == ["report"]:
        from cfx.results.report import main as report_main  # only the report needs matplotlib

        report_main(sys.argv[2:])
        return
    main()
