"""AttGAN on the embedded digits' Morpho-MNIST attributes: reconstruction L1 and attribute-flip success per attribute.

Trains (or loads, when finished) configs/attgan/embedded_mnist.yaml into ``--checkpoint-root``, then on the
embedded-MNIST test digits (their binarised morphometric attributes, ``EmbeddedMNIST(attributes="morphometric")``):

- reconstruction: ``G(x, a)`` with each digit's own attributes; L1 per image (sum over its 784 pixels of
  ``|G(x, a) - x|``), mean and median;
- flips: for each attribute ``j`` every digit is generated with ``a_j`` flipped (``1 - a_j``), the other attributes
  its own, and both images are measured (:func:`cfx.data.morphometrics.measure`). A flip succeeds when the
  measured quantity of the attribute (thick -> thickness, slanted -> slant, wide -> width, tall -> height,
  long -> length, large -> area) moves in the requested direction from the reconstruction ``G(x, a)`` to the
  edited ``G(x, a')`` (up for 0 -> 1, down for 1 -> 0); the goal is >= 80 % per attribute. Reported also against
  the real digit instead of the reconstruction, the mean measured change per direction, and the mean and standard
  deviation over the digits of the change in the requested direction (its signal against its per-digit spread),
  and the standard deviation of the measured change from the real digit to its reconstruction (no attribute
  edited: how much the quantity moves when nothing is asked of it).
- ``--pictures DIR``: digit | reconstruction | each attribute flipped, enlarged, for the first test digits.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/attgan_quality.py --pictures runs/attgan
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from cfx.cli import main
from cfx.data import EmbeddedMNIST
from cfx.data.morphometrics import MORPHOMETRIC_ATTRIBUTE_NAMES, MORPHOMETRIC_NAMES, measure
from cfx.nn.attgan import ATTRIBUTE_INPUT_SCALE
from cfx.results.pictures import save_png
from cfx.tasks.generative import image_grid, load_generative

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.8


def trained_attgan(root: Path, epochs: int | None, overrides: Sequence[str] = ()) -> Path:
    """Train (or resume, or load when finished) configs/attgan/embedded_mnist.yaml (plus CLI ``overrides``) into
    ``root``."""
    folder = root / "attgan_embedded_mnist"
    epochs_override = [] if epochs is None else [f"--trainer.max_epochs={epochs}"]
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "attgan" / "embedded_mnist.yaml"),
            f"--checkpoint.dirpath={folder}",
            "--ckpt_path=last",
            "--trainer.enable_progress_bar=false",
            *epochs_override,
            *overrides,
        ]
    )
    return folder / "last.ckpt"


def generate(attgan: torch.nn.Module, images: Tensor, attributes: Tensor, batch: int = 500) -> Tensor:
    """``G(images, attributes)`` in batches, without gradients."""
    with torch.no_grad():
        return torch.cat(
            [attgan(images[i : i + batch], attributes[i : i + batch]) for i in range(0, len(images), batch)]
        )


def run(args: argparse.Namespace) -> dict:
    attgan = load_generative(trained_attgan(args.checkpoint_root, args.epochs, args.fit_arg)).eval()
    if tuple(attgan.attribute_names) != MORPHOMETRIC_ATTRIBUTE_NAMES:
        raise ValueError(f"the AttGAN was trained on {attgan.attribute_names}, not the morphometric attributes")
    data = EmbeddedMNIST(attributes="morphometric")
    test = data.dataset("test")
    count = len(test) if args.images is None else min(args.images, len(test))
    samples = [test[i] for i in range(count)]
    images = torch.stack([s["image"] for s in samples])
    attributes = torch.stack([s["attributes"] for s in samples]).float()
    started = time.perf_counter()
    reconstruction = generate(attgan, images, attributes)
    l1 = (reconstruction - images).abs().flatten(1).sum(dim=1)
    measured_real = measure(images)
    measured_reconstruction = measure(reconstruction)
    report: dict = {
        "test_digits": count,
        "reconstruction_l1_mean": float(l1.mean()),
        "reconstruction_l1_median": float(l1.median()),
        "goal": GOAL,
        "attributes": {},
    }
    flipped_images = []
    for j, (name, quantity) in enumerate(zip(MORPHOMETRIC_ATTRIBUTE_NAMES, MORPHOMETRIC_NAMES, strict=True)):
        flipped = attributes.clone()
        flipped[:, j] = 0.5 + (1 - 2 * attributes[:, j]) * args.test_intensity / ATTRIBUTE_INPUT_SCALE / 2
        edited = generate(attgan, images, flipped)
        flipped_images.append(edited[: args.picture_digits])
        measured = measure(edited)[:, j]
        up = flipped[:, j] > attributes[:, j]
        direction = torch.where(up, 1.0, -1.0).double()
        from_reconstruction = (measured - measured_reconstruction[:, j]) * direction
        from_real = (measured - measured_real[:, j]) * direction
        report["attributes"][name] = {
            "quantity": quantity,
            "success_vs_reconstruction": float((from_reconstruction > 0).double().mean()),
            "success_vs_real_digit": float((from_real > 0).double().mean()),
            "flips_up": int(up.sum()),
            "mean_change_up": float((measured - measured_reconstruction[:, j])[up].mean()),
            "mean_change_down": float((measured - measured_reconstruction[:, j])[~up].mean()),
            "directional_change_mean": float(from_reconstruction.mean()),
            "directional_change_std": float(from_reconstruction.std()),
            "reconstruction_change_std": float((measured_reconstruction[:, j] - measured_real[:, j]).std()),
        }
    report["seconds"] = time.perf_counter() - started
    report["all_attributes_meet_goal"] = all(
        entry["success_vs_reconstruction"] >= GOAL for entry in report["attributes"].values()
    )
    if args.pictures is not None:
        shown = args.picture_digits
        columns = [images[:shown], reconstruction[:shown], *flipped_images]
        grid = torch.stack(columns, dim=1).flatten(0, 1)  # one row per digit
        args.pictures.mkdir(parents=True, exist_ok=True)
        save_png(image_grid(grid, len(columns), tile_size=84), args.pictures / "attgan_flips.png")
    return report


def parse(arguments: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-root", type=Path, default=REPO / "checkpoints")
    parser.add_argument(
        "--epochs", type=int, default=None, help="train (or resume) to this many epochs instead of the config's"
    )
    parser.add_argument(
        "--fit-arg",
        action="append",
        default=[],
        help="extra `cfx fit` argument for the training, repeatable (e.g. --fit-arg=--model.init_args.lr=1e-4)",
    )
    parser.add_argument("--images", type=int, default=None, help="test digits measured (default: all)")
    parser.add_argument("--pictures", type=Path, default=None, help="folder for the enlarged flip grid")
    parser.add_argument("--picture-digits", type=int, default=8)
    parser.add_argument(
        "--test-intensity",
        type=float,
        default=ATTRIBUTE_INPUT_SCALE,
        help="network input of a flipped attribute, +-this (AttGAN's test_int; its training value 0.5 = a 0/1 flip)",
    )
    return parser.parse_args(arguments)


if __name__ == "__main__":
    print(json.dumps(run(parse()), indent=2))
