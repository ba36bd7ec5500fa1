"""Quality of the trained generative auxiliaries on embedded MNIST: VAE / autoencoder reconstruction and AnoGAN AUROC.

Trains (or loads, when finished) the WGAN, VAE and autoencoder of configs/{gan,vae,autoencoder}/embedded_mnist.yaml
into ``--checkpoint-root``, then measures

- the VAE's and the autoencoder's test reconstruction L1 (per image: the sum of ``|x' - x|`` over its pixels;
  the VAE decodes the encoder mean) on the embedded-MNIST test split;
- the AnoGAN score (``cfx.metrics.functional.anogan_score``) of ``--images`` embedded-MNIST test digits, of as many
  Fashion-MNIST test images (``/usr/share/datasets/fashion-mnist``, Debian's ``dataset-fashion-mnist``) and of
  as many uniform-noise images, and the AUROC of the score separating digits (negatives) from each of the others
  (positives): the paper reports 0.998 against Fashion-MNIST;
- optional pictures: ``--pictures DIR`` writes the GAN's samples and the reconstructions, enlarged.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generative_quality.py --images 100 --pictures runs/generative
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cfx.cli import main
from cfx.data import EmbeddedMNIST
from cfx.data.idx import read_idx
from cfx.metrics.functional.anogan import anogan_score
from cfx.results.pictures import save_png
from cfx.tasks.generative import image_grid, load_generative

REPO = Path(__file__).resolve().parents[1]
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
PAPER_AUROC = 0.998


def trained(kind: str, root: Path) -> Path:
    """Train (or resume, or load when finished) ``configs/<kind>/embedded_mnist.yaml`` into ``root/<kind>``."""
    folder = root / f"{kind}_embedded_mnist"
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / kind / "embedded_mnist.yaml"),
            f"--checkpoint.dirpath={folder}",
            "--ckpt_path=last",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return folder / "last.ckpt"


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half): the Mann-Whitney AUROC."""
    difference = positives[:, None] - negatives[None, :]
    return float((difference > 0).float().mean() + 0.5 * (difference == 0).float().mean())


def reconstruction_l1(model: torch.nn.Module, images: Tensor, variational: bool) -> Tensor:
    """Per image, the sum over pixels of ``|x' - x|`` (the VAE decodes its encoder mean)."""
    with torch.no_grad():
        codes = model.encode(images)
        reconstruction = model.decode(codes[0] if variational else codes)
    return (reconstruction - images).abs().flatten(1).sum(dim=1)


def run(args: argparse.Namespace) -> dict:
    gan = load_generative(trained("gan", args.checkpoint_root))
    vae = load_generative(trained("vae", args.checkpoint_root))
    autoencoder = load_generative(trained("autoencoder", args.checkpoint_root))
    data = EmbeddedMNIST()
    test = data.dataset("test")
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    report = {
        "test_images": len(images),
        "vae_reconstruction_l1": float(reconstruction_l1(vae, images, True).mean()),
        "autoencoder_reconstruction_l1": float(reconstruction_l1(autoencoder, images, False).mean()),
    }
    count = args.images
    fashion = torch.from_numpy(np.ascontiguousarray(read_idx(FASHION_TEST)[:count])).float().div(255).unsqueeze(1)
    noise = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sets = {"mnist": images[:count], "fashion_mnist": fashion, "uniform_noise": noise}
    settings = {"steps": args.steps, "restarts": args.restarts}
    scores, seconds = {}, {}
    for name, batch in sets.items():
        start = time.perf_counter()
        indices = torch.arange(count).split(args.batch_size)
        chunks = zip(batch.split(args.batch_size), indices, strict=True)
        scores[name] = torch.cat([anogan_score(x, i, gan.generator, gan.critic, **settings) for x, i in chunks])
        seconds[name] = (time.perf_counter() - start) / count
    report.update(
        anogan_settings=settings,
        anogan_mean={name: float(value.mean()) for name, value in scores.items()},
        anogan_seconds_per_image={name: round(value, 3) for name, value in seconds.items()},
        auroc_fashion_mnist=auroc(scores["mnist"], scores["fashion_mnist"]),
        auroc_uniform_noise=auroc(scores["mnist"], scores["uniform_noise"]),
    )
    if args.pictures is not None:
        with torch.no_grad():
            samples = gan.generator(
                torch.randn(64, gan.generator.latent_dim, generator=torch.Generator().manual_seed(1))
            )
            rows = [
                images[:16],
                vae.decode(vae.encode(images[:16])[0]),
                autoencoder.decode(autoencoder.encode(images[:16])),
            ]
        save_png(image_grid(samples), args.pictures / "gan_samples.png")
        save_png(image_grid(torch.cat(rows), columns=16), args.pictures / "reconstructions_vae_autoencoder.png")
    return report


def markdown(report: dict) -> str:
    means = report["anogan_mean"]
    return "\n".join(
        [
            f"- Test reconstruction L1 over {report['test_images']} digits (sum of |x' - x| per image): VAE "
            f"{report['vae_reconstruction_l1']:.2f}, autoencoder {report['autoencoder_reconstruction_l1']:.2f}.",
            f"- AnoGAN score ({report['anogan_settings']}), mean: MNIST {means['mnist']:.1f}, Fashion-MNIST "
            f"{means['fashion_mnist']:.1f}, uniform noise {means['uniform_noise']:.1f}; AUROC digits vs Fashion-MNIST "
            f"{report['auroc_fashion_mnist']:.4f} (paper {PAPER_AUROC}), vs noise {report['auroc_uniform_noise']:.4f}.",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images of each set scored by AnoGAN")
    parser.add_argument("--steps", type=int, default=4000, help="AnoGAN gradient steps per restart (paper 4000)")
    parser.add_argument("--restarts", type=int, default=3, help="AnoGAN restarts (paper 3)")
    parser.add_argument("--batch-size", type=int, default=100, help="images scored together")
    parser.add_argument("--checkpoint-root", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--pictures", type=Path, default=None, help="write sample / reconstruction grids here")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    arguments = parser.parse_args()
    result = run(arguments)
    print(json.dumps(result, indent=2))
    print(markdown(result))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2))
