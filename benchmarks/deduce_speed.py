"""DeDUCE and JSMA speed: the published one-batch-per-target protocol vs cfx's active-set search and its fast paths.

On the default classifiers (``checkpoints/embedded_mnist_sn_resnet`` + its class Gaussians for DeDUCE,
``checkpoints/embedded_mnist_resnet`` for JSMA; trained by ``make demo`` or this script), the first
``--queries`` embedded-MNIST test digits, each paired with the 9 classes other than its label:

- ``published``: the reference protocol emulated -- one batch per target class, and every sample of a batch keeps
  iterating until the batch's slowest sample finishes (its result frozen when it first succeeds), no compile;
- ``default``: cfx, all pairs in one ``explain`` call, finished samples leaving the computation;
- ``fold``, ``channels_last``, ``compile``, ``bfloat16`` and combinations: cfx with the fast-path options.

For each: seconds per counterfactual, sample-iterations computed (rows evaluated) and needed (``iterations + 1``
per searched pair), wall / work (wall time over needed sample-iterations x the measured batched forward+backward
cost of one sample on the default path), and the share of pairs whose counterfactual equals the default path's.
JSMA additionally runs a per-query loop (batched speed-up).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deduce_speed.py --queries 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from deduce_table1 import PLAIN_CONFIG, SN_CONFIG, forward_backward_seconds, query_pairs, trained_classifier
from torch import Tensor

from cfx.counterfactual import JSMA, CounterfactualResult, DeDUCE
from cfx.counterfactual.iterative import PixelStepExplainer
from cfx.counterfactual.search import ActiveSearch, Evaluation
from cfx.data import EmbeddedMNIST
from cfx.nn import ClassGaussians
from cfx.tasks import fit_and_save_class_gaussians, load_classifier

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": {},
    "check every 8": {"stop_check_every": 8},
    "fold": {"fold_batch_norm": True},
    "fold + channels_last": {"fold_batch_norm": True, "channels_last": True},
    "fold + channels_last + check every 8": {"fold_batch_norm": True, "channels_last": True, "stop_check_every": 8},
    "fold + compile": {"fold_batch_norm": True, "compile": True},
    "fold + bfloat16": {"fold_batch_norm": True, "bfloat16": True},
}


class Lockstep:
    """Mixin: no sample leaves the batch before the slowest one (the published protocol); results freeze at success."""

    def stopping(
        self: PixelStepExplainer,
        search: ActiveSearch,
        iteration: int,
        last: bool,
        evaluation: Evaluation,
        reached: Tensor,
        probability: Tensor,
    ) -> Tensor:
        finished = search.state.setdefault("finished", torch.zeros_like(reached))
        newly = (reached | last) & ~finished
        search.finish(newly, iteration, evaluation.iterates, reached, probability)
        search.state["finished"] = finished | newly
        return torch.full_like(reached, bool(search.state["finished"].all()))


class LockstepDeDUCE(Lockstep, DeDUCE):
    """DeDUCE as the reference code runs it."""


class LockstepJSMA(Lockstep, JSMA):
    """JSMA as the reference code runs it."""


class Counted:
    """Mixin: counts the sample-iterations a search computes (the rows of every evaluation) in ``computed``."""

    computed = 0

    def evaluate(self, search: ActiveSearch, iteration: int, last: bool) -> Evaluation:
        self.computed += len(search.rows)
        return super().evaluate(search, iteration, last)


def counted(method: type) -> type:
    """``method`` with :class:`Counted` mixed in."""
    return type(f"Counted{method.__name__}", (Counted, method), {})


def needed_iterations(result: CounterfactualResult) -> int:
    """Sample-iterations an early-exit search needs: ``iterations + 1`` for every searched pair."""
    return int((result.iterations + 1)[result.iterations > 0].sum())


def published(method: type, classifier, images: Tensor, targets: Tensor, **settings) -> tuple[Tensor, float, int]:
    """One lockstep batch per target class; returns the counterfactuals, wall seconds and computed work."""
    counterfactuals = images.clone()
    computed = 0
    start = time.perf_counter()
    for target in targets.unique().tolist():
        rows = torch.nonzero(targets == target).squeeze(1)
        explainer = counted(method)(classifier, **settings)
        result = explainer.explain(images[rows], targets[rows])
        counterfactuals[rows] = result.counterfactuals
        computed += explainer.computed
    return counterfactuals, time.perf_counter() - start, computed


def run_method(
    name: str, build, lockstep: type, classifier, images: Tensor, targets: Tensor, variants: list[str], loop: bool
) -> dict:
    """Every variant of one method on the same pairs."""
    rows = {}
    reference = None
    objective = build(classifier).objective
    per_sample = forward_backward_seconds(classifier, images, targets, objective) / len(images)
    for variant in ["default", *[other for other in variants if other != "default"]]:
        options = VARIANTS[variant]
        explainer = build(classifier, counting=True, **options)
        if options.get("compile"):
            explainer.explain(images[:9], targets[:9])  # compile outside the timing (dynamic shapes: once)
        explainer.computed = 0
        start = time.perf_counter()
        result = explainer.explain(images, targets)
        seconds = time.perf_counter() - start
        print(f"[deduce_speed] {name} {variant}: {seconds:.1f} s", file=sys.stderr, flush=True)
        needed = needed_iterations(result)
        if reference is None:
            reference = result
        rows[variant] = {
            "seconds_per_cf": seconds / len(images),
            "computed": explainer.computed,
            "needed": needed,
            "wall_per_work": seconds / (needed * per_sample),
            "identical_share": float(
                (result.counterfactuals == reference.counterfactuals).flatten(1).all(1).double().mean()
            ),
            "success": float(result.success.double().mean()),
        }
    counterfactuals, seconds, computed = published(lockstep, classifier, images, targets, **build.settings)
    rows["published protocol (emulated)"] = {
        "seconds_per_cf": seconds / len(images),
        "computed": computed,
        "needed": rows["default"]["needed"],
        "wall_per_work": seconds / (rows["default"]["needed"] * per_sample),
        "identical_share": float((counterfactuals == reference.counterfactuals).flatten(1).all(1).double().mean()),
        "success": float("nan"),
    }
    if loop:
        explainer = build(classifier)
        start = time.perf_counter()
        for i in range(len(images)):
            explainer.explain(images[i : i + 1], targets[i : i + 1])
        rows["per-query loop"] = {"seconds_per_cf": (time.perf_counter() - start) / len(images)}
    for row in rows.values():
        row["fwd_bwd_ms_per_sample"] = 1000 * per_sample
    return rows


class Builder:
    """``Builder(cls, **settings)(classifier, **options)`` -> an explainer; keeps the settings for the lockstep run."""

    def __init__(self, method: type, **settings):
        self.method, self.settings = method, settings

    def __call__(self, classifier, counting: bool = False, **options):
        method = counted(self.method) if counting else self.method
        return method(classifier, **self.settings, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=["DeDUCE", "JSMA"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--no-loop", action="store_true", help="skip JSMA's per-query loop")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule = EmbeddedMNIST()
    datamodule.setup("test")
    images, targets = query_pairs(datamodule, 0, args.queries)
    report = {}
    if "DeDUCE" in args.methods:
        checkpoint = trained_classifier(SN_CONFIG, REPO / "checkpoints" / "embedded_mnist_sn_resnet", [])
        gaussians_path = checkpoint.parent / "class_gaussians.pt"
        if not gaussians_path.is_file():
            fit_and_save_class_gaussians(checkpoint, datamodule)
        gaussians = ClassGaussians.load(gaussians_path)
        build = Builder(DeDUCE, gaussians=gaussians)
        report["DeDUCE"] = run_method(
            "DeDUCE", build, LockstepDeDUCE, load_classifier(checkpoint), images, targets, args.variants, False
        )
    if "JSMA" in args.methods:
        checkpoint = trained_classifier(PLAIN_CONFIG, REPO / "checkpoints" / "embedded_mnist_resnet", [])
        report["JSMA"] = run_method(
            "JSMA",
            Builder(JSMA),
            LockstepJSMA,
            load_classifier(checkpoint),
            images,
            targets,
            args.variants,
            not args.no_loop,
        )
    print(f"{len(images)} pairs ({args.queries} test digits x 9 targets), {torch.get_num_threads()} threads")
    print("| method | path | s / CF | sample-iterations computed / needed | wall / work | identical to default |")
    print("|---|---|---|---|---|---|")
    for method, rows in report.items():
        for variant, row in rows.items():
            if "computed" not in row:
                print(f"| {method} | {variant} | {row['seconds_per_cf']:.4f} | | | |")
                continue
            print(
                f"| {method} | {variant} | {row['seconds_per_cf']:.4f} | {row['computed']:,} / {row['needed']:,} | "
                f"{row['wall_per_work']:.2f} | {100 * row['identical_share']:.1f} % |"
            )
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
