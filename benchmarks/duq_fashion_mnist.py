"""DUQ benchmark on full Fashion-MNIST: test accuracy and OOD AUROC against MNIST digits.

Trains a DUQTask -- a small ResNet feature extractor (width 12, one basic block per stage, batch norm) with an
RBF head, by default with DISC's length scale 0.5 and gradient penalty 0.5, centroid EMA 0.999 -- on the
Fashion-MNIST training images (Debian's dataset-fashion-mnist, 55,000 train / 5,000 val), then reports accuracy
on the 10,000 test images and the AUROC of the uncertainty -max_c K_c separating them (in) from MNIST (out).
There is no full MNIST on this machine: the OOD set is all 5,000 real MNIST digits embedded in cfx
(EmbeddedMNIST, every split).

    nice -n 10 .venv/bin/python benchmarks/duq_fashion_mnist.py [--epochs 4] [--length-scale 0.5] \
        [--penalty-weight 0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import lightning as L
import torch

from cfx.data import EmbeddedMNIST, FashionMNIST
from cfx.metrics import OODAUROC
from cfx.nn import DUQClassifier, ResNet
from cfx.tasks import DUQTask


def run(arguments: argparse.Namespace) -> dict[str, float]:
    start = time.time()
    L.seed_everything(0)
    fashion = FashionMNIST(batch_size=128, eval_batch_size=1000)
    network = ResNet(1, 10, width=arguments.width, blocks=tuple(arguments.blocks))
    milestones = [max(1, round(arguments.epochs * f)) for f in (0.5, 0.8)]
    task = DUQTask(
        network,
        optimizer=partial(torch.optim.SGD, lr=arguments.lr, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones, gamma=0.2),
        embedding_dim=256,
        length_scale=arguments.length_scale,
        penalty_weight=arguments.penalty_weight,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=arguments.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=arguments.limit_train_batches,
    )
    trainer.fit(task, fashion)
    trained = time.time()
    test = trainer.test(task, fashion, verbose=False)[0]
    model = DUQClassifier(task.network, task.head).eval()
    auroc = OODAUROC()
    with torch.no_grad():
        for batch in fashion.eval_dataloader("test"):
            scores = model.uncertainty(batch["image"])
            auroc.update(scores, torch.zeros_like(scores, dtype=torch.bool))
        mnist = EmbeddedMNIST(eval_batch_size=1000)
        for split in ("train", "val", "test"):  # all 5,000 digits
            for batch in mnist.eval_dataloader(split):
                scores = model.uncertainty(batch["image"])
                auroc.update(scores, torch.ones_like(scores, dtype=torch.bool))
    return {
        "test_accuracy": test["test/acc"],
        "auroc_fashion_in_mnist_out": auroc.compute().item(),
        "ood_samples": sum(len(s) for s in auroc.is_ood) - len(fashion.dataset("test")),
        "train_seconds": trained - start,
        "total_seconds": time.time() - start,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=12)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 1, 1, 1])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--length-scale", type=float, default=0.5)
    parser.add_argument("--penalty-weight", type=float, default=0.5)
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction of batches (for timing)")
    print(json.dumps(run(parser.parse_args()), indent=2))
