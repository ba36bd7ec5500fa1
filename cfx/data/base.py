"""Base DataModule: seeded stratified splits, class subsets / binary relabelling, indexed dict samples.

Every sample is a dict ``{"image": float C x H x W in [0, 1], "label": int64, "index": int64}`` (plus
``"attributes"`` where the data set has them, and ``"morphometrics"`` with Morpho-MNIST attributes). ``index`` is
the sample's position in the whole data set, so anything seeded per sample (counterfactual queries, random
targets) is independent of batching and devices.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cfx.data.morphometrics import MORPHOMETRIC_ATTRIBUTE_NAMES, binarise, cached_morphometrics

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST, UNASSIGNED = 0, 1, 2, -1
ATTRIBUTE_SOURCES = (None, "morphometric")


def default_cache_dir() -> Path:
    """``$CFX_CACHE`` or else ``~/.cache/cfx``: where cfx keeps what it derives from data sets."""
    return Path(os.environ.get("CFX_CACHE") or Path.home() / ".cache" / "cfx")


class LabelledImages(Dataset, abc.ABC):
    """A data set whose labels are known up front and whose images load one at a time.

    Subclasses set ``labels`` (``(N,)`` int64), optionally ``attributes`` (``(N, A)`` 0/1 float),
    ``attribute_names`` and ``predefined_split`` (``(N,)`` int8 of TRAIN / VAL / TEST / UNASSIGNED), and
    implement :meth:`load_image` returning a uint8 ``C x H x W`` tensor. A DataModule with
    ``attributes="morphometric"`` sets ``morphometrics`` (``(N, 6)`` float64) and replaces ``attributes``.
    """

    labels: Tensor
    attributes: Tensor | None = None
    attribute_names: tuple[str, ...] = ()
    morphometrics: Tensor | None = None
    predefined_split: Tensor | None = None

    def all_images(self) -> Tensor:
        """Every image as one uint8 ``N x C x H x W`` tensor (loaded one at a time; override when held in memory)."""
        return torch.stack([self.load_image(index) for index in range(len(self))])

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def load_image(self, index: int) -> Tensor:
        """Return image ``index`` as a uint8 tensor of shape ``C x H x W``."""

    def __getitem__(self, index: int) -> Tensor:
        return self.load_image(index)


class TensorImages(LabelledImages):
    """Images held in memory as one uint8 ``N x C x H x W`` tensor."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        attributes: Tensor | None = None,
        attribute_names: Sequence[str] = (),
        predefined_split: Tensor | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images of shape N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"expected integer labels, got {labels.dtype}")
        self.images = images
        self.labels = labels.long()
        self.attributes = attributes
        self.attribute_names = tuple(attribute_names)
        self.predefined_split = predefined_split

    def load_image(self, index: int) -> Tensor:
        return self.images[index]

    def all_images(self) -> Tensor:
        return self.images


class IndexedSamples(Dataset):
    """The samples of one split: dict items with a float image, the (relabelled) label and the source index."""

    def __init__(self, source: LabelledImages, indices: Tensor, label_map: Tensor, transform: nn.Module | None):
        self.source = source
        self.indices = indices
        self.label_map = label_map
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        index = int(self.indices[position])
        image = self.source.load_image(index).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        sample = {
            "image": image,
            "label": self.label_map[self.source.labels[index]],
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.source.attributes is not None:
            sample["attributes"] = self.source.attributes[index]
        if self.source.morphometrics is not None:
            sample["morphometrics"] = self.source.morphometrics[index].float()
        return sample


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...``: no sample is repeated to even out ranks.

    DistributedSampler pads evaluation sets with repeated samples, which biases metrics; evaluation loaders
    use this sampler instead so that a DDP metric equals the single-process one exactly.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_labels(labels: Tensor, num_classes: int, source: str) -> None:
    """Raise one ``ValueError`` unless ``labels`` is a 1-D integer tensor with values in ``0 .. num_classes - 1``.

    Args:
        labels: the labels of a whole data set.
        num_classes: the number of classes the data set declares.
        source: what the labels come from (a file or a DataModule), named in the error.
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        dtype = labels.dtype if isinstance(labels, Tensor) else ""
        raise ValueError(f"{source}: labels must be a 1-D integer tensor, got {dtype} {shape}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = torch.unique(labels[bad])
        shown = ", ".join(str(v) for v in values[:10].tolist()) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"{source}: labels must be integers in 0..{num_classes - 1} ({num_classes} classes); "
            f"{int(bad.sum())} label(s) are outside that range, with the values {shown}"
        )


def stratified_split(labels: Tensor, val_fraction: float, test_fraction: float, seed: int) -> Tensor:
    """Assign each sample to TRAIN, VAL or TEST so that every class is split in the same proportions.

    Args:
        labels: ``(N,)`` integer labels.
        val_fraction: fraction of each class that goes to validation.
        test_fraction: fraction of each class that goes to test.
        seed: seed of the permutation; the same seed gives the same split.

    Returns:
        ``(N,)`` int8 split codes.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1; got {val_fraction}, {test_fraction}")
    labels = labels.long()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - class_start[sorted_labels]
    n_test = torch.round(counts * test_fraction).long()[sorted_labels]
    n_val = torch.round(counts * val_fraction).long()[sorted_labels]
    codes_sorted = torch.full((len(labels),), TRAIN, dtype=torch.int8)
    codes_sorted[rank_in_class < n_test] = TEST
    codes_sorted[(rank_in_class >= n_test) & (rank_in_class < n_test + n_val)] = VAL
    codes = torch.empty_like(codes_sorted)
    codes[order] = codes_sorted
    return codes


class ImageDataModule(L.LightningDataModule, abc.ABC):
    """Base of every cfx DataModule.

    Subclasses implement :meth:`load_source` and the data facts ``in_channels``, ``image_size`` and
    ``source_num_classes`` (cheap: the CLI reads them before any data is loaded).

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of val / test / predict loaders (default: ``batch_size``).
        num_workers: DataLoader workers.
        val_fraction: fraction of each class held out for validation (of the training part, where the data
            set has a predefined train / test split).
        test_fraction: fraction of each class held out for test (ignored where the split is predefined).
        split_seed: seed of the stratified split.
        classes: keep only these classes, relabelled ``0 .. len(classes) - 1`` in the given order; two
            classes give a binary task (DISC's classifier-discrepancy experiment).
        train_transform: applied to training images (float tensors in [0, 1]).
        eval_transform: applied to val / test / predict images.
        predict_split: the split the predict loader reads.
        pin_memory: pin loader memory (for GPUs).
        shuffle_seed: seed of the training order, which is a pure function of (seed, epoch) (default: the seed
            of ``seed_everything``, as Lightning's own distributed sampler, else 0).
        attributes: the samples' ``"attributes"``. ``None``: the data set's own, if it has any (CelebA's 40).
            ``"morphometric"``: Morpho-MNIST's measurements of each (grey) image, see
            :mod:`cfx.data.morphometrics`: samples carry the continuous ``"morphometrics"`` ``(6,)`` and the
            binarised ``"attributes"`` ``(6,)`` named :data:`~cfx.data.morphometrics.MORPHOMETRIC_ATTRIBUTE_NAMES`,
            1 where a value is above the median of the sample's class over the training split (so they depend
            on ``split_seed`` and the fractions; classes dropped by ``classes`` use the median of all their
            samples). The measurements are computed once per data set and cached in
            :attr:`morphometrics_cache_dir`, keyed by a digest of the images.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        classes: list[int] | None = None,
        train_transform: nn.Module | None = None,
        eval_transform: nn.Module | None = None,
        predict_split: str = "test",
        pin_memory: bool = False,
        shuffle_seed: int | None = None,
        attributes: str | None = None,
    ):
        super().__init__()
        if attributes not in ATTRIBUTE_SOURCES:
            raise ValueError(f"attributes must be one of {ATTRIBUTE_SOURCES}, got {attributes!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if predict_split not in SPLITS:
            raise ValueError(f"predict_split must be one of {SPLITS}, got {predict_split!r}")
        if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
            raise ValueError(f"classes must list at least two distinct classes, got {classes}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.classes = list(classes) if classes is not None else None
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.predict_split = predict_split
        self.pin_memory = pin_memory
        self.shuffle_seed = shuffle_seed
        self.attributes = attributes
        self._source: LabelledImages | None = None
        self._splits: dict[str, IndexedSamples] = {}
        self._split_limits: dict[str, int] = {}

    # -- data facts -------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def in_channels(self) -> int:
        """Image channels."""

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Image height (= width)."""

    @property
    @abc.abstractmethod
    def source_num_classes(self) -> int:
        """Number of classes of the full data set, before any class subset."""

    @property
    def num_classes(self) -> int:
        """Number of classes the DataModule yields (after a class subset / binary relabelling)."""
        return len(self.classes) if self.classes is not None else self.source_num_classes

    @abc.abstractmethod
    def load_source(self) -> LabelledImages:
        """Read the whole data set (labels now, images in memory or on demand)."""

    @property
    def morphometrics_cache_dir(self) -> Path:
        """The folder of the morphometrics cache (default ``$CFX_CACHE`` or ``~/.cache/cfx``)."""
        return default_cache_dir()

    # -- attributes -------------------------------------------------------------------------------------
    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The names of the samples' ``"attributes"`` (empty if they have none).

        Known without loading data for ``attributes="morphometric"``; otherwise read from the data set (set up
        on first use).
        """
        if self.attributes == "morphometric":
            return MORPHOMETRIC_ATTRIBUTE_NAMES
        self.setup()
        return tuple(self._source.attribute_names)

    def attribute_table(self) -> Tensor:
        """Every sample's ``"attributes"`` by dataset index: ``(len(data set), A)`` float32 of 0 / 1.

        Raises:
            ValueError: the samples have no attributes.
        """
        self.setup()
        if self._source.attributes is None:
            raise ValueError(
                f"{type(self).__name__} has no attributes of its own; pass attributes='morphometric' for "
                "Morpho-MNIST's measured ones"
            )
        return self._source.attributes.float()

    def morphometric_table(self) -> Tensor:
        """Every sample's continuous ``"morphometrics"`` by dataset index: ``(len(data set), 6)`` float64.

        Raises:
            ValueError: the DataModule was not built with ``attributes="morphometric"``.
        """
        if self.attributes != "morphometric":
            raise ValueError(f"{type(self).__name__} measures morphometrics only with attributes='morphometric'")
        self.setup()
        return self._source.morphometrics

    def _add_morphometrics(self, source: LabelledImages, codes: Tensor) -> None:
        """Measure (or read from the cache) and binarise ``source``'s morphometrics in place."""
        if self.in_channels != 1:
            raise ValueError(
                f"{type(self).__name__}: attributes='morphometric' measures grey digits (1 channel), but the "
                f"images have {self.in_channels} channels"
            )
        values = cached_morphometrics(source.all_images(), self.morphometrics_cache_dir)
        source.morphometrics = values
        source.attributes = binarise(values, source.labels, codes == TRAIN)
        source.attribute_names = MORPHOMETRIC_ATTRIBUTE_NAMES

    # -- splits -----------------------------------------------------------------------------------------
    def _label_map(self) -> Tensor:
        """Lookup table from source labels to the labels this DataModule yields (-1 = dropped)."""
        if self.classes is None:
            return torch.arange(self.source_num_classes)
        unknown = [c for c in self.classes if not 0 <= c < self.source_num_classes]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not classes of {type(self).__name__}, which has classes "
                f"0..{self.source_num_classes - 1}"
            )
        label_map = torch.full((self.source_num_classes,), -1, dtype=torch.long)
        label_map[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        return label_map

    def split_codes(self, source: LabelledImages) -> Tensor:
        """TRAIN / VAL / TEST code of every sample of ``source`` (UNASSIGNED where dropped by ``classes``)."""
        check_labels(source.labels, self.source_num_classes, type(self).__name__)
        label_map = self._label_map()
        kept = label_map[source.labels] >= 0
        codes = torch.full((len(source),), UNASSIGNED, dtype=torch.int8)
        if source.predefined_split is None:
            kept_codes = stratified_split(source.labels[kept], self.val_fraction, self.test_fraction, self.split_seed)
        else:
            kept_codes = source.predefined_split[kept].clone()
            pool = kept_codes == TRAIN
            if not (kept_codes == VAL).any() and self.val_fraction > 0:
                carved = stratified_split(source.labels[kept][pool], self.val_fraction, 0.0, self.split_seed)
                kept_codes[pool] = carved
        codes[kept] = kept_codes
        return codes

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        source = self.load_source()
        codes = self.split_codes(source)
        if self.attributes == "morphometric":
            self._add_morphometrics(source, codes)
        label_map = self._label_map()
        for code, name in enumerate(SPLITS):
            transform = self.train_transform if name == "train" else self.eval_transform
            indices = torch.nonzero(codes == code).flatten()
            self._splits[name] = IndexedSamples(source, indices, label_map, transform)
        if len(self._splits["train"]) == 0:
            raise ValueError(f"{type(self).__name__}: the training split is empty")
        self._source = source

    def dataset(self, split: str) -> IndexedSamples:
        """The samples of ``split`` ("train", "val" or "test"); a test split left empty falls back to val."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        if split == "test" and len(self._splits["test"]) == 0:
            return self._splits["val"]
        return self._splits[split]

    # -- loaders ----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches in an order that is a pure function of (``shuffle_seed``, epoch).

        The sampler is a seeded ``DistributedSampler`` over this process's share (the whole split without a
        process group): Lightning calls its ``set_epoch`` before every epoch and keeps it under DDP, and the
        order never draws from the global random generator, so a resumed fit sees the batches of an
        uninterrupted one. The last incomplete batch is dropped unless it is the only one.
        """
        dataset = self.dataset("train")
        rank, world_size = rank_and_world_size()
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=len(sampler) > self.batch_size,
        )

    def limit_split(self, split: str, count: int | None) -> None:
        """Make the evaluation loader of ``split`` yield only its first ``count`` samples (in split order).

        Only those samples are loaded; under DDP they are sharded across ranks without padding like a whole
        split. :meth:`dataset` still returns the whole split.

        Args:
            split: "train", "val" or "test".
            count: number of samples to keep (more than the split holds keeps all); ``None`` removes the limit.

        Raises:
            ValueError: ``split`` is not a split name or ``count`` is not a positive integer or ``None``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if count is None:
            self._split_limits.pop(split, None)
            return
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer or None, got {count!r}")
        self._split_limits[split] = count

    def eval_dataloader(self, split: str) -> DataLoader:
        """A loader over ``split`` in index order; under DDP each rank reads a disjoint, unpadded share.

        With :meth:`limit_split` it reads only the split's first samples.
        """
        dataset = self.dataset(split)
        if split in self._split_limits:
            limited = dataset.indices[: self._split_limits[split]]
            dataset = IndexedSamples(dataset.source, limited, dataset.label_map, dataset.transform)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = UnpaddedDistributedSampler(dataset) if distributed else None
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.predict_split)


def missing_files_error(dataset: str, root: Path, expected: Sequence[str], hint: str = "") -> FileNotFoundError:
    """One error naming the files a data set needs and where they were looked for."""
    lines = "\n  ".join(expected)
    message = f"{dataset}: expected these files under {root.resolve()}:\n  {lines}"
    return FileNotFoundError(message + (f"\n{hint}" if hint else ""))
