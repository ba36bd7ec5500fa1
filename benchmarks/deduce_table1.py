"""DeDUCE Table 1 on embedded MNIST: DeDUCE (SN-ResNet) vs JSMA (plain ResNet), plus batched-search throughput.

Trains the two classifiers (or resumes / loads them: ``cfx fit ... --ckpt_path=last`` is a no-op on a finished
checkpoint), fits the SN-ResNet's class Gaussians if missing, then runs DeDUCE on the SN-ResNet and JSMA on the
plain ResNet on ``--batches`` batches of 100 embedded-MNIST test images, each paired with the 9 classes other
than its label (900 queries per batch, all in one batched ``explain`` call). Reports the paper's Table-1
columns (L0 = pixels with x' != x, L1 = sum |x' - x|, failure %) over the pairs where both methods succeeded
and over each method's own successes, iterations over that intersection and over all pairs, the time per
counterfactual, the batched-vs-per-sample-loop throughput at batch 64, and the ratio of the search's wall time
to (sum of active sample-iterations x the measured batched forward+backward cost per sample).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deduce_table1.py --batches 1
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deduce_table1.py --batches 1 --checkpoint-root runs/width24 \
        --fit-arg=--model.init_args.network.init_args.width=24 --fit-arg=--trainer.max_epochs=12 \
        --fit-arg=--model.init_args.lr_scheduler.init_args.milestones=[8,11]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cfx.cli import main
from cfx.counterfactual import JSMA, CounterfactualResult, DeDUCE, Explainer
from cfx.data import EmbeddedMNIST
from cfx.metrics.functional.counterfactual import l0_distance, l1_distance
from cfx.nn import ClassGaussians, FeatureClassifier
from cfx.tasks import fit_and_save_class_gaussians, load_classifier

REPO = Path(__file__).resolve().parents[1]
SN_CONFIG = REPO / "configs/classifier/embedded_mnist_sn_resnet.yaml"
PLAIN_CONFIG = REPO / "configs/classifier/embedded_mnist_resnet.yaml"
PAPER = {"DeDUCE": (21.16, 10.72, 0.00), "JSMA": (25.59, 12.63, 3.09)}


def trained_classifier(config: Path, checkpoint_dir: Path, overrides: list[str]) -> Path:
    """Train (or resume, or load when finished) the classifier of ``config`` (plus CLI ``overrides``) into
    ``checkpoint_dir``."""
    main(
        [
            "fit",
            "-c",
            str(config),
            f"--checkpoint.dirpath={checkpoint_dir}",
            "--ckpt_path=last",
            "--trainer.enable_progress_bar=false",
            *overrides,
        ]
    )
    return checkpoint_dir / "last.ckpt"


def query_pairs(datamodule: EmbeddedMNIST, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Images ``batch * size ..`` of the test split, each repeated for the 9 classes other than its label."""
    test = datamodule.dataset("test")
    if (batch + 1) * size > len(test):
        raise ValueError(f"the test split holds {len(test)} images: at most {len(test) // size} batches of {size}")
    samples = next(iter(DataLoader(torch.utils.data.Subset(test, range(batch * size, (batch + 1) * size)), size)))
    offsets = torch.arange(1, 10)
    images = samples["image"].repeat_interleave(9, dim=0)
    targets = ((samples["label"][:, None] + offsets[None, :]) % 10).flatten()
    return images, targets


def timed(function: Callable[[], CounterfactualResult]) -> tuple[CounterfactualResult, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def forward_backward_seconds(
    classifier: FeatureClassifier, images: Tensor, targets: Tensor, objective: Callable | None = None
) -> float:
    """Median wall time of one batched forward + input-gradient backward (the classifier's CE, or ``objective``)."""
    times = []
    for _ in range(3):
        leaf = images.clone().requires_grad_(True)
        start = time.perf_counter()
        if objective is None:
            loss = torch.nn.functional.cross_entropy(classifier(leaf), targets, reduction="sum")
        else:
            loss = objective(leaf, targets)[1].sum()
        torch.autograd.grad(loss, leaf)
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def sample_iterations(result: CounterfactualResult) -> int:
    """Forward(+backward) passes a search spent on its samples: ``iterations + 1`` for every non-trivial query."""
    searched = result.iterations > 0  # a query whose target is not its prediction takes at least one step
    return int((result.iterations + 1)[searched].sum())


def throughput(explainer: Explainer, images: Tensor, targets: Tensor, loop_queries: int) -> dict[str, float]:
    """Batched ``explain`` on 64 queries vs a per-query loop (timed on ``loop_queries`` of them, extrapolated by
    sample-iterations)."""
    batched, batched_seconds = timed(partial(explainer.explain, images, targets))
    start = time.perf_counter()
    loop_iterations = sum(
        sample_iterations(explainer.explain(images[i : i + 1], targets[i : i + 1])) for i in range(loop_queries)
    )
    loop_seconds = time.perf_counter() - start
    loop_extrapolated = loop_seconds / loop_iterations * sample_iterations(batched)
    return {
        "batched_seconds": batched_seconds,
        "loop_seconds_extrapolated": loop_extrapolated,
        "loop_queries_timed": loop_queries,
        "speedup": loop_extrapolated / batched_seconds,
    }


def pair_metrics(result: CounterfactualResult, images: Tensor) -> dict[str, Tensor]:
    return {
        "l0": l0_distance(images, result.counterfactuals).double(),
        "l1": l1_distance(images, result.counterfactuals).double(),
        "iterations": result.iterations.double(),
        "success": result.success,
    }


def summarise(metrics: dict[str, Tensor], both: Tensor) -> dict[str, float]:
    own = metrics["success"]
    return {
        "pairs": len(own),
        "failure_percent": 100 * (1 - own.double().mean().item()),
        "l0_both": metrics["l0"][both].mean().item(),
        "l1_both": metrics["l1"][both].mean().item(),
        "l0_own": metrics["l0"][own].mean().item(),
        "l1_own": metrics["l1"][own].mean().item(),
        "iterations_mean_both": metrics["iterations"][both].mean().item(),
        "iterations_median_both": metrics["iterations"][both].median().item(),
        "iterations_mean_all": metrics["iterations"].mean().item(),
        "iterations_median_all": metrics["iterations"].median().item(),
    }


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    sn_checkpoint = trained_classifier(SN_CONFIG, args.checkpoint_root / "embedded_mnist_sn_resnet", args.fit_arg)
    plain_checkpoint = trained_classifier(PLAIN_CONFIG, args.checkpoint_root / "embedded_mnist_resnet", args.fit_arg)
    datamodule = EmbeddedMNIST(eval_batch_size=500)
    datamodule.setup()
    gaussians_path = sn_checkpoint.parent / "class_gaussians.pt"
    if not gaussians_path.is_file():
        fit_and_save_class_gaussians(sn_checkpoint, datamodule, gaussians_path)
    sn_resnet, plain_resnet = load_classifier(sn_checkpoint), load_classifier(plain_checkpoint)
    explainers = {"DeDUCE": DeDUCE(sn_resnet, ClassGaussians.load(gaussians_path)), "JSMA": JSMA(plain_resnet)}
    classifiers = {"DeDUCE": sn_resnet, "JSMA": plain_resnet}

    collected: dict[str, list[dict[str, Tensor]]] = {name: [] for name in explainers}
    seconds = dict.fromkeys(explainers, 0.0)
    work = dict.fromkeys(explainers, 0)
    cost: dict[str, dict[str, float]] = {}
    for batch in range(args.batches):
        images, targets = query_pairs(datamodule, batch, args.batch_size)
        for name, explainer in explainers.items():
            if name not in cost:
                objective_seconds = forward_backward_seconds(classifiers[name], images, targets, explainer.objective)
                classifier_seconds = forward_backward_seconds(classifiers[name], images, targets)
                cost[name] = {
                    "objective_per_sample": objective_seconds / len(images),
                    "classifier_per_sample": classifier_seconds / len(images),
                }
            result, elapsed = timed(partial(explainer.explain, images, targets))
            seconds[name] += elapsed
            work[name] += sample_iterations(result)
            collected[name].append(pair_metrics(result, images))
            print(f"batch {batch} {name}: {elapsed:.1f} s, {int(result.success.sum())}/{len(images)} succeeded")

    metrics = {name: {key: torch.cat([m[key] for m in parts]) for key in parts[0]} for name, parts in collected.items()}
    both = metrics["DeDUCE"]["success"] & metrics["JSMA"]["success"]
    report: dict[str, dict[str, float]] = {}
    images, targets = query_pairs(datamodule, 0, args.batch_size)
    for name, explainer in explainers.items():
        summary = summarise(metrics[name], both)
        summary["pairs_both"] = int(both.sum())
        summary["seconds_per_counterfactual"] = seconds[name] / summary["pairs"]
        summary["sample_iterations"] = work[name]
        summary["wall_over_work_objective"] = seconds[name] / (work[name] * cost[name]["objective_per_sample"])
        summary["wall_over_work_classifier"] = seconds[name] / (work[name] * cost[name]["classifier_per_sample"])
        summary.update({f"cost_{key}_ms": 1000 * value for key, value in cost[name].items()})
        summary.update(
            {f"batch64_{k}": v for k, v in throughput(explainer, images[:64], targets[:64], args.loop_queries).items()}
        )
        report[name] = summary
    return report


def markdown(report: dict[str, dict[str, float]]) -> str:
    lines = [
        "| method | pairs | failure % | L0 (both ok) | L1 (both ok) | L0 (own ok) | L1 (own ok) | iterations mean / "
        "median (both ok) | iterations mean / median (all) | s per CF | paper L0 / L1 / failure % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report.items():
        paper = " / ".join(f"{v:.2f}" for v in PAPER[name])
        lines.append(
            f"| {name} | {s['pairs']} ({s['pairs_both']} both ok) | {s['failure_percent']:.2f} | {s['l0_both']:.2f} "
            f"| {s['l1_both']:.2f} | {s['l0_own']:.2f} | {s['l1_own']:.2f} | {s['iterations_mean_both']:.1f} / "
            f"{s['iterations_median_both']:.0f} | {s['iterations_mean_all']:.1f} / {s['iterations_median_all']:.0f} "
            f"| {s['seconds_per_counterfactual']:.3f} | {paper} |"
        )
    lines += [
        "",
        "| method | batch-64 batched s | batch-64 per-query loop s | speedup | fwd+bwd ms/sample "
        "(objective / classifier) | sample-iterations | wall / (work x objective cost) "
        "| wall / (work x classifier cost) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report.items():
        lines.append(
            f"| {name} | {s['batch64_batched_seconds']:.1f} | {s['batch64_loop_seconds_extrapolated']:.1f} "
            f"| {s['batch64_speedup']:.1f}x | {s['cost_objective_per_sample_ms']:.3f} / "
            f"{s['cost_classifier_per_sample_ms']:.3f} | {s['sample_iterations']} "
            f"| {s['wall_over_work_objective']:.2f} | {s['wall_over_work_classifier']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches of test images (the test split holds 10)")
    parser.add_argument("--batch-size", type=int, default=100, help="test images per batch (x 9 targets)")
    parser.add_argument(
        "--loop-queries", type=int, default=64, help="queries timed one by one for the loop (< 64: extrapolated)"
    )
    parser.add_argument("--checkpoint-root", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument(
        "--fit-arg",
        action="append",
        default=[],
        help="a `cfx fit` override for both classifiers, e.g. --fit-arg=--trainer.max_epochs=12 (repeatable; use "
        "another --checkpoint-root then)",
    )
    arguments = parser.parse_args()
    if not 1 <= arguments.loop_queries <= 64:
        parser.error(
            f"--loop-queries must lie in 1..64 (the batch timed against the loop), got {arguments.loop_queries}"
        )
    numbers = run(arguments)
    print(markdown(numbers))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(numbers, indent=2))
