"""CounterfactualTask: run any explainer over a query DataModule in ``cfx test`` / ``cfx predict``.

``cfx test -c configs/counterfactual/embedded_mnist_deduce.yaml`` loads the classifier checkpoint, pairs every
test query with its targets, runs the explainer (batched), appends every batch to the result store
``<output_dir>/results.h5`` (every pair and the run's metadata, resumable; read it with
:func:`cfx.results.open_results`), and at the end writes ``metrics.json`` and ``grid.png`` (rows of query |
counterfactual | difference) from the store.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from cfx.counterfactual.base import Explainer, check_details
from cfx.counterfactual.vlk import ClassEncodings, load_prototypes
from cfx.io import atomic_write_text, file_facts
from cfx.metrics.functional.anogan import ANOGAN_KEYS, anogan_score, check_anogan_settings
from cfx.metrics.functional.counterfactual import (
    ORACLE_KEYS,
    PAIR_SCHEMA,
    PairInputs,
    feature_nll,
    measure_pairs,
    oracle_measures,
    record_keys,
)
from cfx.nn.attgan import AttGAN
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.gaussian import ClassGaussians
from cfx.nn.generative import GAN, ConvAutoencoder, ConvVAE
from cfx.results.pictures import store_grid
from cfx.results.store import (
    STORE_FILENAME,
    Results,
    StoreWriter,
    finish_store,
    is_sorted,
    merge_stores,
    metadata_differences,
    open_results,
    strict_json_summary,
)
from cfx.seeding import per_sample_seed
from cfx.tasks.base import CfxTask
from cfx.tasks.classification import check_data_matches, load_classifier
from cfx.tasks.ddu import load_classifier_and_gaussians
from cfx.tasks.dep import target_loss_quantiles
from cfx.tasks.generative import check_image_data_matches, load_generative
from cfx.tasks.prototypes import PROTOTYPES_FILENAME

SHARD_PATTERN = "results.rank*.h5"  # process r > 0 of a DDP run appends to results.rank{r}.h5, process 0 to results.h5
RESUME_IGNORES = (  # metadata a resumed run may change: where things are (their content hashes are compared)
    "task.output_dir",
    "task.grid_size",
    "task.overwrite",
    "task.classifier",
    "task.gaussians",
    "task.oracle",
    "task.realism",
    "task.generative",
    "classifier.path",
    "gaussians.path",
    "oracle.path",
    "realism.path",
    "generative.path",
    "prototypes.path",
    "explainer.init_args.gaussians",
    "explainer.init_args.vae",
    "explainer.init_args.autoencoder",
    "explainer.init_args.prototypes",
    "explainer.init_args.generator",
    "explainer.init_args.attgan",
    "cfx_version",
)


@dataclass(frozen=True)
class Auxiliary:
    """An explainer argument the task fills in: what it is and which task argument provides it.

    Attributes:
        needed: what the explainer needs, for "X needs ...".
        named: how "... named twice" names it.
        task_argument: the CounterfactualTask argument that provides it.
        hint: what to set that argument to.
    """

    needed: str
    named: str
    task_argument: str
    hint: str


AUXILIARIES = {  # explainer argument -> what the task hands it (see CounterfactualTask._build_explainer)
    "gaussians": Auxiliary(
        "class Gaussians",
        "the class Gaussians are",
        "gaussians",
        "the classifier's class_gaussians.pt (`cfx fit ... -c configs/ddu/fit_gaussians.yaml` writes it)",
    ),
    "vae": Auxiliary("a VAE", "the VAE is", "generative", "a VAETask checkpoint (`cfx fit -c configs/vae/...`)"),
    "autoencoder": Auxiliary(
        "an autoencoder",
        "the autoencoder is",
        "generative",
        "an AutoencoderTask checkpoint (`cfx fit -c configs/autoencoder/...`)",
    ),
    "prototypes": Auxiliary(
        "class prototypes",
        "the class prototypes are",
        "generative",
        f"an AutoencoderTask checkpoint with the class prototypes fitted for it ({PROTOTYPES_FILENAME}) beside it",
    ),
    "generator": Auxiliary(
        "a GAN generator", "the generator is", "generative", "a GANTask checkpoint (`cfx fit -c configs/gan/...`)"
    ),
    "attgan": Auxiliary(
        "an AttGAN", "the AttGAN is", "generative", "an AttGANTask checkpoint (`cfx fit -c configs/attgan/...`)"
    ),
    "attribute_table": Auxiliary(
        "an attribute table",
        "the attribute table is",
        "data",
        "a DataModule with attributes (e.g. `attributes: morphometric`), handed with an AttGAN",
    ),
}
GENERATIVE_AUXILIARIES = ("vae", "autoencoder", "prototypes", "generator", "attgan")
GENERATIVE_MODELS = {  # the model classes a `generative:` checkpoint may hold, and the task that trains each
    ConvVAE: "a VAETask",
    ConvAutoencoder: "an AutoencoderTask",
    GAN: "a GANTask",
    AttGAN: "an AttGANTask",
}


class ExplainerFactory(Protocol):
    """What builds the explainer: ``{class_path: ..., init_args: {...}}`` in YAML, or any callable in Python.

    The task calls it with the classifier, and with each auxiliary of :data:`AUXILIARIES` the explainer class
    takes as an argument: ``gaussians=`` (the task's class Gaussians), ``vae=``, ``autoencoder=`` or ``attgan=``
    (the model of the task's ``generative`` checkpoint), ``generator=`` (the generator of a GAN checkpoint),
    ``prototypes=`` (the class prototypes beside an autoencoder checkpoint) and ``attribute_table=`` (the data's
    ``attribute_table()``, with an AttGAN, when the data has attributes: handed at ``setup``, when the data is
    known). A config therefore never names them in the explainer (the CLI does not offer
    ``explainer.init_args.gaussians`` and the like).
    """

    def __call__(
        self,
        classifier: FeatureClassifier,
        /,
        gaussians: ClassGaussians | None = None,
        vae: nn.Module | None = None,
        autoencoder: nn.Module | None = None,
        prototypes: ClassEncodings | None = None,
        generator: nn.Module | None = None,
        attgan: AttGAN | None = None,
        attribute_table: Tensor | None = None,
    ) -> Explainer:
        """Build the explainer of ``classifier``."""


def random_targets(indices: Tensor, classes: Tensor, num_classes: int, seed: int) -> Tensor:
    """A target class for each query, uniform over the classes other than ``classes``, seeded by its dataset index.

    ``cfx.seeding.per_sample_seed(indices, seed)`` picks the target, so a query gets the same target in any
    batch, on any device and in any process.

    Args:
        indices: ``(N,)`` dataset indices.
        classes: ``(N,)`` the class each query must not get.
        num_classes: number of classes.
        seed: the run's seed.

    Returns:
        ``(N,)`` int64 targets, never equal to ``classes``.
    """
    offset = 1 + torch.remainder(per_sample_seed(indices, seed), num_classes - 1)
    return torch.remainder(classes.long() + offset, num_classes)


def _built_class(factory: ExplainerFactory) -> type | None:
    """The Explainer class ``factory`` builds: the class itself, or the class a ``functools.partial`` wraps.

    jsonargparse turns ``{class_path: ..., init_args: ...}`` into ``partial(instantiator, Class, **init_args)``.
    ``None`` for any other callable (its own business).
    """
    if isinstance(factory, type):
        return factory
    if isinstance(factory, functools.partial):
        return next(
            (item for item in (factory.func, *factory.args) if isinstance(item, type) and issubclass(item, Explainer)),
            None,
        )
    return None


class CounterfactualTask(CfxTask):
    """Explain a trained classifier's decisions on the queries of a DataModule (``test`` or ``predict``).

    Each query is paired with its targets; pairs whose target already is the classifier's prediction are
    dropped. The explainer runs with gradients enabled: the task declares ``inference_mode=False``, which the
    ``cfx`` command and ``setup`` apply to the Trainer (a plain ``L.Trainer()`` works). Each batch's per-pair
    record (``cfx.metrics.functional.counterfactual.measure_pairs``) is measured once and appended, with the
    images, to the process's result store (``results.h5`` for process 0, ``results.rank<r>.h5`` for the others),
    flushed before the next batch; rerunning the same run resumes it (pairs already stored are skipped). At the
    end process 0 merges the shards into ``<output_dir>/results.h5`` and writes ``metrics.json`` (the metric
    table of the whole store) and ``grid.png``, each atomically (the output folder must be shared by all
    processes).

    Args:
        classifier: path of the classifier's checkpoint (any task :func:`~cfx.tasks.load_classifier` reads).
        explainer: builds the explainer from the classifier; YAML ``{class_path: cfx.counterfactual.DeDUCE,
            init_args: {...}}`` without the classifier and without the Gaussians, which come from ``gaussians``
            (see :class:`ExplainerFactory`).
        targets: ``"others"`` (every class but the query's class: the DeDUCE protocol), ``"fixed"``
            (``target_class``), ``"mapping"`` (``target_mapping[query class]``; unmapped queries are skipped) or
            ``"random"`` (one class other than the query's, seeded by ``seed`` and the query's dataset index) or
            ``"own"`` (the query's class itself: prototypes, e.g. GenerativeIntrospection's ``kind: prototype``;
            the one mode whose pairs keep a target equal to the prediction).
        target_class: the target of ``"fixed"``.
        target_mapping: the class map of ``"mapping"``.
        query_class: what a query's class is: the classifier's ``"prediction"`` or the data's ``"label"``.
        seed: seed of the ``"random"`` targets.
        gaussians: path of class Gaussians of the classifier (``class_gaussians.pt``): adds the feature NLL of
            each counterfactual under its target class (realism), and an explainer that takes ``gaussians``
            (DeDUCE) is built with them.
        generative: path of a VAETask, AutoencoderTask, GANTask or AttGANTask checkpoint
            (:func:`~cfx.tasks.load_generative`) whose model fits the classifier's images: an explainer that takes
            ``vae`` (REVISE), ``autoencoder`` (VLK), ``generator`` (the GAN's generator: GenerativeIntrospection's
            latent mode) or ``attgan`` (its attribute mode) is built with it, one that takes ``prototypes`` (VLK)
            with the class prototypes in ``class_prototypes.pt`` beside the checkpoint
            (``cfx.counterfactual.vlk.load_prototypes``), and one that takes ``attribute_table`` together with an
            AttGAN gets the data's ``attribute_table()`` (each query's own attributes by dataset index) when the
            data has attributes; their names go into the results' metadata (``attribute_names``).
        output_dir: where the results go (default ``<trainer.default_root_dir>/counterfactual/<explainer class>``).
        max_queries: use only the first ``max_queries`` queries of the split (in split order; only they are
            loaded).
        grid_size: pairs shown in ``grid.png``.
        l0_tolerance: changes up to this size do not count for L0.
        concentration_threshold: pixel change that counts for the concentration box.
        oracle: path of an independent classifier's checkpoint (trained separately, e.g. ``configs/oracle/``; any
            task :func:`~cfx.tasks.load_classifier` reads) with the classifier's classes, channels and image size:
            adds its target probability, whether it predicts the target and its probability of the query's class
            (``oracle_*``) per pair, and ``oracle_validity`` (the transfer rate over the successful pairs: do the
            counterfactuals that fooled the classifier convince the oracle, or are they adversarial?),
            ``oracle_validity_all_pairs``, ``oracle_target_confidence`` and ``oracle_original_confidence`` to
            the metric table.
        realism: path of a GANTask checkpoint whose WGAN fits the classifier's images: adds the AnoGAN score
            (``cfx.metrics.functional.anogan.anogan_score``, lower = more realistic) of each counterfactual
            (``anogan``) and of its query (``query_anogan``) per pair, and their means over the successful pairs
            to the metric table. Computed per batch in float32 (rounding may differ in the last digits with the
            batch's make-up), each image's restarts seeded by its query's dataset index.
        realism_options: settings of ``anogan_score`` (``steps``, ``step_size``, ``decay_fraction``,
            ``decay_factor``, ``restarts``, ``feature_weight``, ``seed``; DeDUCE's by default), with ``realism``.
        overwrite: delete the results of an earlier run in ``output_dir`` and start over. Without it a run
            resumes a store made by the same configuration (same task arguments, explainer, classifier and
            auxiliary files by content) and refuses one made by another.
    """

    trainer_arguments = {"inference_mode": False}

    def __init__(
        self,
        classifier: str,
        explainer: ExplainerFactory,
        targets: Literal["others", "fixed", "mapping", "random", "own"] = "others",
        target_class: int | None = None,
        target_mapping: dict[int, int] | None = None,
        query_class: Literal["prediction", "label"] = "prediction",
        seed: int = 0,
        gaussians: str | None = None,
        output_dir: str | None = None,
        max_queries: int | None = None,
        grid_size: int = 16,
        l0_tolerance: float = 0.0,
        concentration_threshold: float = 0.05,
        oracle: str | None = None,
        realism: str | None = None,
        realism_options: dict[str, Any] | None = None,
        generative: str | None = None,
        overwrite: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["explainer"])
        if gaussians is None:
            self.network = load_classifier(classifier)
            self.gaussians = None
        else:
            self.network, self.gaussians = load_classifier_and_gaussians(classifier, gaussians)
        num_classes = self.network.num_classes
        self.target_table = self._target_table(targets, target_class, target_mapping, num_classes)
        if query_class not in ("prediction", "label"):
            raise ValueError(f"query_class must be 'prediction' or 'label', got {query_class!r}")
        if max_queries is not None and max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
        if grid_size < 0:
            raise ValueError(f"grid_size must be >= 0, got {grid_size}")
        if l0_tolerance < 0:
            raise ValueError(f"l0_tolerance must be >= 0, got {l0_tolerance}")
        if realism_options is not None and realism is None:
            raise ValueError("realism_options go with realism (a GANTask checkpoint); got no realism")
        self.realism_options = dict(realism_options or {})
        check_anogan_settings(self.realism_options)
        self.realism_model = None if realism is None else self._checked_model(realism, "realism", (GAN,))
        self.generative_model = (
            None if generative is None else self._checked_model(generative, "generative", tuple(GENERATIVE_MODELS))
        )
        self.files = {
            "classifier": file_facts(classifier),
            "gaussians": None if gaussians is None else file_facts(gaussians),
            "oracle": None if oracle is None else file_facts(oracle),
            "realism": None if realism is None else file_facts(realism),
            "generative": None if generative is None else file_facts(generative),
            "prototypes": None,  # set when the explainer takes them
        }
        self._factory = explainer
        self._attribute_table: Tensor | None = None  # the data's, handed at setup (see _data_auxiliaries)
        self._filled: dict[str, Any] = {}  # explainer arguments the task derives from the data at setup
        self.target_loss: list[float] | None = None  # DISC's s* per class when derived (target_loss="quantile")
        self.attribute_names: tuple[str, ...] = ()  # the names of the explainer's attributes, for the metadata
        self.explainer = self._build_explainer(explainer)
        self.targets, self.query_class, self.seed = targets, query_class, seed
        self.output_dir, self.max_queries, self.grid_size = output_dir, max_queries, grid_size
        self.l0_tolerance, self.concentration_threshold = l0_tolerance, concentration_threshold
        self.oracle_network = None if oracle is None else self._checked_oracle(load_classifier(oracle), oracle)
        optional = (
            *(("nll",) if gaussians is not None else ()),
            *(ORACLE_KEYS if oracle is not None else ()),
            *(ANOGAN_KEYS if realism is not None else ()),
        )
        self.record_keys = record_keys(optional)  # the store's per-pair columns
        self.overwrite = overwrite
        self._done = torch.zeros(0, dtype=torch.long)  # index * num_classes + target of every stored pair
        self._writer: StoreWriter | None = None
        self._progress: dict[str, float] = {}

    def _build_explainer(self, factory: ExplainerFactory) -> Explainer:
        """Call ``factory`` with the classifier and with each auxiliary (:data:`AUXILIARIES`) its explainer takes.

        An auxiliary the explainer takes comes from the task when the task has it (naming it in the explainer's
        config too is an error); without it the explainer's own argument or default applies, and an explainer
        that requires it is an error naming the task argument to set. A ``generative`` checkpoint no argument
        of the explainer takes is an error too.
        """
        explainer_class = _built_class(factory)
        parameters = {} if explainer_class is None else inspect.signature(explainer_class).parameters
        configured = factory.keywords if isinstance(factory, functools.partial) else {}
        handed = {}
        for name, auxiliary in AUXILIARIES.items():
            parameter = parameters.get(name)
            if parameter is None or (name == "attribute_table" and "attgan" not in handed):
                continue
            given = configured.get(name) is not None
            if self._has_auxiliary(name) and given:
                raise ValueError(
                    f"{auxiliary.named} named twice: set only the CounterfactualTask's `{auxiliary.task_argument}:` "
                    f"(it builds {explainer_class.__name__} with {'it' if auxiliary.named.endswith(' is') else 'them'})"
                    ", not the explainer's"
                )
            if self._has_auxiliary(name):
                handed[name] = self._auxiliary(name)
            elif not given and parameter.default is inspect.Parameter.empty:
                source = self.hparams.get(auxiliary.task_argument)
                holds = (
                    "" if source is None else f" (it is {source}, which holds a {type(self.generative_model).__name__})"
                )
                raise ValueError(
                    f"{explainer_class.__name__} needs {auxiliary.needed}: set the CounterfactualTask's "
                    f"`{auxiliary.task_argument}:` to {auxiliary.hint}{holds}"
                )
        if self.generative_model is not None and not set(handed) & set(GENERATIVE_AUXILIARIES):
            name = getattr(explainer_class, "__name__", "the explainer")
            raise ValueError(
                f"the CounterfactualTask's `generative:` is set ({self.hparams.generative}), but {name} takes none of "
                f"{list(GENERATIVE_AUXILIARIES)}: remove it, or choose an explainer that uses it (REVISE, VLK, "
                "GenerativeIntrospection)"
            )
        built = factory(self.network, **handed, **self._filled)
        self._handed = tuple(handed)
        if "attgan" in handed:
            self.attribute_names = tuple(self.generative_model.attribute_names)
        if not isinstance(built, Explainer):
            raise ValueError(
                f"explainer must build a cfx.counterfactual.Explainer from the classifier, got {type(built)}"
            )
        taken = sorted(set(built.detail_fields()) & {*PAIR_SCHEMA, "originals", "counterfactuals", "path"})
        if taken:
            raise ValueError(
                f"{type(built).__name__}'s details {taken} are named like per-pair record entries or images: a "
                "result store could not tell them apart"
            )
        return built

    @staticmethod
    def _target_table(
        targets: str, target_class: int | None, target_mapping: dict[int, int] | None, num_classes: int
    ) -> Tensor | None:
        """Check the target options; for ``fixed`` / ``mapping`` return the query class -> target lookup (-1 = none)."""
        if targets not in ("others", "fixed", "mapping", "random", "own"):
            raise ValueError(f"targets must be one of 'others', 'fixed', 'mapping', 'random', 'own', got {targets!r}")
        if (target_class is not None) != (targets == "fixed"):
            raise ValueError(f"target_class goes with targets='fixed' (and only then); got targets={targets!r}")
        if (target_mapping is not None) != (targets == "mapping"):
            raise ValueError(f"target_mapping goes with targets='mapping' (and only then); got targets={targets!r}")
        mapping = {c: target_class for c in range(num_classes)} if targets == "fixed" else target_mapping
        if mapping is None:
            return None
        classes = [int(c) for pair in mapping.items() for c in pair]
        if not mapping or min(classes) < 0 or max(classes) >= num_classes:
            raise ValueError(
                f"target classes must be classes 0..{num_classes - 1} of the classifier, got "
                f"{target_class if targets == 'fixed' else target_mapping}"
            )
        table = torch.full((num_classes,), -1, dtype=torch.long)
        table[torch.tensor([int(c) for c in mapping])] = torch.tensor([int(t) for t in mapping.values()])
        return table

    # -- pairs ------------------------------------------------------------------------------------------
    def make_pairs(self, indices: Tensor, classes: Tensor, predictions: Tensor) -> tuple[Tensor, Tensor]:
        """Expand queries into ``(query position, target)`` pairs; a target equal to the prediction is dropped.

        With ``targets="own"`` every query is paired with its own class (prototypes), nothing dropped.

        Args:
            indices: ``(N,)`` dataset indices of the queries.
            classes: ``(N,)`` each query's class (prediction or label, see ``query_class``).
            predictions: ``(N,)`` the classifier's predictions.

        Returns:
            ``(positions, targets)``, each ``(P,)`` int64.
        """
        num_classes = self.network.num_classes
        positions = torch.arange(len(indices), device=indices.device)
        if self.targets == "others":
            positions = positions.repeat_interleave(num_classes - 1)
            offsets = torch.arange(1, num_classes, device=indices.device).repeat(len(indices))
            targets = torch.remainder(classes[positions] + offsets, num_classes)
        elif self.targets == "random":
            targets = random_targets(indices, classes, num_classes, self.seed)
        elif self.targets == "own":
            return positions, classes.long()
        else:
            targets = self.target_table.to(classes.device)[classes]
        keep = (targets >= 0) & (targets != predictions[positions])
        return positions[keep], targets[keep]

    # -- hooks ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Apply the Trainer arguments (:class:`~cfx.tasks.CfxTask`), check the data, limit the queried split."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_classes"):
            check_data_matches(self.network, datamodule)
        for model in (self.realism_model, self.generative_model):
            if model is not None and hasattr(datamodule, "image_size"):
                check_image_data_matches(model, model.in_channels, datamodule)
        if "attgan" in self._handed and "attribute_table" in self._explainer_parameters():
            self._hand_attribute_table(datamodule)
        if getattr(self.explainer, "target_loss", None) == "quantile":
            self._fill_target_loss(datamodule)
        if self.max_queries is not None:
            if not hasattr(datamodule, "limit_split"):
                raise ValueError("max_queries needs a cfx ImageDataModule (it limits the split the queries come from)")
            datamodule.limit_split("test" if stage == "test" else datamodule.predict_split, self.max_queries)

    def _explainer_parameters(self) -> set[str]:
        explainer_class = _built_class(self._factory)
        return set() if explainer_class is None else set(inspect.signature(explainer_class).parameters)

    def _hand_attribute_table(self, datamodule: Any) -> None:
        """Rebuild the explainer with the data's attribute table (each query's own attributes by dataset index).

        Only when the data has attributes (non-empty ``attribute_names``); without them the explainer keeps its
        own start (GenerativeIntrospection: the AttGAN discriminator's attribute predictions).

        Raises:
            ValueError: the AttGAN was trained on attributes of other names than the data's.
        """
        names = tuple(getattr(datamodule, "attribute_names", ()) or ())
        if not names:
            rank_zero_info(
                f"{type(datamodule).__name__} has no attributes: {type(self.explainer).__name__} starts from the "
                "AttGAN discriminator's attribute predictions"
            )
            return
        trained_on = tuple(self.generative_model.attribute_names)
        if trained_on and trained_on != names:
            raise ValueError(
                f"the AttGAN {self.hparams.generative} was trained on the attributes {list(trained_on)}, the data "
                f"has {list(names)}"
            )
        self._attribute_table = datamodule.attribute_table()
        self.explainer = self._build_explainer(self._factory)
        self.attribute_names = names

    def _fill_target_loss(self, datamodule: Any) -> None:
        """Rebuild DISC with ``s*`` per class: its ``target_loss_quantile`` of the DEP predictor on real training data.

        Every process computes it from its share of the training split (gathered, so all get the one-process
        values); the values go into the metadata (``target_loss``), so a resumed run checks it derived the same.

        Raises:
            ValueError: without a cfx ImageDataModule to read the training split from.
        """
        if not hasattr(datamodule, "eval_dataloader"):
            raise ValueError(
                "target_loss='quantile' needs a cfx ImageDataModule (s* is read from the DEP predictor's values on its "
                "training split); give a number or a tensor of s* instead"
            )
        target_loss = target_loss_quantiles(
            self.network,
            datamodule.eval_dataloader("train"),
            self.explainer.target_loss_quantile,
            self.network.num_classes,
        )
        self._filled["target_loss"] = target_loss
        self.explainer = self._build_explainer(self._factory)
        self.target_loss = target_loss.tolist()
        rank_zero_info(
            f"DISC target loss s* per class (quantile {self.explainer.target_loss_quantile}): "
            + ", ".join(f"{value:.3f}" for value in self.target_loss)
        )

    def on_test_epoch_start(self) -> None:
        self._start()

    def on_predict_epoch_start(self) -> None:
        self._start()

    def configure_callbacks(self) -> list[Callback]:
        """The progress report (:class:`CounterfactualProgress`)."""
        return [CounterfactualProgress()]

    def _start(self) -> None:
        """Find the stores of an earlier run of this configuration (or clear them with ``overwrite``).

        Every process reads every store in the folder (the merged ``results.h5`` and each process's shard), so a
        pair stored by any process of any earlier run is skipped whatever the sharding of this run.
        """
        folder = self.results_dir()
        merged = folder / STORE_FILENAME
        if self.trainer.is_global_zero:
            shards = sorted(folder.glob(SHARD_PATTERN))
            if self.overwrite:
                for path in (merged, *shards):
                    path.unlink(missing_ok=True)
            elif shards and merged.is_file() and open_results(merged).finished:
                for path in shards:  # merged already: a kill landed between the merge and removing the shards
                    path.unlink()
        self.trainer.strategy.barrier("counterfactual_store_cleared")
        self._metadata = self.metadata()
        done = [torch.zeros(0, dtype=torch.long)]
        for path in [merged, *sorted(folder.glob(SHARD_PATTERN))]:
            if path.exists():
                stored = open_results(path)
                self._check_resumable(stored)
                done.append(stored["index"] * self.network.num_classes + stored["target"])
        self._done = torch.cat(done)
        self.trainer.strategy.barrier("counterfactual_store_read")  # before any process appends to its file
        self._writer = None
        self._progress = dict.fromkeys(("batches", "stored", "explained", "successes", "seconds"), 0)
        self._progress.update(stored=len(self._done), started=time.perf_counter())

    def _check_resumable(self, stored: Results) -> None:
        """Raise unless ``stored`` was made by this configuration (see ``overwrite``) and holds its details."""
        fields = self.explainer.detail_fields()
        if (stored.extra_fields or {}) != fields or (stored.extra_fields is None and stored.extra_keys):
            raise ValueError(
                f"{stored.path} stores the details {stored.extra_fields or list(stored.extra_keys)}, "
                f"{type(self.explainer).__name__} returns {fields}: set --model.overwrite=true to start over, or "
                "choose another model.output_dir"
            )
        differences = metadata_differences(stored.metadata, self._metadata, RESUME_IGNORES)
        if differences:
            shown = "; ".join(
                f"{key}: stored {_dotted(stored.metadata, key)!r}, now {_dotted(self._metadata, key)!r}"
                for key in differences[:5]
            )
            raise ValueError(
                f"{stored.path} holds the results of another run ({shown}"
                f"{'; ...' if len(differences) > 5 else ''}): set --model.overwrite=true to start over, or "
                "choose another model.output_dir"
            )

    def _store(self) -> StoreWriter:
        """This process's store (made on first use): ``results.h5`` for process 0, ``results.rank{r}.h5`` for r > 0."""
        if self._writer is None:
            rank = self.trainer.global_rank
            path = self.results_dir() / (STORE_FILENAME if rank == 0 else SHARD_PATTERN.replace("*", str(rank)))
            if path.exists():
                self._writer = StoreWriter.resume(path)
            else:
                self._writer = StoreWriter.create(
                    path, self._metadata, self.record_keys, self.explainer.detail_fields()
                )
        return self._writer

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._explain(batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._explain(batch)

    def _explain(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "CounterfactualTask needs gradients, but it runs inside torch.inference_mode(): call the Trainer "
                "outside of it (the task sets the Trainer's own inference_mode to False)"
            )
        images, labels, indices = batch["image"], batch["label"], batch["index"]
        with torch.no_grad():
            predictions = self.network(images).argmax(dim=1)
        positions, targets = self.make_pairs(
            indices, predictions if self.query_class == "prediction" else labels, predictions
        )
        stored = torch.isin(indices[positions] * self.network.num_classes + targets, self._done.to(targets.device))
        positions, targets = positions[~stored], targets[~stored]  # pairs an earlier run stored are not redone
        self._progress["batches"] += 1
        if len(positions) == 0:
            return {}
        originals = images[positions]
        if originals.is_cuda:
            torch.cuda.synchronize(originals.device)
        start = time.perf_counter()
        with torch.enable_grad():
            result = self.explainer.explain(originals, targets, indices[positions])
        if originals.is_cuda:
            torch.cuda.synchronize(originals.device)
        seconds = time.perf_counter() - start
        classes = (predictions if self.query_class == "prediction" else labels)[positions]
        measured = self._measure_counterfactuals(result.counterfactuals, targets, classes)
        inputs = PairInputs(originals, result.counterfactuals, seconds, self.l0_tolerance, self.concentration_threshold)
        given = {
            "index": indices[positions],
            "target": targets,
            "label": labels[positions],
            "original_prediction": predictions[positions],
            "success": result.success,
            "iterations": result.iterations,
            **measured,  # target_probability, + nll with Gaussians, + the oracle's entries with an oracle
        }
        if self.realism_model is not None:
            given.update(self._realism(result.counterfactuals, images, indices, positions))
        record = measure_pairs(inputs, given)  # every measure once per batch, stored with the images
        images = {"originals": originals, "counterfactuals": result.counterfactuals}
        if result.path is not None:
            images["path"] = result.path
        check_details(result.details, self.explainer.detail_fields(), len(targets), type(self.explainer).__name__)
        pairs = {key: value.detach().cpu() for key, value in {**record, **images}.items()}
        details = {key: value.detach().cpu() for key, value in result.details.items()}
        self._store().append({key: pairs[key] for key in record}, {key: pairs[key] for key in images}, details)
        pairs.update({f"detail/{key}": value for key, value in details.items()})
        self._progress["explained"] += len(positions)
        self._progress["successes"] += int(record["success"].sum())
        self._progress["seconds"] += seconds
        return pairs

    def _has_auxiliary(self, name: str) -> bool:
        """Whether the task can hand the explainer argument ``name`` (an entry of :data:`AUXILIARIES`)."""
        if name == "gaussians":
            return self.gaussians is not None
        if name == "attribute_table":
            return self._attribute_table is not None
        model = {"vae": ConvVAE, "generator": GAN, "attgan": AttGAN}.get(name, ConvAutoencoder)
        return isinstance(self.generative_model, model)  # an autoencoder: its encoder for VLK, its prototypes beside it

    def _auxiliary(self, name: str) -> Any:
        """The task's auxiliary for the explainer argument ``name``; the class prototypes are read here, once."""
        if name == "gaussians":
            return self.gaussians
        if name == "attribute_table":
            return self._attribute_table
        if name == "generator":
            return self.generative_model.generator
        if name == "prototypes":
            path = Path(self.hparams.generative).parent / PROTOTYPES_FILENAME
            prototypes = load_prototypes(path)
            self.files["prototypes"] = file_facts(path)
            return prototypes
        return self.generative_model

    def _checked_model(self, path: str, argument: str, expected: tuple[type, ...]) -> nn.Module:
        """The model of the checkpoint ``path`` (``load_generative``), after checking its class and its images."""
        model, network, problems = load_generative(path), self.network, []
        if not isinstance(model, expected):
            names = " or ".join(cls.__name__ for cls in expected)
            tasks = " or ".join(GENERATIVE_MODELS[cls] for cls in expected)
            raise ValueError(
                f"the CounterfactualTask's `{argument}:` must be the checkpoint of a {names} ({tasks}); {path} holds "
                f"a {type(model).__name__}"
            )
        if model.in_channels != network.in_channels:
            problems.append(f"it takes {model.in_channels} channel(s), the classifier {network.in_channels}")
        if network.image_size is not None and model.image_size != network.image_size:
            problems.append(f"it was built for {model.image_size} px, the classifier for {network.image_size} px")
        if problems:
            raise ValueError(
                f"the {argument} model {path} does not fit the classifier {self.hparams.classifier}: "
                + "; ".join(problems)
            )
        return model

    def _realism(
        self, counterfactuals: Tensor, images: Tensor, indices: Tensor, positions: Tensor
    ) -> dict[str, Tensor]:
        """The AnoGAN scores of the counterfactuals and of their queries (each query scored once), in one run.

        Args:
            counterfactuals: ``(P, C, H, W)`` the pairs' counterfactuals.
            images: ``(N, C, H, W)`` the batch's queries.
            indices: ``(N,)`` their dataset indices (seeding every image's restarts, the counterfactuals' too).
            positions: ``(P,)`` each pair's query position.

        Returns:
            ``anogan`` and ``query_anogan``, each ``(P,)`` float64 holding float32 values.
        """
        queries, pair_query = torch.unique(positions, return_inverse=True)
        scores = anogan_score(
            torch.cat([counterfactuals.float(), images[queries].float()]),
            torch.cat([indices[positions], indices[queries]]),
            self.realism_model.generator,
            self.realism_model.critic,
            **self.realism_options,
        ).double()
        pairs = len(positions)
        return {"anogan": scores[:pairs], "query_anogan": scores[pairs:][pair_query]}

    def _checked_oracle(self, oracle: FeatureClassifier, path: str) -> FeatureClassifier:
        """``oracle``, after checking that it classifies the classifier's classes from the same kind of images."""
        network, problems = self.network, []
        if oracle.num_classes != network.num_classes:
            problems.append(f"it outputs {oracle.num_classes} classes, the classifier {network.num_classes}")
        if oracle.in_channels != network.in_channels:
            problems.append(f"it expects {oracle.in_channels} channel(s), the classifier {network.in_channels}")
        if None not in (oracle.image_size, network.image_size) and oracle.image_size != network.image_size:
            problems.append(f"it was built for {oracle.image_size} px, the classifier for {network.image_size} px")
        if problems:
            raise ValueError(
                f"the oracle {path} does not fit the classifier {self.hparams.classifier}: "
                + "; ".join(problems)
                + " (an oracle is another classifier of the same classes and images, e.g. from configs/oracle/)"
            )
        return oracle

    @functools.cached_property
    def _float64_network(self) -> FeatureClassifier:
        """A float64 copy of the classifier, made on first use (on the task's device; not a registered submodule)."""
        return copy.deepcopy(self.network).to(torch.float64)

    @functools.cached_property
    def _float64_oracle(self) -> FeatureClassifier:
        """A float64 copy of the oracle, made on first use (on the task's device; not a registered submodule)."""
        return copy.deepcopy(self.oracle_network).to(torch.float64)

    def _measure_counterfactuals(self, counterfactuals: Tensor, targets: Tensor, classes: Tensor) -> dict[str, Tensor]:
        """The classifier's target probability and prediction, the feature NLL (with Gaussians), the oracle's measures.

        Each is evaluated by a float64 copy of its network and rounded to float32: a float32 forward pass
        rounds differently with the batch's size and the thread count, so a value would depend on which pairs
        shared its batch (and on the number of processes); in float64 that rounding lies far below float32's
        resolution, so each pair's value is the same on any split of the data.

        Args:
            counterfactuals: ``(P, C, H, W)`` the counterfactuals.
            targets: ``(P,)`` their targets.
            classes: ``(P,)`` their queries' classes (``query_class``), for ``oracle_original_probability``.

        Returns:
            ``target_probability`` and ``counterfactual_prediction``, plus ``nll`` with Gaussians and the entries of
            ``cfx.metrics.functional.counterfactual.oracle_measures`` with an oracle, each ``(P,)`` (floating
            entries float64 holding float32 values).
        """
        network = self._float64_network
        with torch.no_grad():
            features = network.forward_features(counterfactuals.to(torch.float64))[0]
            probabilities = network.classify(features).softmax(dim=1)
            measured = {
                "target_probability": probabilities.gather(1, targets[:, None]).squeeze(1),
                "counterfactual_prediction": probabilities.argmax(dim=1),
            }
            if self.gaussians is not None:
                measured["nll"] = feature_nll(features, targets, self.gaussians.to(features.device))
            if self.oracle_network is not None:
                oracle_probabilities = self._float64_oracle(counterfactuals.to(torch.float64)).softmax(dim=1)
                measured.update(oracle_measures(oracle_probabilities, targets, classes))
        return {key: value.float().double() if value.is_floating_point() else value for key, value in measured.items()}

    def on_test_epoch_end(self) -> None:
        summary = self._finish()
        for key, value in summary.items():  # equal on every process already: "max" just keeps it exact
            self.log(f"test/{key}", value, sync_dist=True, reduce_fx="max")

    def on_predict_epoch_end(self) -> None:
        self._finish()

    # -- results ----------------------------------------------------------------------------------------
    def results_dir(self) -> Path:
        """The folder the results are written to."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(self.trainer.default_root_dir) / "counterfactual" / type(self.explainer).__name__.lower()

    def _finish(self) -> dict[str, float]:
        """Merge the stores into a finished ``results.h5`` (process 0); the metric table of all its pairs.

        The metrics are recomputed from the whole store, pairs of earlier (killed) runs included, so a resumed run
        reports what an uninterrupted one reports. Every process returns the same table.
        """
        self.trainer.strategy.barrier("counterfactual_stores_written")
        summary = None
        if self.trainer.is_global_zero:
            results = self._merged_store(self.results_dir())
            summary = results.summary()
            self.write_results(results)
        return self.trainer.strategy.broadcast(summary, src=0)

    def _merged_store(self, folder: Path) -> Results:
        """``results.h5`` finished: every process's pairs sorted by ``(index, target)``; the shards removed."""
        merged, shards = folder / STORE_FILENAME, sorted(folder.glob(SHARD_PATTERN))
        if merged.exists() and not shards:
            results = open_results(merged)
            if results.finished:
                return results
            if is_sorted(results):
                finish_store(merged)
                return open_results(merged)
        if not merged.exists() and not shards:  # no process had a pair to explain
            StoreWriter.create(merged, self._metadata, self.record_keys, self.explainer.detail_fields())
            finish_store(merged)
            return open_results(merged)
        sources = [open_results(path) for path in ([merged] if merged.exists() else []) + shards]
        results = merge_stores(sources, merged, self._metadata)
        for path in shards:
            path.unlink()
        return results

    def metadata(self) -> dict[str, Any]:
        """What made the results (plain values, stored in ``results.h5`` and ``metrics.json``).

        Returns:
            ``explainer`` (its ``params``: class path and init arguments; an auxiliary the task built it with,
            ``init_args.gaussians``, ``vae``, ``autoencoder``, ``prototypes``, ``generator`` or ``attgan``, is the
            path of its file; the data's ``attribute_table`` is described by its shape), ``task`` (this task's init
            arguments), ``seed`` (the task's, seeding the random targets), ``global_seed`` (Lightning's
            ``seed_everything``, ``None`` if not seeded), ``cfx_version``, ``{"path", "sha256"}`` of each input
            file: ``classifier``, ``gaussians``, ``oracle``, ``realism``, ``generative`` and ``prototypes``
            (``None`` for those not used), and with an explainer of named attributes ``attribute_names`` (what the
            indices of its ``top_attributes`` detail name).
        """
        explainer = self.explainer.params
        for name in self._handed:
            if name != "attribute_table":
                file = self.files[name if name in ("gaussians", "prototypes") else "generative"]
                explainer["init_args"][name] = file["path"]
        named = {"attribute_names": list(self.attribute_names)} if self.attribute_names else {}
        if self.target_loss is not None:
            named["target_loss"] = self.target_loss
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            "explainer": explainer,
            "task": {key: value for key, value in self.hparams.items() if not key.startswith("_")},
            "seed": self.seed,
            "global_seed": None if global_seed is None else int(global_seed),
            "cfx_version": importlib.metadata.version("cfx"),
            **self.files,
            **named,
        }

    def write_results(self, results: Results) -> None:
        """Write ``metrics.json`` (the store's metric table and metadata) and ``grid.png`` next to the store."""
        folder = results.path.parent
        info = {
            "method": type(self.explainer).__name__,
            "classifier": str(self.hparams.classifier),
            "targets": self.targets,
            "metadata": results.metadata,
        }
        # strict JSON: a metric without successful pairs to average over (NaN) is written as null
        text = json.dumps({**info, "metrics": strict_json_summary(results.summary())}, indent=2, allow_nan=False)
        atomic_write_text(text + "\n", folder / "metrics.json")
        if self.grid_size and len(results):
            store_grid(results, folder / "grid.png", count=self.grid_size)


def _dotted(metadata: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of nested metadata (``"<absent>"`` where there is none)."""
    value: Any = json.loads(json.dumps(metadata))
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "<absent>"
        value = value[part]
    return value


def progress_line(progress: dict[str, float], batches_done: int, total_batches: float, now: float) -> dict[str, str]:
    """What :class:`CounterfactualProgress` shows: pairs done / total, validity so far, pairs per second, ETA.

    Args:
        progress: the task's counters: ``stored`` (pairs found from an earlier run), ``explained`` and
            ``successes`` (pairs explained by this run, and how many succeeded), ``started`` (the
            ``time.perf_counter()`` of the start).
        batches_done: query batches done by this process.
        total_batches: this process's query batches (``inf`` when unknown).
        now: the current ``time.perf_counter()``.

    Returns:
        ``pairs`` (``done/total``, the total extrapolated from the pairs per batch so far, ``?`` when unknown),
        ``validity`` (this run's), ``pairs/s`` and ``eta`` (``h:mm:ss``).
    """
    done = progress["stored"] + progress["explained"]
    finite = math.isfinite(total_batches) and batches_done > 0
    total = round(done * total_batches / batches_done) if finite else None
    elapsed = max(now - progress["started"], 1e-9)
    rate = progress["explained"] / elapsed
    remaining = elapsed * (total_batches - batches_done) / batches_done if finite else None
    validity = progress["successes"] / progress["explained"] if progress["explained"] else float("nan")
    eta = "?" if remaining is None else time.strftime("%H:%M:%S", time.gmtime(remaining))
    return {
        "pairs": f"{int(done)}/{'?' if total is None else total}",
        "validity": f"{validity:.3f}",
        "pairs/s": f"{rate:.2f}",
        "eta": eta,
    }


class CounterfactualProgress(Callback):
    """Progress of a :class:`CounterfactualTask` run (process 0's share): pairs, validity, pairs per second, ETA.

    With Lightning's progress bar on a terminal the numbers go into the bar; without a terminal or with
    ``CI=true`` one log line every ``every_n_batches`` batches. Nothing when the progress bar is disabled.

    Args:
        every_n_batches: batches between log lines.
    """

    def __init__(self, every_n_batches: int = 10):
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.every_n_batches = every_n_batches

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._show(trainer, pl_module, trainer.num_test_batches[dataloader_idx], batch_idx, "test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._show(trainer, pl_module, trainer.num_predict_batches[dataloader_idx], batch_idx, "predict")

    def _show(self, trainer, task: CounterfactualTask, total_batches: float, batch_idx: int, stage: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or not trainer.is_global_zero:
            return
        line = progress_line(task._progress, batch_idx + 1, total_batches, time.perf_counter())
        interactive = sys.stderr.isatty() and os.environ.get("CI", "").lower() != "true"
        tqdm_bar = getattr(bar, f"{stage}_progress_bar", None) if isinstance(bar, TQDMProgressBar) else None
        if interactive and tqdm_bar is not None:
            tqdm_bar.set_postfix(line, refresh=False)
        elif (batch_idx + 1) % self.every_n_batches == 0 or batch_idx + 1 == total_batches:
            rank_zero_info("counterfactuals: " + ", ".join(f"{key} {value}" for key, value in line.items()))
