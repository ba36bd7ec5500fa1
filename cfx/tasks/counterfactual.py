"""CounterfactualTask: run any explainer over a query DataModule in ``cfx test`` / ``cfx predict``.

``cfx test -c configs/counterfactual/embedded_mnist_deduce.yaml`` loads the classifier checkpoint, pairs every
test query with its targets, runs the explainer (batched), logs the metric table and writes, under
``output_dir``, ``counterfactuals.pt`` (every pair and the run's metadata; read it with
:func:`load_counterfactual_results`), ``metrics.json`` and ``grid.png`` (rows of query | counterfactual |
difference).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torchvision.utils import save_image

from cfx.counterfactual.base import Explainer
from cfx.io import atomic_path, atomic_torch_save, atomic_write_text, file_sha256
from cfx.metrics.counterfactual import CounterfactualMetrics
from cfx.metrics.functional.counterfactual import (
    PairInputs,
    empty_record,
    feature_nll,
    measure_pairs,
    record_keys,
    sort_record,
)
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.gaussian import ClassGaussians
from cfx.seeding import per_sample_seed
from cfx.tasks.base import CfxTask
from cfx.tasks.classification import check_data_matches, load_classifier
from cfx.tasks.ddu import load_classifier_and_gaussians

RESULTS_FORMAT = "cfx.CounterfactualResults"
RESULTS_FILENAME = "counterfactuals.pt"
IMAGE_KEYS = ("originals", "counterfactuals")


class ExplainerFactory(Protocol):
    """What builds the explainer: ``{class_path: ..., init_args: {...}}`` in YAML, or any callable in Python.

    The task calls it with the classifier, and with ``gaussians=`` (its loaded class Gaussians) when the
    explainer class takes a ``gaussians`` argument; a config therefore never names the Gaussians in the
    explainer (the CLI does not offer ``explainer.init_args.gaussians``).
    """

    def __call__(self, classifier: FeatureClassifier, /, gaussians: ClassGaussians | None = None) -> Explainer:
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


def frame_failures(counterfactuals: Tensor, success: Tensor) -> Tensor:
    """RGB copies of ``counterfactuals`` (``(N, C, H, W)``, C = 1 or 3), a red one-pixel frame where not ``success``.

    A failed search returns its last iterate, which looks like a counterfactual: the frame tells them apart in a grid.
    """
    rgb = counterfactuals.float().expand(-1, 3, -1, -1)
    frame = torch.zeros(rgb.shape[-2:], dtype=torch.bool, device=rgb.device)
    frame[[0, -1], :] = True
    frame[:, [0, -1]] = True
    red = torch.tensor([1.0, 0.0, 0.0], device=rgb.device).view(1, 3, 1, 1)
    return torch.where(~success.bool().view(-1, 1, 1, 1) & frame, red, rgb)


def load_counterfactual_results(path: str | Path) -> dict[str, Any]:
    """Read a ``counterfactuals.pt`` written by :class:`CounterfactualTask`.

    Returns:
        A dict with one entry per pair in every tensor of the record schema
        (``cfx.metrics.functional.counterfactual.PAIR_SCHEMA``; ``nll`` when realism was measured), in
        ``originals`` and ``counterfactuals`` (and ``path``, ``(P, K, C, H, W)``, when the explainer recorded one),
        ordered by ``(index, target)``; ``summary`` (the metric table), ``method``, ``classifier`` and
        ``metadata`` (what made the results: see :meth:`CounterfactualTask.metadata`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable, not a counterfactual results file, or inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no counterfactual results at {path.resolve()} (write them with `cfx test -c configs/counterfactual/...`)"
        )
    try:
        results = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable counterfactual results file ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f"{path} is not a counterfactual results file (expected a dict with format {RESULTS_FORMAT!r})"
        )
    keys = (*record_keys(), *IMAGE_KEYS, *(("path",) if "path" in results else ()))
    missing = [key for key in keys if not isinstance(results.get(key), Tensor)]
    missing += [key for key in ("summary", "metadata") if not isinstance(results.get(key), dict)]
    lengths = {len(results[key]) for key in keys if key not in missing}
    if missing or len(lengths) > 1:
        raise ValueError(f"{path} is incomplete: missing {missing}, per-pair lengths {sorted(lengths)}")
    return results


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


def _file_facts(path: str | Path) -> dict[str, str]:
    """``{"path": ..., "sha256": ...}`` of an input file, as the results record it."""
    return {"path": str(path), "sha256": file_sha256(path)}


class CounterfactualTask(CfxTask):
    """Explain a trained classifier's decisions on the queries of a DataModule (``test`` or ``predict``).

    Each query is paired with its targets; pairs whose target already is the classifier's prediction are
    dropped. The explainer runs with gradients enabled: the task declares ``inference_mode=False``, which the
    ``cfx`` command and ``setup`` apply to the Trainer (a plain ``L.Trainer()`` works). Each batch's per-pair
    record (``cfx.metrics.functional.counterfactual.measure_pairs``) is measured once and goes both to the
    metrics (:class:`~cfx.metrics.CounterfactualMetrics`, gathered over all processes) and to the process's
    shard; process 0 merges the shards into ``<output_dir>/counterfactuals.pt``, ``metrics.json`` and
    ``grid.png``, each written atomically (the output folder must be shared by all processes).

    Args:
        classifier: path of the classifier's checkpoint (any task :func:`~cfx.tasks.load_classifier` reads).
        explainer: builds the explainer from the classifier; YAML ``{class_path: cfx.counterfactual.DeDUCE,
            init_args: {...}}`` without the classifier and without the Gaussians, which come from ``gaussians``
            (see :class:`ExplainerFactory`).
        targets: ``"others"`` (every class but the query's class: the DeDUCE protocol), ``"fixed"``
            (``target_class``), ``"mapping"`` (``target_mapping[query class]``; unmapped queries are skipped) or
            ``"random"`` (one class other than the query's, seeded by ``seed`` and the query's dataset index).
        target_class: the target of ``"fixed"``.
        target_mapping: the class map of ``"mapping"``.
        query_class: what a query's class is: the classifier's ``"prediction"`` or the data's ``"label"``.
        seed: seed of the ``"random"`` targets.
        gaussians: path of class Gaussians of the classifier (``class_gaussians.pt``): adds the feature NLL of
            each counterfactual under its target class (realism), and an explainer that takes ``gaussians``
            (DeDUCE) is built with them.
        output_dir: where the results go (default ``<trainer.default_root_dir>/counterfactual/<explainer class>``).
        max_queries: use only the first ``max_queries`` queries of the split (in split order; only they are
            loaded).
        grid_size: pairs shown in ``grid.png``.
        l0_tolerance: changes up to this size do not count for L0.
        concentration_threshold: pixel change that counts for the concentration box.
    """

    trainer_arguments = {"inference_mode": False}

    def __init__(
        self,
        classifier: str,
        explainer: ExplainerFactory,
        targets: Literal["others", "fixed", "mapping", "random"] = "others",
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
        self.explainer = self._build_explainer(explainer)
        self.targets, self.query_class, self.seed = targets, query_class, seed
        self.output_dir, self.max_queries, self.grid_size = output_dir, max_queries, grid_size
        self.l0_tolerance, self.concentration_threshold = l0_tolerance, concentration_threshold
        self.metrics = CounterfactualMetrics(realism=gaussians is not None)
        self.files = {
            "classifier": _file_facts(classifier),
            "gaussians": None if gaussians is None else _file_facts(gaussians),
        }
        self.pairs: list[dict[str, Tensor]] = []

    def _build_explainer(self, factory: ExplainerFactory) -> Explainer:
        """Call ``factory`` with the classifier, and with the task's Gaussians when its explainer takes them."""
        explainer_class = _built_class(factory)
        parameter = None if explainer_class is None else inspect.signature(explainer_class).parameters.get("gaussians")
        configured = factory.keywords.get("gaussians") if isinstance(factory, functools.partial) else None
        if parameter is not None and configured is None and self.gaussians is not None:
            built = factory(self.network, gaussians=self.gaussians)
        elif parameter is not None and configured is None and parameter.default is inspect.Parameter.empty:
            raise ValueError(
                f"{explainer_class.__name__} needs class Gaussians: set the CounterfactualTask's `gaussians:` to "
                "the classifier's class_gaussians.pt (`cfx fit ... -c configs/ddu/fit_gaussians.yaml` writes it)"
            )
        elif parameter is not None and configured is not None and self.gaussians is not None:
            raise ValueError(
                f"the class Gaussians are named twice: set only the CounterfactualTask's `gaussians:` (it builds "
                f"{explainer_class.__name__} with them), not the explainer's"
            )
        else:
            built = factory(self.network)
        if not isinstance(built, Explainer):
            raise ValueError(
                f"explainer must build a cfx.counterfactual.Explainer from the classifier, got {type(built)}"
            )
        return built

    @staticmethod
    def _target_table(
        targets: str, target_class: int | None, target_mapping: dict[int, int] | None, num_classes: int
    ) -> Tensor | None:
        """Check the target options; for ``fixed`` / ``mapping`` return the query class -> target lookup (-1 = none)."""
        if targets not in ("others", "fixed", "mapping", "random"):
            raise ValueError(f"targets must be one of 'others', 'fixed', 'mapping', 'random', got {targets!r}")
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
        if self.max_queries is not None:
            if not hasattr(datamodule, "limit_split"):
                raise ValueError("max_queries needs a cfx ImageDataModule (it limits the split the queries come from)")
            datamodule.limit_split("test" if stage == "test" else datamodule.predict_split, self.max_queries)

    def on_test_epoch_start(self) -> None:
        self._start()

    def on_predict_epoch_start(self) -> None:
        self._start()

    def _start(self) -> None:
        self.metrics.reset()
        self.pairs = []

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
        target_probability, nll = self._measure_counterfactuals(result.counterfactuals, targets)
        inputs = PairInputs(originals, result.counterfactuals, seconds, self.l0_tolerance, self.concentration_threshold)
        given = {
            "index": indices[positions],
            "target": targets,
            "label": labels[positions],
            "original_prediction": predictions[positions],
            "success": result.success,
            "target_probability": target_probability,
            "iterations": result.iterations,
            **({"nll": nll} if nll is not None else {}),
        }
        record = measure_pairs(inputs, given)  # every measure once per batch: for the metrics and the results
        self.metrics.update(record)
        images = {"originals": originals, "counterfactuals": result.counterfactuals}
        if result.path is not None:
            images["path"] = result.path
        pairs = {key: value.detach().cpu() for key, value in {**record, **images}.items()}
        self.pairs.append(pairs)
        return pairs

    @functools.cached_property
    def _float64_network(self) -> FeatureClassifier:
        """A float64 copy of the classifier, made on first use (on the task's device; not a registered submodule)."""
        return copy.deepcopy(self.network).to(torch.float64)

    def _measure_counterfactuals(self, counterfactuals: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """The classifier's target probability and (with Gaussians) the feature NLL of each counterfactual.

        Both are evaluated by a float64 copy of the classifier and rounded to float32: a float32 forward pass
        rounds differently with the batch's size and the thread count, so a value would depend on which pairs
        shared its batch (and on the number of processes); in float64 that rounding lies far below float32's
        resolution, so each pair's value is the same on any split of the data.

        Returns:
            ``(target_probability, nll)``, each ``(P,)`` float64 holding float32 values (``nll`` ``None`` without
            Gaussians).
        """
        network = self._float64_network
        with torch.no_grad():
            features = network.forward_features(counterfactuals.to(torch.float64))[0]
            probabilities = network.classify(features).softmax(dim=1)
            target_probability = probabilities.gather(1, targets[:, None]).squeeze(1).float().double()
            nll = None
            if self.gaussians is not None:
                nll = feature_nll(features, targets, self.gaussians.to(features.device)).float().double()
        return target_probability, nll

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
        """Compute the metrics over all processes, merge the per-process pairs and write the result files."""
        summary = {key: float(value) for key, value in self.metrics.compute().items()}
        folder = self.results_dir()
        shards = folder / ".shards"
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        if self.trainer.is_global_zero:
            shutil.rmtree(shards, ignore_errors=True)
        self.trainer.strategy.barrier("counterfactual_shards_cleared")
        atomic_torch_save(self._local_pairs(), shards / f"rank{rank}.pt")
        self.trainer.strategy.barrier("counterfactual_shards_written")
        if self.trainer.is_global_zero:
            parts = [torch.load(shards / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
            parts = [part for part in parts if len(part["index"])] or parts[:1]
            merged = sort_record({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
            self.write_results(folder, merged, summary)
            shutil.rmtree(shards, ignore_errors=True)
        self.trainer.strategy.barrier("counterfactual_results_written")
        return summary

    def _local_pairs(self) -> dict[str, Tensor]:
        """This process's pairs; without any, the schema's empty record and empty images (no ``path``)."""
        if self.pairs:
            return {key: torch.cat([pairs[key] for pairs in self.pairs]) for key in self.pairs[0]}
        channels, size = self.network.in_channels, self.network.image_size or 0
        empty = empty_record(("nll",) if self.metrics.realism else ())
        empty.update({key: torch.zeros(0, channels, size, size) for key in IMAGE_KEYS})
        return empty

    def metadata(self) -> dict[str, Any]:
        """What made the results (plain values, stored in ``counterfactuals.pt`` and ``metrics.json``).

        Returns:
            ``explainer`` (its ``params``: class path and init arguments; ``init_args.gaussians`` is the task's
            Gaussians path when the task built it with them), ``task`` (this task's init arguments),
            ``seed`` (the task's, seeding the random targets), ``global_seed`` (Lightning's ``seed_everything``,
            ``None`` if not seeded), ``cfx_version``, ``classifier`` and ``gaussians`` (``{"path", "sha256"}``,
            ``gaussians`` ``None`` without them).
        """
        explainer = self.explainer.params
        if self.files["gaussians"] is not None and "gaussians" in explainer["init_args"]:
            explainer["init_args"]["gaussians"] = self.files["gaussians"]["path"]
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            "explainer": explainer,
            "task": {key: value for key, value in self.hparams.items() if not key.startswith("_")},
            "seed": self.seed,
            "global_seed": None if global_seed is None else int(global_seed),
            "cfx_version": importlib.metadata.version("cfx"),
            **self.files,
        }

    def write_results(self, folder: Path, pairs: dict[str, Tensor], summary: dict[str, float]) -> None:
        """Write ``counterfactuals.pt``, ``metrics.json`` and ``grid.png`` into ``folder``, each atomically."""
        method = type(self.explainer).__name__
        classifier = str(self.hparams.classifier)
        info = {"method": method, "classifier": classifier, "targets": self.targets, "metadata": self.metadata()}
        atomic_torch_save({"format": RESULTS_FORMAT, **info, "summary": summary, **pairs}, folder / RESULTS_FILENAME)
        # strict JSON: a metric without successful pairs to average over (NaN) is written as null
        metrics = {name: value if math.isfinite(value) else None for name, value in summary.items()}
        text = json.dumps({**info, "metrics": metrics}, indent=2, allow_nan=False)
        atomic_write_text(text + "\n", folder / "metrics.json")
        shown = min(self.grid_size, len(pairs["index"]))
        if shown:
            originals, counterfactuals = pairs["originals"][:shown].float(), pairs["counterfactuals"][:shown].float()
            difference = (counterfactuals - originals + 1) / 2  # grey = unchanged, bright = added, dark = removed
            framed = frame_failures(counterfactuals, pairs["success"][:shown])  # red frame: the search failed
            tiles = [images.expand(-1, 3, -1, -1) for images in (originals, framed, difference)]
            rows = torch.stack(tiles, dim=1).flatten(0, 1)
            with atomic_path(folder / "grid.png") as temporary:
                save_image(rows.clamp(0, 1), temporary, format="png", nrow=3, padding=2, pad_value=1.0)
