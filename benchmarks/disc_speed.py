"""Speed of one batched DISC call on Q queries against a loop of Q single-query DISC calls (same work).

Uses the binary embedded-MNIST DEP classifier (checkpoints/dep_embedded_mnist_binary/last.ckpt, from
configs/dep/embedded_mnist_binary.yaml) and the DISC settings of a config in configs/counterfactual/, with an
unreachable confidence so that no query stops early: both sides do exactly ``--reconstruction-steps`` +
``--iterations`` steps per query (generator, classifier and loss predictor forward + backward, Adam). The
generator-only comparison (no classifier) is benchmarks/generators_speed.py.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/disc_speed.py [--queries 32] [--bf16] \
        [--config configs/counterfactual/embedded_mnist_binary_lso_inr_dep.yaml]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from cfx.counterfactual import DISC
from cfx.data import EmbeddedMNIST
from cfx.tasks import load_classifier

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=REPO / "configs/counterfactual/embedded_mnist_binary_lso_inr_dep.yaml"
    )
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--reconstruction-steps", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--bf16", action="store_true", help="generator and classifier under bf16 autocast")
    arguments = parser.parse_args()
    model = yaml.safe_load(arguments.config.read_text())["model"]["init_args"]
    options = dict(model["explainer"]["init_args"])
    options.update(
        reconstruction_steps=arguments.reconstruction_steps,
        max_iterations=arguments.iterations,
        confidence=0.999999,  # unreachable within the budget: every query does the same number of steps
        bf16=arguments.bf16,
        loss_predictor=str(REPO / options["loss_predictor"]) if options.get("loss_predictor") else None,
    )
    classifier = load_classifier(REPO / model["classifier"])
    disc = DISC(classifier, **options)
    test = EmbeddedMNIST(classes=[4, 9]).dataset("test")
    samples = [test[position] for position in range(arguments.queries)]
    images = torch.stack([sample["image"] for sample in samples])
    indices = torch.stack([sample["index"] for sample in samples])
    targets = 1 - torch.stack([sample["label"] for sample in samples])

    start = time.perf_counter()
    batched = disc.explain(images, targets, indices)
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    singles = [disc.explain(images[q : q + 1], targets[q : q + 1], indices[q : q + 1]) for q in range(len(images))]
    loop_seconds = time.perf_counter() - start

    looped = torch.cat([single.counterfactuals for single in singles])
    steps = arguments.reconstruction_steps + arguments.iterations
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), {arguments.config.name}, bf16={arguments.bf16}")
    print("| Q | steps per query | batched s | loop s | speed-up | max |batched - loop| |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(images)} | {steps} | {batched_seconds:.1f} | {loop_seconds:.1f} | "
        f"{loop_seconds / batched_seconds:.2f}x | {(batched.counterfactuals - looped).abs().max().item():.1e} |"
    )


if __name__ == "__main__":
    main()
