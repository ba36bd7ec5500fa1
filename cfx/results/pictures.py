"""Pictures of counterfactual pairs: upscaled tiles, ``|difference|`` heat maps, red frames, labelled grids.

Everything works on plain tensors (``(N, C, H, W)`` images in ``[0, 1]``, C = 1 or 3) and on a record's per-pair
entries (``cfx.metrics.functional.counterfactual.PAIR_SCHEMA``), so a result store, a run's in-memory pairs and
the report all draw the same pictures: :func:`pair_tiles` makes the tiles, :func:`labelled_grid` the single-run
``grid.png`` (one row per pair: query | counterfactual | ``|difference|``, each tile captioned) and
:func:`store_grid` that grid of a result store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cfx.io import atomic_path
from cfx.results.store import Results

DIFFERENCE_COLORMAP = "inferno"
FAILURE_COLOR = (1.0, 0.0, 0.0)
# The classifier's prediction at the counterfactual; captions show it when the record holds it.
COUNTERFACTUAL_PREDICTION = "counterfactual_prediction"
CAPTION_KEYS = ("index", "target", "label", "original_prediction", "success", "target_probability")


def check_images(name: str, images: Tensor) -> None:
    """Refuse anything but floating-point ``(N, C, H, W)`` images with C = 1 or 3.

    Raises:
        ValueError: naming ``name``, the expected layout and what was given.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected (N, C, H, W) images with C = 1 or 3, got {shape}")


def scale_factor(size: int, min_size: int) -> int:
    """The integer factor that brings ``size`` pixels to at least ``min_size`` (at least 1)."""
    return max(1, math.ceil(min_size / max(size, 1)))


def upscale(images: Tensor, min_size: int = 112) -> Tensor:
    """RGB copies of ``images``, enlarged by an integer factor (nearest) so each side is at least ``min_size``.

    Args:
        images: ``(N, C, H, W)`` images in ``[0, 1]``, C = 1 or 3 (any dtype; uint8 is read as ``k / 255``).
        min_size: the smallest side wanted, in pixels.

    Returns:
        ``(N, 3, f * H, f * W)`` float32 in ``[0, 1]``, every source pixel an ``f x f`` square.
    """
    check_images("images", images)
    factor = scale_factor(min(images.shape[-2:]), min_size)
    rgb = _unit(images).expand(-1, 3, -1, -1).clamp(0, 1)
    return rgb.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def difference_heatmap(originals: Tensor, counterfactuals: Tensor) -> Tensor:
    """``|x' - x|`` (largest over channels) coloured on the fixed scale 0 (black) .. 1 (pale yellow).

    The scale is the same for every tile (``inferno``), so a brighter pixel is a larger change in any picture.

    Returns:
        ``(N, 3, H, W)`` float32 RGB in ``[0, 1]``.
    """
    check_images("originals", originals)
    if counterfactuals.shape != originals.shape:
        raise ValueError(
            f"expected counterfactuals of the originals' shape {tuple(originals.shape)}, got "
            f"{tuple(counterfactuals.shape)}"
        )
    change = (_unit(counterfactuals) - _unit(originals)).abs().amax(dim=1).clamp(0, 1)  # (N, H, W)
    table = torch.tensor(matplotlib.colormaps[DIFFERENCE_COLORMAP](torch.linspace(0, 1, 256).numpy())[:, :3])
    return table.float()[(change * 255).round().long()].permute(0, 3, 1, 2)


def colormap_bar(width: int = 256, height: int = 12) -> Tensor:
    """The heat map's scale as a ``(3, height, width)`` bar from 0 (left) to 1 (right)."""
    ramp = torch.linspace(0, 1, width).expand(1, height, width)
    return difference_heatmap(torch.zeros(1, 1, height, width), ramp[None])[0]


def frame(tiles: Tensor, marked: Tensor, width: int, color: Sequence[float] = FAILURE_COLOR) -> Tensor:
    """Copies of RGB ``tiles`` ``(N, 3, H, W)`` with a ``width``-pixel frame of ``color`` where ``marked``."""
    height, length = tiles.shape[-2:]
    border = torch.zeros(height, length, dtype=torch.bool)
    border[:width, :] = border[-width:, :] = True
    border[:, :width] = border[:, -width:] = True
    paint = torch.tensor(list(color), dtype=tiles.dtype).view(1, 3, 1, 1)
    return torch.where(marked.bool().view(-1, 1, 1, 1) & border, paint, tiles)


def pair_tiles(originals: Tensor, counterfactuals: Tensor, success: Tensor, min_size: int = 112) -> dict[str, Tensor]:
    """The three upscaled tiles of each pair.

    Args:
        originals: ``(N, C, H, W)`` queries.
        counterfactuals: ``(N, C, H, W)`` counterfactuals (a failed search's last iterate).
        success: ``(N,)`` bool; a failure's counterfactual gets a red frame (it looks like a counterfactual).
        min_size: the smallest tile side in pixels.

    Returns:
        ``{"query", "counterfactual", "difference"}``, each ``(N, 3, S, S')`` float32 RGB.
    """
    check_images("counterfactuals", counterfactuals)
    if success.shape != originals.shape[:1]:
        raise ValueError(f"expected {originals.shape[0]} success flags, got shape {tuple(success.shape)}")
    factor = scale_factor(min(originals.shape[-2:]), min_size)
    upscaled = upscale(counterfactuals, min_size)
    return {
        "query": upscale(originals, min_size),
        "counterfactual": frame(upscaled, ~success.bool(), width=max(2, factor)),
        "difference": upscale(difference_heatmap(originals, counterfactuals), min_size),
    }


def path_strip(path: Tensor, max_frames: int = 10, min_size: int = 112, gap: int = 4) -> Tensor:
    """One pair's optimisation path as a horizontal strip of at most ``max_frames`` upscaled frames.

    Trailing frames equal to the last one (a search that stopped early repeats its last iterate) are dropped;
    of the rest, ``max_frames`` evenly spaced ones are kept, always the first (the query) and the last.

    Args:
        path: ``(K, C, H, W)`` iterates, ``path[0]`` the query.
        max_frames: most frames shown.
        min_size: the smallest frame side in pixels.
        gap: white pixels between frames.

    Returns:
        ``(3, S, W)`` float32 RGB.
    """
    check_images("path", path)
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    same_as_last = (path == path[-1]).flatten(1).all(dim=1)
    changed = torch.nonzero(~same_as_last)
    count = int(changed.max()) + 2 if len(changed) else 1  # frames up to the first copy of the last iterate
    shown = torch.linspace(0, count - 1, min(count, max_frames)).round().long().unique()
    frames = upscale(path[:count][shown], min_size)
    padded = torch.nn.functional.pad(frames, (0, gap), value=1.0)  # white gap after each frame
    return padded.permute(1, 2, 0, 3).flatten(2)[..., :-gap]


def to_pil(tile: Tensor) -> Image.Image:
    """A ``(3, H, W)`` float RGB tensor in ``[0, 1]`` as an 8-bit PIL image."""
    array = (tile.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def save_png(image: Tensor | Image.Image, path: str | Path) -> None:
    """Write a ``(3, H, W)`` tile (or a PIL image) as a PNG, atomically."""
    picture = to_pil(image) if isinstance(image, Tensor) else image
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")


def pair_captions(record: Mapping[str, Tensor], row: int) -> dict[str, list[str]]:
    """What the pictures of pair ``row`` of ``record`` say, two lines each: ``{"query": ..., "counterfactual": ...}``.

    The query: its dataset index and class (the classifier's prediction), and its label. The counterfactual: the
    target, the classifier's prediction there when the record holds it (:data:`COUNTERFACTUAL_PREDICTION`), the
    target probability and whether the search succeeded.
    """
    missing = [key for key in CAPTION_KEYS if key not in record]
    if missing:
        raise ValueError(f"the pair captions need the record entries {list(CAPTION_KEYS)}; missing {missing}")
    value = {key: record[key][row].item() for key in CAPTION_KEYS}
    target = f"target {value['target']}"
    if COUNTERFACTUAL_PREDICTION in record:
        target += f", predicted {record[COUNTERFACTUAL_PREDICTION][row].item()}"
    return {
        "query": [f"#{value['index']}: class {value['original_prediction']}", f"label {value['label']}"],
        "counterfactual": [
            target,
            f"p(target) = {value['target_probability']:.2f}, {'solved' if value['success'] else 'FAILED'}",
        ],
    }


def labelled_grid(pairs: Mapping[str, Tensor], path: str | Path, min_size: int = 112, gap: int = 6) -> None:
    """Write ``grid.png``: one row per pair, query | counterfactual | ``|difference|``, each tile captioned.

    A failed search's counterfactual (its last iterate) is framed in red; the difference is the heat map of
    :func:`difference_heatmap` (black = unchanged).

    Args:
        pairs: the pairs to show: the record entries of :data:`CAPTION_KEYS` (optionally
            :data:`COUNTERFACTUAL_PREDICTION`) and ``originals`` / ``counterfactuals`` images, one per pair (at
            least one pair).
        path: the PNG to write (atomically).
        min_size: the smallest tile side in pixels.
        gap: white pixels around tiles.
    """
    missing = [key for key in (*CAPTION_KEYS, "originals", "counterfactuals") if key not in pairs]
    if missing:
        raise ValueError(f"labelled_grid needs the pair entries {missing}; got {sorted(pairs)}")
    count = len(pairs["originals"])
    if count == 0:
        raise ValueError("labelled_grid needs at least one pair")
    tiles = pair_tiles(pairs["originals"], pairs["counterfactuals"], pairs["success"], min_size)
    font = ImageFont.load_default()
    line = int(font.getbbox("Ag")[3]) + 4
    height, width = tiles["query"].shape[-2:]
    column = max(width, max(int(font.getlength(text)) for text in _row_texts(pairs, count)) + 2)
    header, cell = line + gap, height + 2 * line + gap  # two caption lines under each tile
    canvas = Image.new("RGB", (3 * (column + gap) + gap, header + count * cell), "white")
    draw = ImageDraw.Draw(canvas)
    names = {"query": "query", "counterfactual": "counterfactual", "difference": "|difference| (0 .. 1)"}
    for position, name in enumerate(names.values()):
        draw.text((gap + position * (column + gap), gap // 2), name, fill="black", font=font)
    for row in range(count):
        top = header + row * cell
        captions = pair_captions(pairs, row)
        for position, key in enumerate(names):
            left = gap + position * (column + gap)
            canvas.paste(to_pil(tiles[key][row]), (left, top))
            for number, text in enumerate(captions.get(key, ())):
                draw.text((left, top + height + 2 + number * line), text, fill="black", font=font)
    save_png(canvas, path)


def store_grid(results: Results, path: str | Path, count: int = 16, min_size: int = 112) -> None:
    """Write the :func:`labelled_grid` of a store's first ``count`` pairs (at least one) to ``path``.

    Args:
        results: an opened store (``cfx.results.open_results``).
        path: the PNG to write (atomically), e.g. the run's ``grid.png``.
        count: most pairs shown.
        min_size: the smallest tile side in pixels.
    """
    rows = slice(0, min(count, len(results)))
    keys = [key for key in (*CAPTION_KEYS, COUNTERFACTUAL_PREDICTION) if key in results.columns]
    pairs = {key: results[key][rows] for key in keys}
    pairs.update({key: results.images(key, rows) for key in ("originals", "counterfactuals")})
    labelled_grid(pairs, path, min_size)


def _row_texts(pairs: Mapping[str, Tensor], count: int) -> list[str]:
    return [text for row in range(count) for lines in pair_captions(pairs, row).values() for text in lines]


def _unit(images: Tensor) -> Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()
