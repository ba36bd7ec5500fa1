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
from cfx.data.base import TEST, TRAIN, VAL, ImageDataModule, TensorImages, UnpaddedDistributedSampler, stratified_split
from tests.distributed import run_distributed


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


class _CountingImages(TensorImages):
    """TensorImages that records which images were loaded."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.loaded: list[int] = []

    def load_image(self, index: int) -> torch.Tensor:
        self.loaded.append(index)
        return super().load_image(index)


class _GivenLabels(ImageDataModule):
    """A DataModule over 2 x 2 images with the given labels (3 source classes)."""

    in_channels, image_size, source_num_classes = 1, 2, 3

    def __init__(self, labels: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.labels = labels
        self.source: _CountingImages | None = None

    def load_source(self) -> _CountingImages:
        self.source = _CountingImages(torch.zeros(len(self.labels), 1, 2, 2, dtype=torch.uint8), self.labels)
        return self.source


def _write_hdf5(path, labels) -> str:
    import h5py

    with h5py.File(path, "w") as handle:
        handle["images"] = np.zeros((len(labels), 4, 4), np.uint8)
        handle["labels"] = np.asarray(labels)
    return str(path)


def test_hdf5_labels_outside_the_classes_are_one_error_naming_file_values_and_range(tmp_path):
    negative = _write_hdf5(tmp_path / "negative.h5", [0, 1, -1, 2, -1, -7])
    with pytest.raises(ValueError, match=r"negative\.h5: labels must be integers in 0\.\.2 .*3 label.*-7, -1$"):
        HDF5(negative)
    too_large = _write_hdf5(tmp_path / "large.h5", [0, 1, 2, 5])
    with pytest.raises(ValueError, match=r"large\.h5: labels must be integers in 0\.\.2 \(3 classes\).* 5$"):
        HDF5(too_large, num_classes=3)
    assert HDF5(too_large).num_classes == 6  # default: max(label) + 1
    fractional = _write_hdf5(tmp_path / "float.h5", [0.0, 1.5])
    with pytest.raises(ValueError, match=r"float\.h5: 'labels' must be a 1-D integer array, got float64"):
        HDF5(fractional)
    with pytest.raises(ValueError, match=r"empty\.h5: the HDF5 file holds no samples"):
        HDF5(_write_hdf5(tmp_path / "empty.h5", np.zeros(0, np.int64)))


def test_every_datamodule_checks_its_labels_against_its_classes():
    with pytest.raises(ValueError, match=r"_GivenLabels: labels must be integers in 0\.\.2 .*1 label.* 3$"):
        _GivenLabels(torch.tensor([0, 1, 2, 3, 0, 1])).setup()
    with pytest.raises(ValueError, match=r"_GivenLabels: labels must be integers in 0\.\.2 .* -1$"):
        _GivenLabels(torch.tensor([0, -1, 2, 1, 0, 1])).setup()
    with pytest.raises(ValueError, match="expected integer labels, got torch.float32"):
        _GivenLabels(torch.tensor([0.0, 1.0, 2.0])).setup()


def test_embedded_mnist_cache_dir_that_is_a_file_is_a_clear_error(tmp_path):
    cache_file = tmp_path / "cache"
    cache_file.write_text("not a folder")
    for cache_dir in (cache_file, cache_file / "below"):
        with pytest.raises(NotADirectoryError, match=rf"cache_dir {cache_dir} must be a folder, but {cache_file} is"):
            EmbeddedMNIST(cache_dir=str(cache_dir))


def test_limit_split_loads_only_the_first_samples_of_the_split():
    datamodule = _GivenLabels(torch.arange(60) % 3, eval_batch_size=4)
    datamodule.setup()
    test_indices = datamodule.dataset("test").indices
    datamodule.limit_split("test", 5)
    datamodule.source.loaded.clear()
    indices = torch.cat([batch["index"] for batch in datamodule.test_dataloader()])
    assert torch.equal(indices, test_indices[:5])
    assert datamodule.source.loaded == test_indices[:5].tolist()
    assert len(datamodule.dataset("test")) == len(test_indices) == 12  # the split itself is unchanged
    datamodule.limit_split("test", 1000)
    assert torch.equal(torch.cat([b["index"] for b in datamodule.test_dataloader()]), test_indices)
    datamodule.limit_split("test", 2)
    datamodule.limit_split("test", None)
    assert len(datamodule.test_dataloader().dataset) == 12
    for split, count, message in (
        ("tests", 2, "split must be one of"),
        ("val", 0, "positive integer"),
        ("val", 2.0, "positive integer"),
        ("val", True, "positive integer"),
    ):
        with pytest.raises(ValueError, match=message):
            datamodule.limit_split(split, count)


def _limited_test_shares(rank: int, world_size: int) -> list[int]:
    datamodule = _GivenLabels(torch.arange(60) % 3, eval_batch_size=2)
    datamodule.limit_split("test", 5)
    return torch.cat([batch["index"] for batch in datamodule.test_dataloader()]).tolist()


def test_limit_split_is_sharded_across_ranks_without_padding():
    expected = _GivenLabels(torch.arange(60) % 3).dataset("test").indices[:5].tolist()
    shares = run_distributed(_limited_test_shares)
    assert shares == [expected[0::2], expected[1::2]]


def test_training_order_is_a_pure_function_of_seed_and_epoch():
    datamodule = _GivenLabels(torch.arange(60) % 3, batch_size=8, shuffle_seed=11)
    train_indices = datamodule.dataset("train").indices

    def epoch_order(epoch: int) -> torch.Tensor:
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
        torch.manual_seed(epoch + 100)  # the global generator plays no part
        return torch.cat([batch["index"] for batch in loader])

    # DistributedSampler's documented order: randperm under the seed seed + epoch; drop_last drops 42 % 8 samples.
    assert len(train_indices) == 42
    for epoch in (0, 1, 5):
        reference = torch.randperm(42, generator=torch.Generator().manual_seed(11 + epoch))
        assert torch.equal(epoch_order(epoch), train_indices[reference][:40])
    assert not torch.equal(epoch_order(0), epoch_order(1))


def _training_shares(rank: int, world_size: int) -> list[int]:
    datamodule = _GivenLabels(torch.arange(60) % 3, batch_size=3, shuffle_seed=4)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(2)
    return torch.cat([batch["index"] for batch in loader]).tolist()


def test_training_order_under_ddp_shards_the_single_process_order():
    single = _training_shares(0, 1)
    shares = run_distributed(_training_shares)
    assert shares == [single[0::2], single[1::2]]  # 42 samples: 21 per rank, no padding needed
