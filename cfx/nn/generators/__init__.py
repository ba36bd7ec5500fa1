"""Batched per-query image generators ("priors") of DISC: pixels + TV/L2, deep image prior, INR (pure torch)."""

from cfx.nn.generators.base import (
    BatchedGenerator,
    image_size_pair,
    squared_l2,
    total_variation,
)
from cfx.nn.generators.dip import DIPGenerator
from cfx.nn.generators.inr import INRGenerator, pixel_coordinates
from cfx.nn.generators.pixel import PixelGenerator
from cfx.nn.generators.reconstruction import GENERATORS, fit_reconstruction, make_generator

__all__ = [
    "GENERATORS",
    "BatchedGenerator",
    "DIPGenerator",
    "INRGenerator",
    "PixelGenerator",
    "fit_reconstruction",
    "image_size_pair",
    "make_generator",
    "pixel_coordinates",
    "squared_l2",
    "total_variation",
]
