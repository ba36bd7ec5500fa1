"""HDF5 data sets (``images`` uint8, ``labels``, optional ``attributes`` and ``split``) and a packer for them."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from cfx.data.base import SPLITS, UNASSIGNED, ImageDataModule, LabelledImages, check_labels, missing_files_error


def read_labels(handle: h5py.File, path: Path) -> Tensor:
    """The ``labels`` dataset of an open cfx HDF5 file as int64, after checking it holds integers.

    Raises:
        ValueError: the labels are not a 1-D integer array.
    """
    labels = handle["labels"]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return torch.from_numpy(labels[:].astype(np.int64))


class HDF5Images(LabelledImages):
    """Images read on demand from an HDF5 file; the file handle is opened lazily in each process.

    Layout: ``images`` (uint8, ``N x H x W`` or ``N x C x H x W``), ``labels`` (``N``), optional
    ``attributes`` (``N x A``, with the names in the file attribute ``attribute_names``) and optional
    ``split`` (``N``: 0 train, 1 val, 2 test, -1 unused).
    """

    def __init__(self, path: Path):
        self.path = path
        self._file: h5py.File | None = None
        with h5py.File(path, "r") as handle:
            for key in ("images", "labels"):
                if key not in handle:
                    raise ValueError(f"{path}: the HDF5 file has no {key!r} dataset (it has {sorted(handle)})")
            images = handle["images"]
            if images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise ValueError(
                    f"{path}: 'images' must be uint8 N x H x W or N x C x H x W, got {images.dtype} {images.shape}"
                )
            self.shape = images.shape if images.ndim == 4 else (images.shape[0], 1, *images.shape[1:])
            self.labels = read_labels(handle, path)
            if len(self.labels) != self.shape[0]:
                raise ValueError(f"{path}: {self.shape[0]} images but {len(self.labels)} labels")
            if "attributes" in handle:
                self.attributes = torch.from_numpy(handle["attributes"][:].astype(np.float32))
                self.attribute_names = tuple(str(n) for n in handle.attrs.get("attribute_names", ()))
            if "split" in handle:
                self.predefined_split = torch.from_numpy(handle["split"][:].astype(np.int8))

    def load_image(self, index: int) -> Tensor:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return torch.from_numpy(self._file["images"][index]).reshape(self.shape[1:])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}


class HDF5(ImageDataModule):
    """A DataModule over an HDF5 file in cfx's layout (see :func:`pack_hdf5`).

    Args:
        path: the ``.h5`` file.
        num_classes: number of classes (default: ``max(label) + 1``, read from the file).
        **kwargs: see :class:`~cfx.data.base.ImageDataModule`.

    Raises:
        ValueError: the file lacks ``images`` or ``labels``, has no samples, or has labels that are not
            integers in ``0 .. num_classes - 1`` (the error names the file and the offending values).
    """

    def __init__(self, path: str, num_classes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        if not self.path.is_file():
            raise missing_files_error("HDF5", self.path.parent, [self.path.name])
        with h5py.File(self.path, "r") as handle:
            if "images" not in handle or "labels" not in handle:
                raise ValueError(f"{self.path}: an HDF5 data set needs 'images' and 'labels' (it has {sorted(handle)})")
            shape = handle["images"].shape
            self._in_channels = shape[1] if len(shape) == 4 else 1
            self._image_size = shape[-1]
            labels = read_labels(handle, self.path)
        if len(labels) == 0:
            raise ValueError(f"{self.path}: the HDF5 file holds no samples")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self._num_classes = num_classes if num_classes is not None else max(int(labels.max()) + 1, 1)
        check_labels(labels, self._num_classes, str(self.path))

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def source_num_classes(self) -> int:
        return self._num_classes

    def load_source(self) -> HDF5Images:
        return HDF5Images(self.path)


def pack_hdf5(datamodule: ImageDataModule, path: str | Path, chunk: int = 1024) -> Path:
    """Write the samples of ``datamodule`` (its class subset, labels and split) into an HDF5 file.

    The file is written next to ``path`` and renamed into place at the end, so a failure leaves nothing
    half-written. Images are stored as the uint8 pixels of the source (no transforms).

    Args:
        datamodule: any cfx DataModule.
        path: the output ``.h5`` file.
        chunk: images read and written at a time.

    Returns:
        The path written.
    """
    path = Path(path)
    datamodule.setup()
    source = datamodule.load_source()
    codes = datamodule.split_codes(source)
    kept = torch.nonzero(codes != UNASSIGNED).flatten()
    label_map = datamodule._label_map()
    shape = (len(kept), datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(partial, "w") as handle:
            images = handle.create_dataset("images", shape, dtype=np.uint8, chunks=(1, *shape[1:]), compression="gzip")
            for start in range(0, len(kept), chunk):
                batch = kept[start : start + chunk]
                images[start : start + len(batch)] = torch.stack([source.load_image(int(i)) for i in batch]).numpy()
            handle["labels"] = label_map[source.labels[kept]].numpy()
            handle["split"] = codes[kept].numpy()
            handle["source_index"] = kept.numpy()
            if source.attributes is not None:
                handle["attributes"] = source.attributes[kept].numpy()
                handle.attrs["attribute_names"] = list(source.attribute_names)
            handle.attrs["splits"] = list(SPLITS)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def pack_main(args: list[str] | None = None) -> None:
    """``cfx-pack``: write any DataModule, given as on the ``cfx`` command line, into an HDF5 file.

    Example: ``cfx-pack --data cfx.data.FashionMNIST --data.classes "[0, 6]" --output data/shirts.h5``.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = ArgumentParser(description="Pack a cfx DataModule (its class subset, labels and split) into HDF5.")
    parser.add_subclass_arguments(ImageDataModule, "data", required=True)
    parser.add_argument("--output", type=str, required=True, help="the .h5 file to write")
    config = parser.parse_args(args)
    datamodule = parser.instantiate_classes(config).data
    path = pack_hdf5(datamodule, config.output)
    sizes = ", ".join(f"{len(datamodule.dataset(split))} {split}" for split in SPLITS)
    print(f"wrote {path}: {sizes}")
