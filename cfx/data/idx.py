"""MNIST and Fashion-MNIST from local IDX files: torchvision's layout or gzipped files as Debian installs them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from cfx.data.base import TEST, TRAIN, ImageDataModule, TensorImages, missing_files_error

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) into an array of the shape and dtype its header declares."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header declares shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


class IDXDataModule(ImageDataModule):
    """Base for the IDX data sets: predefined train / test split, validation carved from train.

    The four files are looked up as ``root/<folder>/raw/<name>``, ``root/<name>`` and the same with ``.gz``.

    Args:
        root: directory holding the files.
        val_fraction: fraction of each class of the training set held out for validation.
        **kwargs: see :class:`~cfx.data.base.ImageDataModule`.
    """

    folder: str = ""
    in_channels = 1
    image_size = 28
    source_num_classes = 10

    def __init__(self, root: str = "data", val_fraction: float = 1 / 12, **kwargs):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.root = Path(root)

    def _find(self, name: str) -> Path | None:
        for directory in (self.root / self.folder / "raw", self.root):
            for candidate in (directory / name, directory / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def load_source(self) -> TensorImages:
        found = {key: self._find(name) for key, name in IDX_FILES.items()}
        if any(path is None for path in found.values()):
            expected = [f"{self.folder}/raw/{name}[.gz] or {name}[.gz]" for name in IDX_FILES.values()]
            raise missing_files_error(type(self).__name__, self.root, expected)
        arrays = {key: read_idx(path) for key, path in found.items()}
        images = np.concatenate([arrays["train_images"], arrays["test_images"]])[:, None]
        labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
        if len(images) != len(labels) or images.shape[-2:] != (28, 28):
            raise ValueError(f"{type(self).__name__}: got images {images.shape} and {len(labels)} labels")
        split = torch.full((len(labels),), TEST, dtype=torch.int8)
        split[: len(arrays["train_labels"])] = TRAIN
        return TensorImages(torch.from_numpy(images), torch.from_numpy(labels), predefined_split=split)


class MNIST(IDXDataModule):
    """MNIST (60,000 train / 10,000 test) from local IDX files in torchvision's layout (``root/MNIST/raw``)."""

    folder = "MNIST"


class FashionMNIST(IDXDataModule):
    """Fashion-MNIST from local IDX files; the default root is where Debian's dataset-fashion-mnist puts them."""

    folder = "FashionMNIST"

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist", **kwargs):
        super().__init__(root=root, **kwargs)
