"""Your own image files in torchvision's ImageFolder layout: ``root/<class name>/<image file>``."""

from __future__ import annotations

from pathlib import Path

import torch

from cfx.data.base import ImageDataModule, missing_files_error
from cfx.data.folders import IMAGE_MODES, FileImages, image_file_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageFolder(ImageDataModule):
    """A folder of image files, one sub-folder per class (torchvision's ImageFolder layout).

    ``root/<class name>/*.png`` (or ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``, any case). The classes are the
    sub-folder names in sorted order (class ``i`` is ``class_names[i]``; hidden folders are skipped), the
    dataset index of a file is its position in the sorted list of ``(class name, file name)``, and only the
    files directly inside a class folder are read. Images are decoded on demand with PIL and converted to
    grayscale or RGB.

    Args:
        root: the folder holding one sub-folder per class.
        channels: 1 (convert to grayscale) or 3 (convert to RGB).
        image_size: centre-crop every image to a square and resize it to this size; ``None`` keeps the images
            as they are, which must then all be square and of one size (that of the first file): another size
            is an error naming the file.
        **kwargs: see :class:`~cfx.data.base.ImageDataModule` (split, ``classes`` by class number, batch sizes,
            transforms).
    """

    def __init__(self, root: str, channels: int = 3, image_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if channels not in IMAGE_MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels or None, got {image_size}")
        self.root = Path(root)
        self.channels = channels
        self._image_size = image_size
        self._class_dirs: list[Path] | None = None
        self._native_size: int | None = None

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class (sub-folder) names; class ``i`` is ``class_names[i]``."""
        return tuple(folder.name for folder in self._class_folders())

    @property
    def source_num_classes(self) -> int:
        return len(self._class_folders())

    @property
    def image_size(self) -> int:
        """``image_size`` if given, else the side of the first image file (read from its header)."""
        if self._image_size is not None:
            return self._image_size
        if self._native_size is None:
            first = self._files(self._class_folders()[0])[0]
            width, height = image_file_size(first)
            if width != height:
                raise ValueError(
                    f"ImageFolder: {first} is {width}x{height} pixels, not square: pass image_size=... to "
                    "centre-crop and resize every image to one square size"
                )
            self._native_size = width
        return self._native_size

    def _class_folders(self) -> list[Path]:
        """The sorted class sub-folders of ``root`` (listed once)."""
        if self._class_dirs is None:
            expected = [f"<class name>/<image>{{{','.join(IMAGE_EXTENSIONS)}}}  (one sub-folder per class)"]
            if not self.root.is_dir():
                raise missing_files_error("ImageFolder", self.root, expected)
            folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                raise missing_files_error(
                    "ImageFolder", self.root, expected, hint=f"{self.root.resolve()} has no class sub-folders"
                )
            self._class_dirs = folders
        return self._class_dirs

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        """The sorted image files directly inside one class folder; an empty folder is an error."""
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"ImageFolder: the class folder {folder.resolve()} holds no image files "
                f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)}); remove it or add its images"
            )
        return files

    def load_source(self) -> FileImages:
        per_class = [self._files(folder) for folder in self._class_folders()]
        paths = [path for files in per_class for path in files]
        labels = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor([len(f) for f in per_class]))
        return FileImages(paths, labels, self.image_size, channels=self.channels, resize=self._image_size is not None)
