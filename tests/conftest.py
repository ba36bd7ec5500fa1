"""Shared fixtures: tiny data written in the real on-disk layouts."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_jpeg


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def idx_arrays(n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }


@pytest.fixture
def debian_fashion_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Gzipped IDX files flat in one folder, as Debian's dataset-fashion-mnist installs them."""
    arrays = idx_arrays()
    for name, array in arrays.items():
        write_idx(tmp_path / "fashion" / f"{name}.gz", array)
    return tmp_path / "fashion", arrays


@pytest.fixture
def torchvision_mnist_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Plain IDX files in torchvision's layout: root/MNIST/raw/<name>."""
    arrays = idx_arrays(seed=1)
    for name, array in arrays.items():
        write_idx(tmp_path / "mnist" / "MNIST" / "raw" / name, array)
    return tmp_path / "mnist", arrays


CELEBA_ATTRIBUTES = [f"Attr_{i}" for i in range(38)] + ["Smiling", "Young"]


@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    """Twelve 218 x 178 JPEGs with the attribute and partition files of torchvision's CelebA layout."""
    root = tmp_path / "celeba_root"
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    rows, partitions = [], []
    for i in range(12):
        name = f"{i + 1:06d}.jpg"
        write_jpeg(
            torch.randint(0, 256, (3, 218, 178), dtype=torch.uint8, generator=generator),
            str(folder / "img_align_celeba" / name),
        )
        values = ["1" if (i + j) % 3 == 0 else "-1" for j in range(40)]
        values[38] = "1" if i % 2 else "-1"
        rows.append(f"{name} " + " ".join(values))
        partitions.append(f"{name} {0 if i < 8 else 1 if i < 10 else 2}")
    (folder / "list_attr_celeba.txt").write_text(
        f"{len(rows)}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + "\n".join(rows) + "\n"
    )
    (folder / "list_eval_partition.txt").write_text("\n".join(partitions) + "\n")
    return root


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    """Twenty-one 45 x 60 JPEGs (three per class) and the task-3 ground-truth CSV."""
    root = tmp_path / "isic"
    (root / "ISIC2018_Task3_Training_Input").mkdir(parents=True)
    (root / "ISIC2018_Task3_Training_GroundTruth").mkdir()
    lines = ["image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"]
    for i in range(21):
        name = f"ISIC_{24306 + i:07d}"
        write_jpeg(
            torch.full((3, 45, 60), 10 * i, dtype=torch.uint8),
            str(root / "ISIC2018_Task3_Training_Input" / f"{name}.jpg"),
        )
        one_hot = ["1.0" if c == i % 7 else "0.0" for c in range(7)]
        lines.append(",".join([name, *one_hot]))
    (root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv").write_text(
        "\n".join(lines) + "\n"
    )
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep EmbeddedMNIST's .npz cache in one session-wide temporary folder."""
    monkeypatch.setenv("CFX_CACHE", str(tmp_path_factory.getbasetemp() / "cfx_cache"))


@pytest.fixture(autouse=True)
def _fresh_rendezvous_port() -> Iterator[None]:
    """Let every test's DDP run pick its own free port.

    Lightning's ``ddp_spawn`` launcher writes ``MASTER_PORT`` into this process's environment and every later run
    reuses it; a run could then meet a leftover process of an earlier test on that port.
    """
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    yield
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
