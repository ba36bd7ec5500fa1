"""Morpho-MNIST morphometrics: closed forms on drawn strokes, a per-image reference, the cache, attributes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.morphology import medial_axis
from skimage.transform import pyramid_expand

from cfx.data import EmbeddedMNIST, SyntheticImages
from cfx.data import morphometrics as morpho
from cfx.data.morphometrics import (
    MORPHOMETRIC_ATTRIBUTE_NAMES,
    MORPHOMETRIC_NAMES,
    SKELETON_SEED,
    binarise,
    cached_morphometrics,
    measure,
    upsample,
)

THICKNESS, SLANT, WIDTH, HEIGHT, LENGTH, AREA = range(6)


def render(inside, size: int = 28, supersampling: int = 8) -> torch.Tensor:
    """A ``1 x 1 x size x size`` anti-aliased image of the shape ``inside(y, x)`` (pixel ``i`` spans ``[i, i + 1)``)."""
    coords = (np.arange(size * supersampling) + 0.5) / supersampling
    y, x = np.meshgrid(coords, coords, indexing="ij")
    coverage = inside(y, x).reshape(size, supersampling, size, supersampling).mean((1, 3))
    return torch.tensor(coverage, dtype=torch.float32)[None, None]


def reference_morphometrics(image: np.ndarray) -> np.ndarray:
    """Morpho-MNIST's definitions for one image, written out with skimage's own functions and loops."""
    hires = np.clip(pyramid_expand(image.astype(np.float64), upscale=4, order=3), 0, 1)
    binary = hires >= hires.min() + 0.5 * (hires.max() - hires.min())
    skeleton, distance = medial_axis(binary, return_distance=True, rng=SKELETON_SEED)
    points = set(zip(*np.nonzero(skeleton), strict=True))
    steps = ((0, 1, 1.0), (1, -1, np.sqrt(2)), (1, 0, 1.0), (1, 1, np.sqrt(2)))
    length = sum(weight for r, c in points for dr, dc, weight in steps if (r + dr, c + dc) in points)
    rows, columns = np.mgrid[0 : hires.shape[0], 0 : hires.shape[1]]
    mass = hires.sum()
    centre_x, centre_y = (columns * hires).sum() / mass, (rows * hires).sum() / mass
    u11 = ((columns - centre_x) * (rows - centre_y) * hires).sum() / mass
    u02 = ((rows - centre_y) ** 2 * hires).sum() / mass
    shear = u11 / u02
    horizontal = [hires[columns + 0.5 < t + shear * (rows - centre_y)].sum() / mass for t in range(hires.shape[1])]
    vertical = [hires[rows < t].sum() / mass for t in range(hires.shape[0])]
    left, right = np.interp([0.01, 0.99], horizontal, np.arange(hires.shape[1]))
    top, bottom = np.interp([0.01, 0.99], vertical, np.arange(hires.shape[0]))
    thickness = 2 * distance[skeleton].mean() / 4
    return np.array(
        [thickness, np.arctan(-shear), (right - left) / 4, (bottom - top) / 4, length / 4, binary.sum() / 16]
    )


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> EmbeddedMNIST:
    """Embedded MNIST with morphometric attributes, cached in the session's cache folder (measured once)."""
    datamodule = EmbeddedMNIST(cache_dir=str(tmp_path_factory.getbasetemp() / "cfx_cache"), attributes="morphometric")
    datamodule.setup()
    return datamodule


def test_upsampling_is_skimage_pyramid_expand_per_image():
    images = np.random.default_rng(0).random((3, 12, 9))
    expected = np.stack([pyramid_expand(image, upscale=4, order=3) for image in images])
    np.testing.assert_allclose(upsample(images), expected, atol=1e-12)


def test_measure_equals_the_per_image_definitions_on_real_digits_and_drawn_strokes(embedded):
    digits = embedded._source.images[:8].float() / 255
    bar_touching_border = torch.zeros(1, 1, 28, 28)
    bar_touching_border[..., 3:6, :] = 1
    sheared = render(lambda y, x: (abs(y - 14) <= 8) & (abs(x - 14 + 0.3 * (y - 14)) <= 2))
    images = torch.cat([digits, bar_touching_border, sheared])
    expected = np.stack([reference_morphometrics(image[0].numpy()) for image in images])
    np.testing.assert_allclose(measure(images).numpy(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("stroke", [2, 3, 4, 6])
def test_a_bar_crossing_the_image_has_its_width_as_thickness(stroke):
    horizontal = torch.zeros(1, 1, 28, 28)
    horizontal[..., 10 : 10 + stroke, :] = 1
    vertical = horizontal.transpose(2, 3)
    values = measure(torch.cat([horizontal, vertical]))
    # The binarised stroke is 4 * stroke upsampled pixels wide; twice the distance from its middle to the background
    # is that width, or one upsampled pixel (0.25 px) more when the middle falls on a pixel.
    np.testing.assert_allclose(values[:, THICKNESS].numpy(), [stroke, stroke], atol=0.3)
    assert torch.equal(values[0, [THICKNESS, AREA]], values[1, [THICKNESS, AREA]])  # transposing changes neither


@pytest.mark.parametrize("shear", [0.4, -0.25, 0.0])
def test_a_sheared_rectangle_has_slant_arctan_shear(shear):
    # Rows y count downwards; x = 14 - shear (y - 14) + e moves the top to the right for shear > 0 (an italic
    # digit), which Morpho-MNIST's slant arctan(-u11 / u02) reports as positive.
    image = render(lambda y, x: (abs(y - 14) <= 9) & (abs(x - 14 + shear * (y - 14)) <= 2))
    slant = float(measure(image)[0, SLANT])
    assert slant == pytest.approx(np.arctan(shear), abs=0.02)


def test_a_thicker_stroke_has_larger_thickness_and_area():
    def ring(half_width):
        return render(lambda y, x: abs(np.hypot(y - 14, x - 14) - 8) <= half_width)

    thin, thick = measure(torch.cat([ring(1.0), ring(2.0)]))
    assert thick[THICKNESS] > thin[THICKNESS] + 1 and thick[AREA] > 1.5 * thin[AREA]
    # An annulus of radii 8 -+ h has thickness 2 h and area 2 pi 8 (2 h).
    np.testing.assert_allclose([thin[THICKNESS], thick[THICKNESS]], [2.0, 4.0], atol=0.3)
    np.testing.assert_allclose([thin[AREA], thick[AREA]], [2 * np.pi * 8 * 2.0, 2 * np.pi * 8 * 4.0], rtol=0.05)


@pytest.mark.parametrize(("width", "height"), [(12, 16), (14, 20), (16, 12)])
def test_width_and_height_of_a_drawn_box(width, height):
    image = torch.zeros(1, 1, 28, 28)
    image[..., 4 : 4 + height, 6 : 6 + width] = 1
    values = measure(image)[0]
    # The central 98 % of a uniform box's mass spans 0.98 of each side. The upsampling (cubic ringing, then
    # smoothing) spreads each edge by about half a pixel, which holds less than 1 % of the mass of a box of 10 px
    # or more, so the extent stays within [0.98 w, w + 0.5].
    assert 0.98 * width <= values[WIDTH] <= width + 0.5
    assert 0.98 * height <= values[HEIGHT] <= height + 0.5
    assert values[SLANT] == pytest.approx(0.0, abs=1e-9)


def test_length_of_a_straight_line_crossing_the_image():
    # A faint third row shifts the stroke's middle onto an upsampled pixel row: the skeleton is that one row of
    # 4 * 28 pixels, i.e. 111 unit steps.
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 12:15, :] = torch.tensor([1.0, 1.0, 0.25])[:, None]
    assert float(measure(image)[0, LENGTH]) == pytest.approx(111 / 4, abs=1e-9)
    assert float(measure(image.transpose(2, 3))[0, LENGTH]) == pytest.approx(111 / 4, abs=1e-9)


def test_blank_images_give_zeros_and_results_do_not_depend_on_the_batch(monkeypatch, embedded):
    digits = embedded._source.images[:7].float() / 255
    images = torch.cat([digits[:3], torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 0.5), digits[3:]])
    values = measure(images)
    assert torch.equal(values[3], torch.zeros(6)) and torch.equal(values[4], torch.zeros(6))
    assert values.dtype == torch.float64 and values.shape == (9, 6) and torch.isfinite(values).all()
    monkeypatch.setattr(morpho, "CHUNK_IMAGES", 2)
    assert torch.equal(measure(images), values)
    assert torch.equal(measure(images[5:6]), values[5:6])


def test_measure_rejects_what_is_not_grey_images_in_unit_range():
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        measure(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        measure(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        measure(torch.full((1, 1, 28, 28), 1.5))


def test_cache_is_reused_for_the_same_images_only_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    images = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    first = cached_morphometrics(images, tmp_path)
    (cache,) = tmp_path.glob("morphometrics-*.npz")
    calls = []
    monkeypatch.setattr(morpho, "measure", lambda x: calls.append(len(x)) or torch.zeros(len(x), 6))
    assert torch.equal(cached_morphometrics(images, tmp_path), first) and calls == []  # a hit: nothing measured
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    cached_morphometrics(changed, tmp_path)
    assert calls == [4] and len(list(tmp_path.glob("morphometrics-*.npz"))) == 2  # a changed data set: measured
    cache.write_bytes(b"truncated")
    assert torch.equal(cached_morphometrics(images, tmp_path), torch.zeros(4, 6)) and calls == [4, 4]
    assert not list(tmp_path.glob(".*.tmp"))


def test_binarise_against_hand_computed_class_medians():
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [10.0], [20.0], [30.0], [5.0], [7.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    reference = torch.tensor([True, True, True, False, True, True, True, False, False])
    # Class 0 median over its reference samples (1, 2, 3) = 2; class 1: 20; class 2 has none: median of all = 6.
    expected = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.float32)[:, None]
    assert torch.equal(binarise(values, labels, reference), expected)


def test_embedded_mnist_samples_carry_morphometrics_and_binarised_attributes(embedded):
    assert embedded.attribute_names == MORPHOMETRIC_ATTRIBUTE_NAMES
    table = embedded.attribute_table()
    measured = embedded.morphometric_table()
    assert table.shape == (5000, 6) and table.dtype == torch.float32 and set(table.unique().tolist()) == {0.0, 1.0}
    assert measured.shape == (5000, 6) and measured.dtype == torch.float64
    for split in ("train", "test"):
        dataset = embedded.dataset(split)
        for position in (0, len(dataset) - 1):
            sample = dataset[position]
            index = int(sample["index"])
            assert sample["attributes"].shape == (6,) and sample["morphometrics"].shape == (6,)
            assert sample["morphometrics"].dtype == torch.float32
            assert torch.equal(sample["attributes"], table[index])
            assert torch.equal(sample["morphometrics"], measured[index].float())
    # Above the class-wise training median: about half of every class's training digits, per attribute.
    train = embedded.dataset("train").indices
    labels = embedded._source.labels[train]
    for label in range(10):
        share = table[train][labels == label].mean(0)
        assert ((share - 0.5).abs() <= 0.03).all(), (label, share)
    # Real digits are thicker than 1 px, upright-ish, taller than wide (Morpho-MNIST's MNIST ranges).
    mean = dict(zip(MORPHOMETRIC_NAMES, measured.mean(0).tolist(), strict=True))
    assert 2 < mean["thickness"] < 3.5 and abs(mean["slant"]) < 0.3 and 17 < mean["height"] < 21
    assert mean["width"] < mean["height"] and 60 < mean["area"] < 150


def test_training_split_defines_the_medians(embedded):
    other = EmbeddedMNIST(cache_dir=str(embedded.cache_dir), attributes="morphometric", split_seed=1)
    other.setup()
    assert torch.equal(other.morphometric_table(), embedded.morphometric_table())  # one cache for both
    assert not torch.equal(other.attribute_table(), embedded.attribute_table())
    values, labels = other.morphometric_table().numpy(), other._source.labels.numpy()
    in_train = np.zeros(len(labels), dtype=bool)
    in_train[other.dataset("train").indices.numpy()] = True
    for label in (0, 7):
        members = labels == label
        median = np.median(values[members & in_train], axis=0)
        expected = (values[members] > median).astype(np.float32)
        np.testing.assert_array_equal(other.attribute_table()[members].numpy(), expected)


def test_morphometric_attributes_on_other_data_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CFX_CACHE", str(tmp_path))
    grey = SyntheticImages(num_samples=30, image_size=12, attributes="morphometric")
    assert grey.attribute_names == MORPHOMETRIC_ATTRIBUTE_NAMES and grey._source is None  # known before setup
    grey.setup()
    assert grey.dataset("val")[0]["attributes"].shape == (6,) and list(tmp_path.glob("morphometrics-*.npz"))
    with pytest.raises(ValueError, match=r"attributes must be one of \(None, 'morphometric'\)"):
        SyntheticImages(attributes="morphometrics")
    with pytest.raises(ValueError, match="grey digits.*3 channels"):
        SyntheticImages(num_samples=30, in_channels=3, attributes="morphometric").setup()
    plain = SyntheticImages(num_samples=30)
    assert plain.attribute_names == ()
    with pytest.raises(ValueError, match="no attributes of its own"):
        plain.attribute_table()
    with pytest.raises(ValueError, match="only with attributes='morphometric'"):
        plain.morphometric_table()
