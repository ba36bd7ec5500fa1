"""DataModules. Every sample is a dict with ``image`` (float C x H x W in [0, 1]), ``label`` and ``index``."""

from cfx.data.base import ImageDataModule, LabelledImages, TensorImages, stratified_split
from cfx.data.embedded_mnist import EmbeddedMNIST
from cfx.data.folders import ISIC2018, CelebA
from cfx.data.hdf5 import HDF5, pack_hdf5
from cfx.data.idx import MNIST, FashionMNIST, read_idx
from cfx.data.image_folder import ImageFolder
from cfx.data.synthetic import SyntheticImages

__all__ = [
    "HDF5",
    "ISIC2018",
    "MNIST",
    "CelebA",
    "EmbeddedMNIST",
    "FashionMNIST",
    "ImageDataModule",
    "ImageFolder",
    "LabelledImages",
    "SyntheticImages",
    "TensorImages",
    "pack_hdf5",
    "read_idx",
    "stratified_split",
]
