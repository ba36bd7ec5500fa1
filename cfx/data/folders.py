"""Image files decoded on demand with PIL, and the CelebA (torchvision's layout) and ISIC 2018 task 3 data sets."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from cfx.data.base import ImageDataModule, LabelledImages, missing_files_error

IMAGE_MODES = {1: "L", 3: "RGB"}


def image_file_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header.

    Raises:
        ValueError: the file is not a readable image (naming it).
    """
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image file ({type(error).__name__}: {error})") from error


def read_image(path: Path, channels: int = 3) -> Tensor:
    """Decode an image file with PIL into a uint8 ``channels x H x W`` tensor (converted to L or RGB).

    Raises:
        ValueError: ``channels`` is not 1 or 3, or the file is not a readable image (naming it).
    """
    if channels not in IMAGE_MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    try:
        with Image.open(path) as image:
            converted = image.convert(IMAGE_MODES[channels])
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image file ({type(error).__name__}: {error})") from error
    return TF.pil_to_tensor(converted)


class FileImages(LabelledImages):
    """Images decoded from files with PIL, centre-cropped to a square and resized.

    Args:
        paths: one image file per sample.
        labels: ``(N,)`` labels.
        image_size: output height and width.
        crop_size: side of the centre crop taken before resizing (``None``: the shorter image side).
        attributes: optional ``(N, A)`` 0/1 attributes.
        attribute_names: their names.
        predefined_split: optional split codes.
        channels: 1 (grayscale, PIL mode L) or 3 (RGB): every image is converted.
        resize: crop and resize to ``image_size``; with ``False`` every image must already be ``image_size``
            square, and one that is not is a ``ValueError`` naming the file.
    """

    def __init__(
        self,
        paths: list[Path],
        labels: Tensor,
        image_size: int,
        crop_size: int | None = None,
        attributes: Tensor | None = None,
        attribute_names: tuple[str, ...] = (),
        predefined_split: Tensor | None = None,
        channels: int = 3,
        resize: bool = True,
    ):
        if channels not in IMAGE_MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.paths = paths
        self.labels = labels
        self.image_size = image_size
        self.crop_size = crop_size
        self.attributes = attributes
        self.attribute_names = attribute_names
        self.predefined_split = predefined_split
        self.channels = channels
        self.resize = resize

    def load_image(self, index: int) -> Tensor:
        image = read_image(self.paths[index], self.channels)
        size = (self.image_size, self.image_size)
        if not self.resize:
            if tuple(image.shape[-2:]) != size:
                raise ValueError(
                    f"{self.paths[index]} is {image.shape[-1]}x{image.shape[-2]} pixels, expected "
                    f"{self.image_size}x{self.image_size} like the other images (set image_size to resize them all)"
                )
            return image
        crop = self.crop_size or min(image.shape[-2:])
        image = TF.center_crop(image, [crop, crop])
        return image if tuple(image.shape[-2:]) == size else TF.resize(image, list(size), antialias=True)


def _celeba_dir(root: Path) -> Path:
    return root / "celeba" if (root / "celeba").is_dir() else root


class CelebA(ImageDataModule):
    """CelebA from a local root in torchvision's layout, with a binary target attribute.

    Reads ``celeba/list_attr_celeba.txt``, ``celeba/list_eval_partition.txt`` and the aligned images in
    ``celeba/img_align_celeba/`` (``root`` may also be the ``celeba`` folder itself). The label is the target
    attribute (0/1); all 40 attributes are in each sample's ``"attributes"`` for attribute-conditioned models.
    The official partition gives train / val / test.

    Args:
        root: the directory holding ``celeba/``.
        target_attribute: the attribute used as the binary label, e.g. ``"Smiling"``; a list of k attributes
            gives 2^k classes, label = sum of 2^i over the attributes i that are present.
        image_size: output size (64, 96 or 128 in the papers).
        crop_size: centre crop of the 178 x 218 aligned images before resizing.
        **kwargs: see :class:`~cfx.data.base.ImageDataModule`.
    """

    in_channels = 3

    def __init__(
        self,
        root: str = "data",
        target_attribute: str | list[str] = "Smiling",
        image_size: int = 64,
        crop_size: int = 178,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.target_attributes = [target_attribute] if isinstance(target_attribute, str) else list(target_attribute)
        if not self.target_attributes or len(set(self.target_attributes)) != len(self.target_attributes):
            raise ValueError(f"target_attribute must name one or more distinct attributes, got {target_attribute}")
        self._image_size = image_size
        self.crop_size = crop_size

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def source_num_classes(self) -> int:
        return 2 ** len(self.target_attributes)

    def load_source(self) -> FileImages:
        folder = _celeba_dir(self.root)
        attr_file, partition_file = folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt"
        image_dir = folder / "img_align_celeba"
        if not (attr_file.is_file() and partition_file.is_file() and image_dir.is_dir()):
            raise missing_files_error(
                "CelebA",
                self.root,
                [
                    "celeba/list_attr_celeba.txt",
                    "celeba/list_eval_partition.txt",
                    "celeba/img_align_celeba/*.jpg",
                ],
            )
        lines = attr_file.read_text().split("\n")
        names = tuple(lines[1].split())
        unknown = [name for name in self.target_attributes if name not in names]
        if unknown:
            raise ValueError(f"CelebA has no attribute {unknown[0]!r}; its attributes are {names}")
        rows = [line.split() for line in lines[2:] if line.strip()]
        if int(lines[0]) != len(rows) or any(len(row) != len(names) + 1 for row in rows):
            raise ValueError(f"{attr_file}: expected {lines[0].strip()} rows of a file name and {len(names)} values")
        files = [row[0] for row in rows]
        attributes = (torch.tensor([[int(v) for v in row[1:]] for row in rows]) > 0).float()
        partition = dict(line.split() for line in partition_file.read_text().split("\n") if line.strip())
        missing = [name for name in files if name not in partition]
        if missing:
            raise ValueError(f"{partition_file} has no partition for {len(missing)} images, e.g. {missing[0]}")
        split = torch.tensor([int(partition[name]) for name in files], dtype=torch.int8)
        columns = [names.index(name) for name in self.target_attributes]
        labels = (attributes[:, columns].long() * 2 ** torch.arange(len(columns))).sum(1)
        return FileImages(
            [image_dir / name for name in files],
            labels,
            self.image_size,
            self.crop_size,
            attributes,
            names,
            split,
        )


ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"


class ISIC2018(ImageDataModule):
    """ISIC 2018 task 3 (7 skin-lesion classes) from the training images and the ground-truth CSV.

    Expects ``root/ISIC2018_Task3_Training_Input/<image>.jpg`` and the CSV (columns ``image`` and the one-hot
    ``MEL, NV, BCC, AKIEC, BKL, DF, VASC``) at ``root/ISIC2018_Task3_Training_GroundTruth/`` or ``root/``.
    The default is the stratified 90 / 10 split (the 10 % serves validation and test).

    Args:
        root: the data directory.
        image_size: output size after a square centre crop.
        **kwargs: see :class:`~cfx.data.base.ImageDataModule`.
    """

    in_channels = 3
    source_num_classes = len(ISIC_CLASSES)

    def __init__(
        self,
        root: str = "data",
        image_size: int = 96,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        **kwargs,
    ):
        super().__init__(val_fraction=val_fraction, test_fraction=test_fraction, **kwargs)
        self.root = Path(root)
        self._image_size = image_size

    @property
    def image_size(self) -> int:
        return self._image_size

    def load_source(self) -> FileImages:
        candidates = [self.root / "ISIC2018_Task3_Training_GroundTruth" / ISIC_CSV, self.root / ISIC_CSV]
        csv_path = next((path for path in candidates if path.is_file()), None)
        image_dir = self.root / "ISIC2018_Task3_Training_Input"
        if csv_path is None or not image_dir.is_dir():
            raise missing_files_error(
                "ISIC2018",
                self.root,
                [
                    f"ISIC2018_Task3_Training_GroundTruth/{ISIC_CSV} (or {ISIC_CSV})",
                    "ISIC2018_Task3_Training_Input/*.jpg",
                ],
            )
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = ("image", *ISIC_CLASSES)
            if reader.fieldnames is None or tuple(reader.fieldnames) != columns:
                raise ValueError(f"{csv_path}: expected the columns {columns}, got {reader.fieldnames}")
            rows = list(reader)
        one_hot = torch.tensor([[float(row[name]) for name in ISIC_CLASSES] for row in rows])
        if not torch.all(one_hot.sum(1) == 1):
            bad = rows[int(torch.nonzero(one_hot.sum(1) != 1)[0])]["image"]
            raise ValueError(f"{csv_path}: every row must have exactly one class set to 1 (row {bad} does not)")
        paths = [image_dir / f"{row['image']}.jpg" for row in rows]
        absent = [path for path in paths if not path.is_file()]
        if absent:
            raise FileNotFoundError(
                f"ISIC2018: {len(absent)} images listed in {csv_path} are missing, e.g. {absent[0]}"
            )
        return FileImages(paths, one_hot.argmax(1), self.image_size)
