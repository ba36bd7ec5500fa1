from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cfx.cli import main
from cfx.data import ImageFolder
from cfx.results import open_results
from cfx.tasks import load_classifier
from tests.config_helpers import tiny_trainer

SIZE, PER_CLASS = 28, 8
CLASS_NAMES = ("apple", "mango", "zebra")  # written in the order zebra, apple, mango below


def _pattern(class_number: int, image: int) -> np.ndarray:
    """A 28 x 28 RGB image: horizontal stripes, vertical stripes or a moving square, varied per image."""
    rows, columns = np.mgrid[:SIZE, :SIZE]
    if class_number == 0:
        mask = (rows + image) % 6 < 3
    elif class_number == 1:
        mask = (columns + image) % 6 < 3
    else:
        mask = (abs(rows - 8 - image) < 5) & (abs(columns - 8 - image) < 5)
    red = np.where(mask, 160 + 10 * image, 20).astype(np.uint8)
    return np.stack([red, red // 2 + 3 * image, 255 - red], axis=-1).astype(np.uint8)


def _write(root: Path) -> dict[Path, tuple[int, np.ndarray]]:
    """Write the folder: ``root/<class>/<file>``; the ``zebra`` images as .BMP. Returns file -> (class, pixels)."""
    written = {}
    for class_number in (2, 0, 1):
        folder = root / CLASS_NAMES[class_number]
        folder.mkdir(parents=True)
        for image in range(PER_CLASS):
            pixels = _pattern(class_number, image)
            path = folder / (f"img{image:02d}.BMP" if class_number == 2 else f"img{image:02d}.png")
            Image.fromarray(pixels).save(path)
            written[path] = (class_number, pixels)
        (folder / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()  # hidden folders are not classes
    return written


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[Path, tuple[int, np.ndarray]]]:
    root = tmp_path / "images"
    return root, _write(root)


def _samples(datamodule: ImageFolder) -> dict[int, dict[str, torch.Tensor]]:
    """Every sample of every split, by dataset index."""
    samples = {}
    for split in ("train", "val", "test"):
        dataset = datamodule.dataset(split)
        for position in range(len(dataset)):
            sample = dataset[position]
            samples[int(sample["index"])] = sample
    return samples


def test_samples_labels_and_indices_match_the_files(folder):
    root, written = folder
    datamodule = ImageFolder(str(root), channels=3)
    assert (datamodule.in_channels, datamodule.image_size, datamodule.source_num_classes) == (3, SIZE, 3)
    assert datamodule.class_names == CLASS_NAMES
    ordered = sorted(written, key=lambda path: (path.parent.name, path.name))
    samples = _samples(datamodule)
    assert sorted(samples) == list(range(3 * PER_CLASS))
    for index, path in enumerate(ordered):
        class_number, pixels = written[path]
        assert int(samples[index]["label"]) == class_number
        expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        assert torch.equal(samples[index]["image"], expected), path
    assert len(datamodule.dataset("test")) == 3 * 2 and len(datamodule.dataset("val")) == 3  # 20 % / 10 % per class


def test_grayscale_is_the_itu_r_601_luma_of_the_rgb_files(folder):
    root, written = folder
    samples = _samples(ImageFolder(str(root), channels=1))
    ordered = sorted(written, key=lambda path: (path.parent.name, path.name))
    for index, path in enumerate(ordered):
        pixels = torch.from_numpy(written[path][1]).double()
        luma = (pixels[..., 0] * 299 + pixels[..., 1] * 587 + pixels[..., 2] * 114) / 1000
        image = samples[index]["image"]
        assert image.shape == (1, SIZE, SIZE)
        assert (image[0].double() * 255 - luma).abs().max() <= 0.5 + 1e-6  # PIL rounds the same sum to an integer


def test_image_size_centre_crops_and_resizes_to_a_square(tmp_path: Path):
    wide = np.random.default_rng(0).integers(0, 256, (SIZE, 40, 3), dtype=np.uint8)  # 40 wide, 28 high
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(wide).save(tmp_path / name / "wide.png")
    with pytest.raises(ValueError, match=r"wide\.png is 40x28 pixels, not square: pass image_size="):
        _ = ImageFolder(str(tmp_path)).image_size
    cropped = ImageFolder(str(tmp_path), image_size=SIZE, val_fraction=0.0, test_fraction=0.0)
    expected = torch.from_numpy(wide[:, 6:34]).permute(2, 0, 1).float() / 255
    assert torch.equal(cropped.dataset("train")[0]["image"], expected)
    small = ImageFolder(str(tmp_path), image_size=14, val_fraction=0.0, test_fraction=0.0)
    assert small.image_size == 14 and small.dataset("train")[0]["image"].shape == (3, 14, 14)


def test_an_image_of_another_size_is_refused_without_image_size(folder):
    root, _ = folder
    odd = root / "mango" / "img99.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(odd)
    datamodule = ImageFolder(str(root))
    datamodule.setup()
    index = datamodule._source.paths.index(odd)
    split = next(split for split in ("train", "val", "test") if index in datamodule.dataset(split).indices)
    position = datamodule.dataset(split).indices.tolist().index(index)
    with pytest.raises(ValueError, match=r"img99\.png is 32x32 pixels, expected 28x28 .*image_size"):
        datamodule.dataset(split)[position]
    resized = ImageFolder(str(root), image_size=SIZE)
    assert resized.dataset(split)[position]["image"].shape == (3, SIZE, SIZE)


def test_missing_root_no_classes_empty_class_corrupt_file_and_bad_channels(folder, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"ImageFolder: expected these files under .*nowhere"):
        _ = ImageFolder(str(tmp_path / "nowhere")).source_num_classes
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "image.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no class sub-folders"):
        ImageFolder(str(tmp_path / "flat")).setup()
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        ImageFolder(str(tmp_path), channels=2)
    root, _ = folder
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty holds no image files"):
        ImageFolder(str(root), image_size=SIZE).setup()
    (root / "empty" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    valid = (root / "apple" / "img00.png").read_bytes()
    (root / "apple" / "img01.png").write_bytes(valid[: len(valid) // 2])  # truncated
    datamodule = ImageFolder(str(root), image_size=SIZE)
    datamodule.setup()
    paths = datamodule._source.paths
    for name in ("empty/broken.png", "apple/img01.png"):
        with pytest.raises(ValueError, match=rf"{name}: not a readable image file"):
            datamodule._source.load_image(paths.index(root / name))


def _fit_config(root: Path, checkpoints: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": tiny_trainer(),
        "checkpoint": {"dirpath": str(checkpoints)},
        "model": {
            "class_path": "cfx.tasks.ClassificationTask",
            "init_args": {"network": {"class_path": "cfx.nn.SmallCNN", "init_args": {"channels": [4], "hidden": 8}}},
        },
        "data": {
            "class_path": "cfx.data.ImageFolder",
            "init_args": {"root": str(root), "channels": 1, "batch_size": 8},
        },
    }


def test_cfx_fit_then_cfx_test_explains_the_folder_with_jsma(folder, tmp_path: Path, monkeypatch):
    root, _ = folder
    monkeypatch.chdir(tmp_path)
    fit_config = tmp_path / "classifier.yaml"
    fit_config.write_text(yaml.safe_dump(_fit_config(root, tmp_path / "ckpt")))
    main(["fit", "-c", str(fit_config)])
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    classifier = load_classifier(checkpoint)
    assert (classifier.in_channels, classifier.num_classes, classifier.image_size) == (1, 3, SIZE)
    explain_config = {
        "seed_everything": 0,
        "trainer": tiny_trainer(),
        "model": {
            "class_path": "cfx.tasks.CounterfactualTask",
            "init_args": {
                "classifier": str(checkpoint),
                "explainer": {"class_path": "cfx.counterfactual.JSMA", "init_args": {"max_iterations": 10}},
                "targets": "others",
                "max_queries": 4,
                "output_dir": str(tmp_path / "out"),
            },
        },
        "data": {
            "class_path": "cfx.data.ImageFolder",
            "init_args": {"root": str(root), "channels": 1, "eval_batch_size": 3},
        },
    }
    config = tmp_path / "jsma.yaml"
    config.write_text(yaml.safe_dump(explain_config))
    main(["test", "-c", str(config)])
    results = open_results(tmp_path / "out")
    queries = ImageFolder(str(root), channels=1).dataset("test").indices[:4]
    assert len(results["index"]) == 4 * 2  # every other class of 3, for each of the 4 queries
    assert sorted(set(results["index"].tolist())) == sorted(queries.tolist())
    assert results.images("counterfactuals").shape == (8, 1, SIZE, SIZE) and results["iterations"].max() <= 10
