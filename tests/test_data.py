from __future__ import annotations

import numpy as np
import pytest
import torch

from cfx.data import (
    HDF5,
    ISIC2018,
    MNIST,
    CelebA,
    EmbeddedMNIST,
    FashionMNIST,
    SyntheticImages,
    pack_hdf5,
    read_idx,
)
from cfx.data.base import TEST, TRAIN, VAL, UnpaddedDistributedSampler, stratified_split


def _all_samples(datamodule, split):
    dataset = datamodule.dataset(split)
    return [dataset[i] for i in range(len(dataset))]


def test_stratified_split_proportions_determinism_and_disjointness():
    labels = torch.arange(1000) % 4
    codes = stratified_split(labels, 0.1, 0.2, seed=3)
    for cls in range(4):
        in_class = codes[labels == cls]
        assert (in_class == TRAIN).sum() == 175 and (in_class == VAL).sum() == 25 and (in_class == TEST).sum() == 50
    assert torch.equal(codes, stratified_split(labels, 0.1, 0.2, seed=3))
    assert not torch.equal(codes, stratified_split(labels, 0.1, 0.2, seed=4))
    with pytest.raises(ValueError, match="sum < 1"):
        stratified_split(labels, 0.6, 0.5, seed=0)


def test_embedded_mnist_is_real_balanced_and_cached(tmp_path):
    datamodule = EmbeddedMNIST(cache_dir=str(tmp_path))
    datamodule.setup()
    sizes = {split: len(datamodule.dataset(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    assert (tmp_path / "embedded_mnist_5k.npz").is_file()
    test = datamodule.dataset("test")
    labels = datamodule._source.labels[test.indices]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 100))
    sample = test[0]
    assert sample["image"].shape == (1, 28, 28) and sample["image"].dtype == torch.float32
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1 and sample["image"].max() > 0.5
    indices = torch.cat([datamodule.dataset(s).indices for s in ("train", "val", "test")])
    assert torch.equal(indices.sort().values, torch.arange(5000))
    # Real digits: the mean image of the 1s is darker than the mean image of the 0s (fewer ink pixels).
    images = datamodule._source.images.float()
    all_labels = datamodule._source.labels
    assert images[all_labels == 1].mean() < images[all_labels == 0].mean()
    # A second module reads the cache and sees the same data; a corrupt cache is rebuilt.
    again = EmbeddedMNIST(cache_dir=str(tmp_path))
    assert torch.equal(again.load_source().images, datamodule._source.images)
    (tmp_path / "embedded_mnist_5k.npz").write_bytes(b"not an npz")
    assert torch.equal(EmbeddedMNIST(cache_dir=str(tmp_path)).load_source().labels, all_labels)


def test_class_subset_relabels_and_rejects_unknown_classes(tmp_path):
    datamodule = EmbeddedMNIST(cache_dir=str(tmp_path), classes=[8, 3])
    datamodule.setup()
    assert datamodule.num_classes == 2
    test = datamodule.dataset("test")
    source_labels = datamodule._source.labels[test.indices]
    yielded = torch.stack([test[i]["label"] for i in range(len(test))])
    assert set(source_labels.tolist()) == {3, 8}
    assert torch.equal(yielded, (source_labels == 3).long())
    with pytest.raises(ValueError, match=r"classes \[11\] are not classes of EmbeddedMNIST"):
        EmbeddedMNIST(cache_dir=str(tmp_path), classes=[3, 11]).setup()
    with pytest.raises(ValueError, match="at least two distinct"):
        EmbeddedMNIST(classes=[3, 3])


def test_idx_reader_debian_and_torchvision_layouts(debian_fashion_root, torchvision_mnist_root):
    root, arrays = debian_fashion_root
    np.testing.assert_array_equal(read_idx(root / "train-images-idx3-ubyte.gz"), arrays["train-images-idx3-ubyte"])
    fashion = FashionMNIST(root=str(root), val_fraction=0.1)
    fashion.setup()
    assert (
        len(fashion.dataset("test")) == 20 and len(fashion.dataset("val")) == 10 and len(fashion.dataset("train")) == 50
    )  # 1 of 6 per class
    first_test = fashion.dataset("test")[0]
    assert int(first_test["index"]) == 60
    np.testing.assert_allclose(first_test["image"][0].numpy() * 255, arrays["t10k-images-idx3-ubyte"][0], atol=1e-3)
    root, arrays = torchvision_mnist_root
    mnist = MNIST(root=str(root))
    mnist.setup()
    train = mnist.dataset("train")[0]
    np.testing.assert_allclose(
        train["image"][0].numpy() * 255, arrays["train-images-idx3-ubyte"][int(train["index"])], atol=1e-3
    )


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (lambda root: MNIST(root=root), "t10k-labels-idx1-ubyte"),
        (lambda root: FashionMNIST(root=root), "FashionMNIST/raw/train-images-idx3-ubyte"),
        (lambda root: CelebA(root=root), "celeba/list_attr_celeba.txt"),
        (lambda root: ISIC2018(root=root), "ISIC2018_Task3_Training_GroundTruth.csv"),
    ],
)
def test_missing_files_name_what_was_expected_and_where(tmp_path, module, expected):
    with pytest.raises(FileNotFoundError) as error:
        module(str(tmp_path / "nowhere")).setup()
    assert expected in str(error.value) and str(tmp_path / "nowhere") in str(error.value)


def test_celeba_layout_target_attribute_and_partition(celeba_root):
    datamodule = CelebA(root=str(celeba_root), target_attribute="Smiling", image_size=32)
    datamodule.setup()
    assert (
        len(datamodule.dataset("train")),
        len(datamodule.dataset("val")),
        len(datamodule.dataset("test")),
    ) == (8, 2, 2)
    sample = datamodule.dataset("val")[1]
    assert sample["image"].shape == (3, 32, 32)
    index = int(sample["index"])
    assert index == 9 and int(sample["label"]) == 1  # odd rows smile in the fixture
    assert sample["attributes"].shape == (40,) and float(sample["attributes"][39]) == float((index + 39) % 3 == 0)
    pair = CelebA(root=str(celeba_root), target_attribute=["Smiling", "Young"], image_size=16)
    pair.setup()
    assert pair.num_classes == 4
    sample = pair.dataset("val")[1]
    assert int(sample["label"]) == 1 + 2 * int((9 + 39) % 3 == 0)
    with pytest.raises(ValueError, match="no attribute 'Grinning'"):
        CelebA(root=str(celeba_root), target_attribute="Grinning").setup()


def test_isic_layout_one_hot_labels_and_stratified_split(isic_root):
    datamodule = ISIC2018(root=str(isic_root), image_size=24, val_fraction=1 / 3)
    datamodule.setup()
    val = datamodule.dataset("val")
    assert len(val) == 7 and len(datamodule.dataset("train")) == 14
    labels = torch.stack([val[i]["label"] for i in range(7)])
    assert sorted(labels.tolist()) == list(range(7))
    sample = val[0]
    assert sample["image"].shape == (3, 24, 24)
    assert torch.allclose(
        sample["image"], torch.full_like(sample["image"], 10 * int(sample["index"]) / 255), atol=3 / 255
    )
    assert len(datamodule.dataset("test")) == 7  # no test split by default: test reads the 10 % hold-out


def test_isic_rejects_rows_without_exactly_one_class(isic_root):
    csv = isic_root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",1.0"  # row 0 is MEL; now also VASC
    csv.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="exactly one class"):
        ISIC2018(root=str(isic_root)).setup()


def test_hdf5_pack_round_trip_keeps_images_labels_and_splits(tmp_path, celeba_root):
    source = SyntheticImages(num_samples=90, num_classes=3, in_channels=2, image_size=8, classes=[2, 0])
    path = pack_hdf5(source, tmp_path / "packed.h5")
    assert not (tmp_path / "packed.h5.partial").exists()
    packed = HDF5(str(path), val_fraction=0.5)
    assert (packed.in_channels, packed.image_size, packed.num_classes) == (2, 8, 2)
    for split in ("train", "val", "test"):
        original, copy = _all_samples(source, split), _all_samples(packed, split)
        assert len(original) == len(copy) > 0
        for a, b in zip(original, copy, strict=True):
            assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
    celeba = CelebA(root=str(celeba_root), image_size=16)
    packed_celeba = HDF5(str(pack_hdf5(celeba, tmp_path / "celeba.h5")))
    assert torch.equal(
        _all_samples(packed_celeba, "test")[0]["attributes"], _all_samples(celeba, "test")[0]["attributes"]
    )


def test_hdf5_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        HDF5(str(tmp_path / "missing.h5"))
    import h5py

    with h5py.File(tmp_path / "nolabels.h5", "w") as handle:
        handle["images"] = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="needs 'images' and 'labels'"):
        HDF5(str(tmp_path / "nolabels.h5"))


def test_unpadded_sampler_reads_every_sample_exactly_once():
    dataset = list(range(11))
    shares = [list(UnpaddedDistributedSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shares, [])) == dataset
    assert [len(UnpaddedDistributedSampler(dataset, num_replicas=3, rank=r)) for r in range(3)] == [4, 4, 3]


def test_synthetic_images_are_deterministic_and_in_range():
    a, b = SyntheticImages(seed=5), SyntheticImages(seed=5)
    assert torch.equal(a.load_source().images, b.load_source().images)
    sample = a.dataset("train")[0]
    assert sample["image"].shape == (1, 16, 16) and 0 <= sample["image"].min() and sample["image"].max() <= 1


def test_cfx_pack_command_writes_a_datamodule(tmp_path, capsys):
    from cfx.data.hdf5 import pack_main

    output = tmp_path / "synthetic.h5"
    pack_main(
        [
            "--data",
            "cfx.data.SyntheticImages",
            "--data.num_samples=30",
            "--data.classes=[1, 2]",
            "--output",
            str(output),
        ]
    )
    assert "wrote" in capsys.readouterr().out
    packed = HDF5(str(output))
    assert packed.num_classes == 2 and len(packed.load_source()) == 20
