"""DDU benchmark: OOD detection by class-conditional Gaussian log-density, MNIST (in) vs Fashion-MNIST (out).

Trains the default SN-ResNet on the 5,000 embedded MNIST digits with configs/ddu/embedded_mnist_sn_resnet.yaml
(which fits the class Gaussians after training), then scores the 1,000 embedded-MNIST test digits (in) and the
10,000 Fashion-MNIST test images (out) by the negative log-density of the equal-weight Gaussian mixture.

    nice -n 10 .venv/bin/python benchmarks/ddu_ood.py [--checkpoint-dir runs/bench_ddu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cfx.cli import main
from cfx.data import EmbeddedMNIST, FashionMNIST
from cfx.metrics import evaluate_ood
from cfx.tasks import load_classifier_and_gaussians

REPO = Path(__file__).resolve().parents[1]


def run(checkpoint_dir: Path) -> dict[str, float]:
    start = time.time()
    config = REPO / "configs/ddu/embedded_mnist_sn_resnet.yaml"
    main(["fit", "-c", str(config), f"--checkpoint.dirpath={checkpoint_dir}", "--trainer.enable_progress_bar=false"])
    trained = time.time()
    classifier, gaussians = load_classifier_and_gaussians(checkpoint_dir / "last.ckpt")

    @torch.no_grad()
    def negative_log_density(images: torch.Tensor) -> torch.Tensor:
        return -gaussians.log_density(classifier.forward_features(images)[0].double())

    @torch.no_grad()
    def negative_max_softmax(images: torch.Tensor) -> torch.Tensor:
        return -classifier(images).softmax(1).max(1).values

    mnist, fashion = EmbeddedMNIST(eval_batch_size=500), FashionMNIST(eval_batch_size=500)
    correct = sum((classifier(b["image"]).argmax(1) == b["label"]).sum().item() for b in mnist.eval_dataloader("test"))
    return {
        "test_accuracy": correct / len(mnist.dataset("test")),
        "auroc_ddu_log_density": evaluate_ood(negative_log_density, mnist, fashion),
        "auroc_softmax_baseline": evaluate_ood(negative_max_softmax, mnist, fashion),
        "jitter_max": gaussians.jitter.max().item(),
        "train_seconds": trained - start,
        "total_seconds": time.time() - start,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "runs" / "bench_ddu")
    print(json.dumps(run(parser.parse_args().checkpoint_dir), indent=2))
