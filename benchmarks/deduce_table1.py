"""DeDUCE Table 1 on embedded MNIST: DeDUCE (SN-ResNet) vs JSMA, REVISE and VLK (plain ResNet), AnoGAN realism.

Trains the two classifiers and the WGAN, VAE and autoencoder (or resumes / loads them: ``cfx fit ...
--ckpt_path=last`` is a no-op on a finished checkpoint), fits the SN-ResNet's class Gaussians and the
autoencoder's class prototypes if missing, then runs DeDUCE on the SN-ResNet and JSMA, REVISE and VLK on the
plain ResNet on ``--batches`` batches of ``--batch-size`` embedded-MNIST test images, each paired with the 9
classes other than its label (all pairs of a batch in one batched ``explain`` call). Reports the paper's Table-1
columns (L0 = pixels with x' != x, L1 = sum |x' - x|, failure %, AnoGAN score of the counterfactuals) over the
pairs where every method succeeded and over each method's own successes, the originals' AnoGAN score,
iterations over that intersection and over all pairs, the time per counterfactual, the batched-vs-per-sample-loop
throughput at batch 64, and the ratio of the search's wall time to (sum of active sample-iterations x the
measured batched forward+backward cost per sample). The AnoGAN score (paper settings unless ``--anogan-steps``)
is computed for the first ``--anogan-pairs`` pairs every method solved.

REVISE runs with ``--revise-weight`` / ``--revise-lr`` / ``--revise-iterations`` (defaults tuned on this
VAE and classifier, see docs/RESULTS.md; the paper's lambda 1, step 1e-5, 50,000 iterations solve few pairs here).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deduce_table1.py --batches 1 --batch-size 10
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
from generative_quality import trained
from torch import Tensor
from torch.utils.data import DataLoader

from cfx.cli import main
from cfx.counterfactual import JSMA, CounterfactualResult, DeDUCE, Explainer
from cfx.counterfactual.revise import REVISE
from cfx.counterfactual.vlk import VLK
from cfx.data import EmbeddedMNIST
from cfx.metrics.functional.anogan import anogan_score
from cfx.metrics.functional.counterfactual import l0_distance, l1_distance
from cfx.nn import ClassGaussians, FeatureClassifier
from cfx.tasks import fit_and_save_class_gaussians, load_classifier
from cfx.tasks.generative import load_generative
from cfx.tasks.prototypes import PROTOTYPES_FILENAME, fit_and_save_prototypes, load_checked_prototypes

REPO = Path(__file__).resolve().parents[1]
SN_CONFIG = REPO / "configs/classifier/embedded_mnist_sn_resnet.yaml"
PLAIN_CONFIG = REPO / "configs/classifier/embedded_mnist_resnet.yaml"
PAPER = {  # L0, L1, failure %, AnoGAN (originals 15.44)
    "DeDUCE": (21.16, 10.72, 0.00, 22.51),
    "JSMA": (25.59, 12.63, 3.09, 23.90),
    "VLK": (155.43, 38.95, 0.09, 22.95),
    "REVISE": (752.46, 53.86, 26.80, 20.09),
}
PAPER_ORIGINALS_ANOGAN = 15.44


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
    gan = load_generative(trained("gan", args.checkpoint_root))
    vae = load_generative(trained("vae", args.checkpoint_root))
    autoencoder_checkpoint = trained("autoencoder", args.checkpoint_root)
    datamodule = EmbeddedMNIST(eval_batch_size=500)
    datamodule.setup()
    gaussians_path = sn_checkpoint.parent / "class_gaussians.pt"
    if not gaussians_path.is_file():
        fit_and_save_class_gaussians(sn_checkpoint, datamodule, gaussians_path)
    prototypes_path = autoencoder_checkpoint.parent / PROTOTYPES_FILENAME
    try:
        prototypes = load_checked_prototypes(autoencoder_checkpoint, plain_checkpoint, prototypes_path)
    except (FileNotFoundError, ValueError):  # missing, or fitted with other checkpoints: fit them again
        fit_and_save_prototypes(autoencoder_checkpoint, plain_checkpoint, datamodule, prototypes_path)
        prototypes = load_checked_prototypes(autoencoder_checkpoint, plain_checkpoint, prototypes_path)
    sn_resnet, plain_resnet = load_classifier(sn_checkpoint), load_classifier(plain_checkpoint)
    explainers = {
        "DeDUCE": DeDUCE(sn_resnet, ClassGaussians.load(gaussians_path)),
        "JSMA": JSMA(plain_resnet),
        "VLK": VLK(plain_resnet, load_generative(autoencoder_checkpoint), prototypes),
        "REVISE": REVISE(
            plain_resnet,
            vae,
            distance_weight=args.revise_weight,
            learning_rate=args.revise_lr,
            max_iterations=args.revise_iterations,
        ),
    }
    classifiers = {"DeDUCE": sn_resnet, "JSMA": plain_resnet, "VLK": plain_resnet, "REVISE": plain_resnet}

    collected: dict[str, list[dict[str, Tensor]]] = {name: [] for name in explainers}
    counterfactuals: dict[str, list[Tensor]] = {name: [] for name in explainers}
    originals, original_indices = [], []
    seconds = dict.fromkeys(explainers, 0.0)
    work = dict.fromkeys(explainers, 0)
    cost: dict[str, dict[str, float]] = {}
    for batch in range(args.batches):
        images, targets = query_pairs(datamodule, batch, args.batch_size)
        originals.append(images)
        original_indices.append(torch.arange(batch * args.batch_size, (batch + 1) * args.batch_size))
        for name, explainer in explainers.items():
            if name not in cost:
                objective = getattr(explainer, "objective", None)
                objective_seconds = forward_backward_seconds(classifiers[name], images, targets, objective)
                classifier_seconds = forward_backward_seconds(classifiers[name], images, targets)
                cost[name] = {
                    "objective_per_sample": objective_seconds / len(images),
                    "classifier_per_sample": classifier_seconds / len(images),
                }
            result, elapsed = timed(partial(explainer.explain, images, targets))
            seconds[name] += elapsed
            work[name] += sample_iterations(result)
            collected[name].append(pair_metrics(result, images))
            counterfactuals[name].append(result.counterfactuals)
            print(f"batch {batch} {name}: {elapsed:.1f} s, {int(result.success.sum())}/{len(images)} succeeded")

    metrics = {name: {key: torch.cat([m[key] for m in parts]) for key in parts[0]} for name, parts in collected.items()}
    both = torch.stack([metrics[name]["success"] for name in explainers]).all(dim=0)
    scored = torch.nonzero(both).squeeze(1)[: args.anogan_pairs]
    settings = {"steps": args.anogan_steps}
    pair_index = torch.arange(len(both))  # seeds the restarts: a pair's score is the same for every method

    def realism(images: Tensor, indices: Tensor) -> Tensor:
        return torch.cat(
            [
                anogan_score(chunk, chunk_indices, gan.generator, gan.critic, **settings)
                for chunk, chunk_indices in zip(images.split(100), indices.split(100), strict=True)
            ]
        )

    queries = torch.cat(originals)[::9]
    report: dict[str, dict[str, float]] = {
        "originals": {
            "anogan_mean": realism(queries, torch.cat(original_indices)).mean().item(),
            "anogan_steps": args.anogan_steps,
            "anogan_pairs": len(scored),
        }
    }
    print(f"AnoGAN of the originals: {report['originals']['anogan_mean']:.2f}")
    images, targets = query_pairs(datamodule, 0, args.batch_size)
    for name, explainer in explainers.items():
        summary = summarise(metrics[name], both)
        summary["pairs_both"] = int(both.sum())
        summary["anogan_both"] = realism(torch.cat(counterfactuals[name])[scored], pair_index[scored]).mean().item()
        print(f"AnoGAN of {name}: {summary['anogan_both']:.2f}")
        summary["seconds_per_counterfactual"] = seconds[name] / summary["pairs"]
        summary["sample_iterations"] = work[name]
        summary["wall_over_work_objective"] = seconds[name] / (work[name] * cost[name]["objective_per_sample"])
        summary["wall_over_work_classifier"] = seconds[name] / (work[name] * cost[name]["classifier_per_sample"])
        summary.update({f"cost_{key}_ms": 1000 * value for key, value in cost[name].items()})
        loop_queries = args.loop_queries if name in ("DeDUCE", "JSMA") else args.generative_loop_queries
        summary.update(
            {f"batch64_{k}": v for k, v in throughput(explainer, images[:64], targets[:64], loop_queries).items()}
        )
        report[name] = summary
    return report


def markdown(report: dict[str, dict[str, float]]) -> str:
    lines = [
        "| method | pairs | failure % | L0 (all ok) | L1 (all ok) | AnoGAN (all ok) | L0 (own ok) | L1 (own ok) "
        "| iterations mean / median (all ok) | iterations mean / median (all) | s per CF "
        "| paper L0 / L1 / failure % / AnoGAN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    originals = report["originals"]
    methods = {name: s for name, s in report.items() if name != "originals"}
    for name, s in methods.items():
        paper = " / ".join(f"{v:.2f}" for v in PAPER[name])
        lines.append(
            f"| {name} | {s['pairs']} ({s['pairs_both']} all ok) | {s['failure_percent']:.2f} | {s['l0_both']:.2f} "
            f"| {s['l1_both']:.2f} | {s['anogan_both']:.2f} | {s['l0_own']:.2f} | {s['l1_own']:.2f} "
            f"| {s['iterations_mean_both']:.1f} / "
            f"{s['iterations_median_both']:.0f} | {s['iterations_mean_all']:.1f} / {s['iterations_median_all']:.0f} "
            f"| {s['seconds_per_counterfactual']:.3f} | {paper} |"
        )
    lines.append(f"| originals | | | | | {originals['anogan_mean']:.2f} | | | | | | {PAPER_ORIGINALS_ANOGAN:.2f} |")
    lines += [
        "",
        f"AnoGAN: {originals['anogan_steps']} steps per restart, the first {originals['anogan_pairs']} pairs every "
        "method solved (originals: every query).",
        "",
        "| method | batch-64 batched s | batch-64 per-query loop s | speedup | fwd+bwd ms/sample "
        "(objective / classifier) | sample-iterations | wall / (work x objective cost) "
        "| wall / (work x classifier cost) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in methods.items():
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
    parser.add_argument(
        "--generative-loop-queries", type=int, default=4, help="queries timed one by one for REVISE's and VLK's loop"
    )
    parser.add_argument("--revise-weight", type=float, default=0.1, help="REVISE's lambda (paper 1)")
    parser.add_argument("--revise-lr", type=float, default=1e-2, help="REVISE's step size (paper 1e-5)")
    parser.add_argument("--revise-iterations", type=int, default=1000, help="REVISE's iterations (paper 50,000)")
    parser.add_argument("--anogan-steps", type=int, default=4000, help="AnoGAN steps per restart (paper 4000)")
    parser.add_argument("--anogan-pairs", type=int, default=90, help="pairs every method solved scored by AnoGAN")
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
    if not (1 <= arguments.loop_queries <= 64 and 1 <= arguments.generative_loop_queries <= 64):
        parser.error(
            "--loop-queries and --generative-loop-queries must lie in 1..64 (the batch timed against the loop), got "
            f"{arguments.loop_queries} and {arguments.generative_loop_queries}"
        )
    numbers = run(arguments)
    print(markdown(numbers))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(numbers, indent=2))
