"""Morpho-MNIST morphometrics (Castro et al. 2019): thickness, slant, width, height, length and area of digits.

The measurements follow Morpho-MNIST's definitions. Each image is upsampled x4 as ``skimage.transform.
pyramid_expand`` does (cubic spline, then a Gaussian of sigma 4/3 upsampled pixels) and clipped to [0, 1] (as
Morpho-MNIST's uint8 storage of the upsampled image clips it, without its 1/255 quantisation), binarised at
``min + 0.5 (max - min)`` and skeletonised by ``skimage.morphology.medial_axis`` with its distance map. Then,
in pixels of the original resolution:

- thickness: ``2 * mean(distance map on the skeleton) / 4``;
- slant: ``arctan(-u11 / u02)`` from the grey-level central moments of the upsampled image (``x`` = column,
  ``y`` = row, counted downwards), so a digit whose top leans to the right (italic) has a positive slant;
- width: the extent holding the central 98 % of the grey-level mass (1 % left out on each side) measured
  horizontally along the slant's shear lines ``x - (u11 / u02) (y - centroid y)``, / 4;
- height: the same extent measured vertically, / 4;
- length: the skeleton's length, each pair of neighbouring skeleton pixels adding 1 (horizontal / vertical
  neighbours) or sqrt 2 (diagonal ones), / 4;
- area: the number of binarised pixels / 16.

A constant image (e.g. blank) has no stroke and measures 0 on all six.

Everything but the skeleton is computed for a whole batch at once (in chunks of :data:`CHUNK_IMAGES`, which
bound memory; no value depends on the batch). The medial axis is a per-image algorithm, so :func:`measure`
loops over the images for it: the same steps as ``medial_axis(binary, return_distance=True, rng=SKELETON_SEED)``
with its image-independent lookup tables built once (``medial_axis`` rebuilds them on every call, ~20 ms) and
its compiled removal pass (skimage's private ``_skeletonize_loop``; the tests check the result against
``medial_axis``). The 5,000 embedded digits take about 10 s on one core. A DataModule measures its data set once
and caches the values (:func:`cached_morphometrics`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import gaussian
from skimage.morphology._skeletonize import _skeletonize_loop  # medial_axis's compiled removal pass
from skimage.transform import resize
from torch import Tensor

from cfx.io import atomic_path

MORPHOMETRIC_NAMES = ("thickness", "slant", "width", "height", "length", "area")
MORPHOMETRIC_ATTRIBUTE_NAMES = ("thick", "slanted", "wide", "tall", "long", "large")
SCALE = 4  # upsampling factor of the sub-pixel analysis
THRESHOLD = 0.5  # binarisation level, as a fraction of the upsampled image's range
BOUND_FRACTION = 0.02  # mass left out of the width / height extent, half on each side
SKELETON_SEED = 42  # medial_axis breaks ties in a random order: a fixed seed makes skeletons reproducible
CHUNK_IMAGES = 256  # images upsampled at once (bounds memory; results do not depend on it)
VERSION = 1  # part of the cache key: bump when a definition above changes
# Each skeleton pixel counts its neighbours to the right and in the row below, so every neighbouring pair once.
_NEIGHBOUR_STEPS = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [np.sqrt(2.0), 1.0, np.sqrt(2.0)]])


@functools.lru_cache(maxsize=8)
def _axis_operators(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(SCALE * size, size)`` cubic resize and ``(SCALE * size,) * 2`` Gaussian smoothing of one image axis.

    ``pyramid_expand`` resizes by a cubic spline, clips the result to the input's range and smooths it with a
    Gaussian; the resize and the smoothing are linear and separable, so their action on one axis is read off
    by applying them to unit column images.
    """
    unit_columns = np.eye(size)[:, :, None]
    resize_matrix = np.stack(
        [
            resize(c, (SCALE * size, 1), order=3, mode="reflect", clip=False, anti_aliasing=False)[:, 0]
            for c in unit_columns
        ],
        axis=1,
    )
    sigma = 2 * SCALE / 6  # pyramid_expand's default
    smoothing_matrix = np.stack(
        [gaussian(c[:, None], sigma=sigma, mode="reflect")[:, 0] for c in np.eye(SCALE * size)], axis=1
    )
    return resize_matrix, smoothing_matrix


def upsample(images: np.ndarray) -> np.ndarray:
    """Morpho-MNIST's x4 upsampling of a batch: ``skimage.transform.pyramid_expand(image, 4, order=3)`` per image.

    Args:
        images: ``(N, H, W)`` float images.

    Returns:
        ``(N, 4H, 4W)`` float64 images.
    """
    images = images.astype(np.float64)
    (resize_rows, smooth_rows), (resize_columns, smooth_columns) = map(_axis_operators, images.shape[1:])
    resized = resize_rows @ images @ resize_columns.T
    resized = np.clip(resized, images.min((1, 2))[:, None, None], images.max((1, 2))[:, None, None])
    return smooth_rows @ resized @ smooth_columns.T


@functools.lru_cache(maxsize=1)
def _neighbourhood_tables() -> tuple[np.ndarray, np.ndarray]:
    """``medial_axis``'s two tables over the 512 binary 3 x 3 neighbourhoods (bit ``3 r + c`` = pixel ``(r, c)``).

    ``keep``: the centre is foreground and either removing it changes the number of 8-connected components of
    the neighbourhood or the neighbourhood holds fewer than 3 foreground pixels. ``cornerness``: the number of
    background pixels. ``medial_axis`` rebuilds both on every call (about 20 ms); they do not depend on the image.
    """
    patterns = ((np.arange(512)[:, None] >> np.arange(9)) & 1).astype(bool).reshape(512, 3, 3)
    hollow = patterns.copy()
    hollow[:, 1, 1] = False
    eight_connected = np.ones((3, 3), dtype=bool)
    components = [ndimage.label(pattern, eight_connected)[1] for pattern in patterns]
    components_without_centre = [ndimage.label(pattern, eight_connected)[1] for pattern in hollow]
    foreground = patterns.sum((1, 2))
    keep = patterns[:, 1, 1] & ((np.array(components) != np.array(components_without_centre)) | (foreground < 3))
    return keep.astype(np.uint8), 9 - foreground


def _neighbourhood_codes(binary: np.ndarray) -> np.ndarray:
    """The 3 x 3 neighbourhood code of every pixel of ``(N, H, W)`` binary images (outside the image = background)."""
    height, width = binary.shape[1:]
    padded = np.pad(binary, ((0, 0), (1, 1), (1, 1))).astype(np.int64)
    codes = np.zeros(binary.shape, dtype=np.int64)
    for row in range(3):
        for column in range(3):
            codes += padded[:, row : row + height, column : column + width] << (3 * row + column)
    return codes


def _medial_axis(binary: np.ndarray, cornerness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``skimage.morphology.medial_axis(binary, return_distance=True, rng=SKELETON_SEED)`` of one image.

    The same steps with the image-independent tables built once: pixels are removed in one pass, in the order
    of increasing distance to the background, then decreasing cornerness, then a seeded random tie-breaker,
    unless the ``keep`` table says removing them would break the stroke. ``cornerness`` is the per-pixel
    cornerness of ``binary``.
    """
    keep, _ = _neighbourhood_tables()
    distance = ndimage.distance_transform_edt(binary)
    rows, columns = np.nonzero(binary)
    tiebreaker = np.random.default_rng(SKELETON_SEED).permutation(len(rows))
    order = np.lexsort((tiebreaker, cornerness[rows, columns], distance[rows, columns])).astype(np.int32)
    skeleton = np.ascontiguousarray(binary, dtype=np.uint8)
    _skeletonize_loop(skeleton, rows.astype(np.intp), columns.astype(np.intp), order, keep)
    return skeleton.astype(bool), distance


def _interpolate_rows(cdf: np.ndarray, level: float) -> np.ndarray:
    """``np.interp(level, cdf[i], arange(L))`` for every row ``i`` of a non-decreasing ``(N, L)`` table."""
    length = cdf.shape[1]
    last_below = (cdf <= level).sum(1) - 1  # the last position whose value is <= level
    left = np.clip(last_below, 0, length - 2)
    rows = np.arange(len(cdf))
    low, high = cdf[rows, left], cdf[rows, left + 1]
    inside = (last_below >= 0) & (last_below < length - 1)
    step = np.where(inside, (level - low) / np.where(inside, high - low, 1.0), 0.0)
    return np.where(last_below < 0, 0.0, np.where(inside, left + step, length - 1.0))


def _slant_and_extent(hires: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slant, width and height (upsampled pixels) of ``(N, H, W)`` non-negative images with positive mass."""
    count, height, width = hires.shape
    x, y = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    # Reductions by elementwise products and sums (not BLAS products), so no value depends on the batch.
    row_mass, column_mass = hires.sum(2), hires.sum(1)
    mass = row_mass.sum(1)
    mean_x, mean_y = (column_mass * x).sum(1) / mass, (row_mass * y).sum(1) / mass
    u02 = (row_mass * y**2).sum(1) / mass - mean_y**2
    u11 = (hires * (y[:, None] * x[None, :])).sum((1, 2)) / mass - mean_x * mean_y
    shear = np.where(u02 > 0, u11 / np.where(u02 > 0, u02, 1.0), 0.0)
    # Horizontal: the mass whose sheared position x + 0.5 - shear (y - mean_y) lies left of t, for t = 0 .. W - 1.
    sheared = x[None, None, :] + 0.5 - shear[:, None, None] * (y[None, :, None] - mean_y[:, None, None])
    first_t = np.clip(np.floor(sheared) + 1, 0, width).astype(np.int64)  # smallest integer t > sheared position
    bucket = first_t + (width + 1) * np.arange(count)[:, None, None]
    mass_by_t = np.bincount(bucket.ravel(), weights=hires.ravel(), minlength=count * (width + 1))
    horizontal_cdf = np.cumsum(mass_by_t.reshape(count, width + 1), axis=1)[:, :width] / mass[:, None]
    # Vertical: the mass of the rows above t, for t = 0 .. H - 1.
    vertical_cdf = np.concatenate([np.zeros((count, 1)), np.cumsum(row_mass, 1)[:, :-1]], 1) / mass[:, None]
    tail = BOUND_FRACTION / 2
    extent_width = _interpolate_rows(horizontal_cdf, 1 - tail) - _interpolate_rows(horizontal_cdf, tail)
    extent_height = _interpolate_rows(vertical_cdf, 1 - tail) - _interpolate_rows(vertical_cdf, tail)
    return np.arctan(-shear), extent_width, extent_height


def _measure_chunk(images: np.ndarray) -> np.ndarray:
    """The ``(N, 6)`` morphometrics of ``(N, H, W)`` images in [0, 1]."""
    hires = np.clip(upsample(images), 0.0, 1.0)
    low, high = hires.min((1, 2)), hires.max((1, 2))
    measurable = high > low
    binary = hires >= (low + THRESHOLD * (high - low))[:, None, None]
    binary &= measurable[:, None, None]
    skeleton = np.zeros_like(binary)
    distance = np.zeros(hires.shape)
    cornerness = _neighbourhood_tables()[1][_neighbourhood_codes(binary)]
    for i in np.flatnonzero(measurable):  # the medial axis is per image by nature
        skeleton[i], distance[i] = _medial_axis(binary[i], cornerness[i])
    skeleton_pixels = skeleton.sum((1, 2))
    thickness = 2 * (distance * skeleton).sum((1, 2)) / np.maximum(skeleton_pixels, 1) / SCALE
    neighbours = ndimage.correlate(skeleton.astype(np.float64), _NEIGHBOUR_STEPS[None], mode="constant")
    length = (neighbours * skeleton).sum((1, 2)) / SCALE
    area = binary.sum((1, 2)) / SCALE**2
    values = np.zeros((len(images), len(MORPHOMETRIC_NAMES)))
    if measurable.any():
        slant, width, height = _slant_and_extent(hires[measurable])
        values[measurable, 1] = slant
        values[measurable, 2] = width / SCALE
        values[measurable, 3] = height / SCALE
    values[:, 0], values[:, 4], values[:, 5] = thickness, length, area
    return values


def measure(images: Tensor) -> Tensor:
    """Morpho-MNIST morphometrics of grey images (data set digits or generated ones).

    Images are measured independently (the result of one image does not depend on the others in the batch).
    A constant image (e.g. blank) has no stroke: all six values are 0. See the module docstring for the
    definitions.

    Args:
        images: ``(N, 1, H, W)`` float images with values in [0, 1].

    Returns:
        ``(N, 6)`` float64 values in the order of :data:`MORPHOMETRIC_NAMES`, in pixels of the input resolution
        (slant in radians).

    Raises:
        ValueError: ``images`` is not a floating ``(N, 1, H, W)`` tensor with finite values in [0, 1].
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, Tensor) else ""
        raise ValueError(f"morphometrics: expected float grey images of shape N x 1 x H x W, got {dtype} {shape}")
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise ValueError(f"morphometrics: images must be at least 2 x 2 pixels, got {tuple(images.shape[2:])}")
    array = images.detach()[:, 0].to("cpu", torch.float64).numpy()
    if not np.isfinite(array).all() or array.min(initial=0.0) < 0 or array.max(initial=0.0) > 1:
        raise ValueError("morphometrics: image values must be finite and lie in [0, 1]")
    values = np.zeros((len(array), len(MORPHOMETRIC_NAMES)))
    for start in range(0, len(array), CHUNK_IMAGES):
        values[start : start + CHUNK_IMAGES] = _measure_chunk(array[start : start + CHUNK_IMAGES])
    return torch.from_numpy(values)


def images_digest(images: Tensor) -> str:
    """A hex digest of a uint8 image tensor's shape and content, with the definitions' version: the cache key."""
    digest = hashlib.sha256(f"morphometrics-v{VERSION}-{tuple(images.shape)}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_morphometrics(images: Tensor, cache_dir: str | Path) -> Tensor:
    """:func:`measure` of a whole data set's uint8 images, read from / written to a cache file in ``cache_dir``.

    The file is ``morphometrics-<digest>.npz``, named by a digest of the images (:func:`images_digest`), so a
    changed data set never reads another one's values. It is written atomically; a cache file that cannot be
    read or holds the wrong shape (e.g. truncated) is recomputed and replaced.

    Args:
        images: ``(N, 1, H, W)`` uint8 images.
        cache_dir: the folder of the cache file (created when missing).

    Returns:
        ``(N, 6)`` float64 values (:data:`MORPHOMETRIC_NAMES`).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"morphometrics: expected uint8 images N x C x H x W, got {images.dtype} {tuple(images.shape)}"
        )
    path = Path(cache_dir) / f"morphometrics-{images_digest(images)[:32]}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                values = stored["values"]
            if values.shape == (len(images), len(MORPHOMETRIC_NAMES)) and np.isfinite(values).all():
                return torch.from_numpy(values.astype(np.float64))
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable: recomputed and replaced below
    values = measure(images.float().div_(255.0))
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, values=values.numpy(), names=np.array(MORPHOMETRIC_NAMES))
    return values


def binarise(values: Tensor, labels: Tensor, reference: Tensor) -> Tensor:
    """Binarised attributes: 1 where a value is above the median of its class among the ``reference`` samples.

    A class with no reference sample (e.g. dropped from the splits) is compared with the median of all its
    samples.

    Args:
        values: ``(N, K)`` continuous values.
        labels: ``(N,)`` integer class labels.
        reference: ``(N,)`` bool, the samples the medians are taken over (a DataModule's training split).

    Returns:
        ``(N, K)`` float32 of 0 / 1.
    """
    if values.ndim != 2 or labels.shape != (len(values),) or reference.shape != (len(values),):
        raise ValueError(
            f"binarise: expected values N x K with N labels and N reference flags, got {tuple(values.shape)}, "
            f"{tuple(labels.shape)} and {tuple(reference.shape)}"
        )
    attributes = torch.zeros(values.shape, dtype=torch.float32)
    for label in torch.unique(labels).tolist():  # one median per class (a handful), not a loop over samples
        in_class = labels == label
        pool = in_class & reference if (in_class & reference).any() else in_class
        median = torch.from_numpy(np.median(values[pool].numpy(), axis=0))
        attributes[in_class] = (values[in_class] > median).float()
    return attributes
