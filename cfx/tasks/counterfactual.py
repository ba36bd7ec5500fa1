"""CounterfactualTask: run any explainer over a query DataModule in ``cfx test`` / ``cfx predict``.

``cfx test -c configs/counterfactual/embedded_mnist_deduce.yaml`` loads the classifier checkpoint, pairs every
test query with its targets, runs the explainer (batched), logs the metric table and writes, under
``output_dir``, ``counterfactuals.pt`` (every pair; read it with :func:`load_counterfactual_results`),
``metrics.json`` and ``grid.png`` (rows of query | counterfactual | difference).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import save_image

from cfx.counterfactual.base import Explainer
from cfx.distributed import destroy_process_group_at_exit
from cfx.io import atomic_torch_save
from cfx.metrics.counterfactual import CounterfactualMetrics
from cfx.metrics.functional.counterfactual import _counterfactual_update, feature_nll, sort_record
from cfx.nn.classifier import FeatureClassifier
from cfx.tasks.classification import check_data_matches, load_classifier
from cfx.tasks.ddu import load_classifier_and_gaussians

RESULTS_FORMAT = "cfx.CounterfactualResults"
RESULTS_FILENAME = "counterfactuals.pt"
PAIR_KEYS = (
    "index",
    "target",
    "label",
    "original_prediction",
    "success",
    "target_probability",
    "iterations",
    "l0",
    "l1",
    "mse",
    "concentration",
    "seconds",
)
_HASH_MULTIPLIER = 6364136223846793005  # Knuth's 64-bit LCG multiplier
_HASH_INCREMENT = 1442695040888963407


def random_targets(indices: Tensor, classes: Tensor, num_classes: int, seed: int) -> Tensor:
    """A target class for each query, uniform over the classes other than ``classes``, seeded by its dataset index.

    A splitmix-style integer hash of ``(seed, index)`` picks the target, so a query gets the same target in any
    batch, on any device and in any process.

    Args:
        indices: ``(N,)`` dataset indices.
        classes: ``(N,)`` the class each query must not get.
        num_classes: number of classes.
        seed: the run's seed.

    Returns:
        ``(N,)`` int64 targets, never equal to ``classes``.
    """
    seed_term = torch.tensor(seed, dtype=torch.long, device=indices.device) * _HASH_INCREMENT + 1
    state = indices.long() * _HASH_MULTIPLIER + seed_term  # int64 arithmetic wraps around
    for shift, multiplier in ((30, -4658895280553007687), (27, -7723592293110705685)):
        state = (state ^ ((state >> shift) & ((1 << (64 - shift)) - 1))) * multiplier
    state = state ^ ((state >> 31) & ((1 << 33) - 1))
    offset = 1 + torch.remainder(state, num_classes - 1)
    return torch.remainder(classes.long() + offset, num_classes)


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


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
        A dict with one entry per pair in every tensor of :data:`PAIR_KEYS` (plus ``originals``,
        ``counterfactuals``, and ``nll`` when realism was measured), ordered by ``(index, target)``, and
        ``summary`` (the metric table), ``method`` and ``classifier``.

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
    keys = (*PAIR_KEYS, "originals", "counterfactuals")
    missing = [key for key in keys if not isinstance(results.get(key), Tensor)]
    lengths = {len(results[key]) for key in keys if key not in missing}
    if missing or len(lengths) > 1:
        raise ValueError(f"{path} is incomplete: missing {missing}, per-pair lengths {sorted(lengths)}")
    return results


class CounterfactualTask(L.LightningModule):
    """Explain a trained classifier's decisions on the queries of a DataModule (``test`` or ``predict``).

    Each query is paired with its targets; pairs whose target already is the classifier's prediction are
    dropped. The explainer runs with gradients enabled, so the Trainer needs ``inference_mode: false``.
    Metrics (:class:`~cfx.metrics.CounterfactualMetrics`) are gathered over all processes; each process writes
    its pairs to a shard, and process 0 merges them into ``<output_dir>/counterfactuals.pt`` (written
    atomically), ``metrics.json`` and ``grid.png`` (the output folder must be shared by all processes).

    Args:
        classifier: path of the classifier's ClassificationTask checkpoint.
        explainer: builds the explainer from the classifier; YAML ``{class_path: cfx.counterfactual.DeDUCE,
            init_args: {...}}`` without the classifier.
        targets: ``"others"`` (every class but the query's class: the DeDUCE protocol), ``"fixed"``
            (``target_class``), ``"mapping"`` (``target_mapping[query class]``; unmapped queries are skipped) or
            ``"random"`` (one class other than the query's, seeded by ``seed`` and the query's dataset index).
        target_class: the target of ``"fixed"``.
        target_mapping: the class map of ``"mapping"``.
        query_class: what a query's class is: the classifier's ``"prediction"`` or the data's ``"label"``.
        seed: seed of the ``"random"`` targets.
        gaussians: path of class Gaussians of the classifier (``class_gaussians.pt``): adds the feature NLL of
            each counterfactual under its target class (realism).
        output_dir: where the results go (default ``<trainer.default_root_dir>/counterfactual/<explainer class>``).
        max_queries: use only the first ``max_queries`` queries of the split (in data set order).
        grid_size: pairs shown in ``grid.png``.
        l0_tolerance: changes up to this size do not count for L0.
        concentration_threshold: pixel change that counts for the concentration box.
    """

    def __init__(
        self,
        classifier: str,
        explainer: Callable[[FeatureClassifier], Explainer],
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
        self.explainer = explainer(self.network)
        if not isinstance(self.explainer, Explainer):
            raise ValueError(
                f"explainer must build a cfx.counterfactual.Explainer from the classifier, got {type(self.explainer)}"
            )
        self.targets, self.query_class, self.seed = targets, query_class, seed
        self.output_dir, self.max_queries, self.grid_size = output_dir, max_queries, grid_size
        self.metrics = CounterfactualMetrics(
            realism=gaussians is not None, l0_tolerance=l0_tolerance, concentration_threshold=concentration_threshold
        )
        self.allowed_indices: Tensor | None = None
        self.pairs: list[dict[str, Tensor]] = []

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
        destroy_process_group_at_exit()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_classes"):
            check_data_matches(self.network, datamodule)
        if self.max_queries is not None:
            if not hasattr(datamodule, "dataset"):
                raise ValueError("max_queries needs a cfx ImageDataModule (it reads the split's sample order)")
            split = "test" if stage == "test" else datamodule.predict_split
            self.allowed_indices = datamodule.dataset(split).indices[: self.max_queries].clone()

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
                "CounterfactualTask needs gradients, but the Trainer runs it in inference mode: set "
                "`trainer: {inference_mode: false}` in the config (or L.Trainer(inference_mode=False))"
            )
        images, labels, indices = batch["image"], batch["label"], batch["index"]
        if self.allowed_indices is not None:
            keep = torch.isin(indices, self.allowed_indices.to(indices.device))
            images, labels, indices = images[keep], labels[keep], indices[keep]
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
        nll = None
        if self.gaussians is not None:
            with torch.no_grad():
                nll = feature_nll(self.network.forward_features(result.counterfactuals)[0], targets, self.gaussians)
        self.metrics.update(
            indices[positions],
            targets,
            originals,
            result.counterfactuals,
            result.success,
            result.target_probability,
            result.iterations,
            seconds,
            nll,
        )
        distances = _counterfactual_update(
            originals, result.counterfactuals, self.metrics.l0_tolerance, self.metrics.concentration_threshold
        )
        pairs = {
            "index": indices[positions],
            "target": targets,
            "label": labels[positions],
            "original_prediction": predictions[positions],
            "success": result.success,
            "target_probability": result.target_probability,
            "iterations": result.iterations,
            "seconds": torch.full((len(positions),), seconds / len(positions), dtype=torch.float64),
            "originals": originals,
            "counterfactuals": result.counterfactuals,
            **distances,
            **({"nll": nll} if nll is not None else {}),
        }
        pairs = {key: value.detach().cpu() for key, value in pairs.items()}
        self.pairs.append(pairs)
        return pairs

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
        if self.pairs:
            return {key: torch.cat([pairs[key] for pairs in self.pairs]) for key in self.pairs[0]}
        channels, size = self.network.in_channels, self.network.image_size or 0
        empty = {key: torch.zeros(0, dtype=torch.float64) for key in PAIR_KEYS}
        for key in ("index", "target", "label", "original_prediction", "iterations"):
            empty[key] = empty[key].long()
        empty["success"] = empty["success"].bool()
        empty["originals"] = empty["counterfactuals"] = torch.zeros(0, channels, size, size)
        if self.gaussians is not None:
            empty["nll"] = torch.zeros(0, dtype=torch.float64)
        return empty

    def write_results(self, folder: Path, pairs: dict[str, Tensor], summary: dict[str, float]) -> None:
        """Write ``counterfactuals.pt``, ``metrics.json`` and ``grid.png`` into ``folder``."""
        method = type(self.explainer).__name__
        classifier = str(self.hparams.classifier)
        atomic_torch_save(
            {"format": RESULTS_FORMAT, "method": method, "classifier": classifier, "summary": summary, **pairs},
            folder / RESULTS_FILENAME,
        )
        # strict JSON: a metric without successful pairs to average over (NaN) is written as null
        metrics = {name: value if math.isfinite(value) else None for name, value in summary.items()}
        info = {"method": method, "classifier": classifier, "targets": self.targets, "metrics": metrics}
        _atomic_write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", folder / "metrics.json")
        shown = min(self.grid_size, len(pairs["index"]))
        if shown:
            originals, counterfactuals = pairs["originals"][:shown].float(), pairs["counterfactuals"][:shown].float()
            difference = (counterfactuals - originals + 1) / 2  # grey = unchanged, bright = added, dark = removed
            framed = frame_failures(counterfactuals, pairs["success"][:shown])  # red frame: the search failed
            tiles = [images.expand(-1, 3, -1, -1) for images in (originals, framed, difference)]
            rows = torch.stack(tiles, dim=1).flatten(0, 1)
            temporary = folder / ".grid.tmp.png"
            save_image(rows.clamp(0, 1), temporary, nrow=3, padding=2, pad_value=1.0)
            os.replace(temporary, folder / "grid.png")
