"""Generative counterfactual introspection (latent mode) on embedded MNIST, next to DeDUCE and JSMA on the same pairs.

Trains (or loads, when finished) the two classifiers, the 10-D-latent WGAN (configs/gan/embedded_mnist_latent10.yaml)
and the WGAN of the AnoGAN score (configs/gan/embedded_mnist.yaml), then on ``--batches`` batches of
``--batch-size`` embedded-MNIST test digits, each paired with the 9 classes other than its label:

- criticisms: ``GenerativeIntrospection(mode="latent", kind="criticism")`` on the plain ResNet (the settings
  of configs/counterfactual/embedded_mnist_gci_latent.yaml); success rate (goal >= 90 %), L1 =
  ``||x - G(z)||_1`` over its successes, seconds per counterfactual;
- the bisection against its first successful lambda: the same explainer with one round at ``lambda`` = 1, 10,
  100 (exactly the bisection's rounds before it has an upper bound); per pair the first of them that succeeds is
  "the first lambda that succeeds", and its L1 is compared with the bisection's over the pairs where both exist;
- prototypes: ``kind="prototype"`` towards each query's predicted class; the share of queries whose class
  probability at the prototype is above the query's own (goal >= 95 %) and above the inversion ``G(z0)``'s;
- DeDUCE (SN-ResNet, class Gaussians) and JSMA (plain ResNet) on the same pairs: success, L1, seconds;
- the AnoGAN score (paper settings unless ``--anogan-steps``) of the first ``--anogan-pairs`` pairs all three
  methods solved, and of their queries.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gci_table.py --batches 1 --batch-size 100

``--set OPTION=VALUE ...`` replaces settings of the config (e.g. ``learning_rate=0.1``); ``--criticisms-only`` runs
the criticisms alone (success, L1, seconds), for a sweep of one setting.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from deduce_table1 import PLAIN_CONFIG, SN_CONFIG, pair_metrics, query_pairs, timed, trained_classifier
from disc_table1 import explainer_options, parse_settings
from torch import Tensor

from cfx.cli import main
from cfx.counterfactual import JSMA, DeDUCE, GenerativeIntrospection
from cfx.data import EmbeddedMNIST
from cfx.metrics.functional.anogan import anogan_score
from cfx.nn import ClassGaussians
from cfx.tasks import fit_and_save_class_gaussians, load_classifier
from cfx.tasks.generative import load_generative

REPO = Path(__file__).resolve().parents[1]
GCI_CONFIG = REPO / "configs" / "counterfactual" / "embedded_mnist_gci_latent.yaml"
GCI_SETTINGS = {  # the config's explainer settings; mode and kind are set here, the path is not recorded
    key: value
    for key, value in explainer_options(GCI_CONFIG, GenerativeIntrospection).items()
    if key not in ("mode", "kind", "path_every")
}
FIRST_LAMBDAS = (1.0, 10.0, 100.0)  # the bisection's lambdas before an upper bound exists


def trained_gan(config: str, root: Path) -> Path:
    """Train (or resume, or load when finished) ``configs/gan/<config>.yaml`` into ``root/gan_<config>``."""
    folder = root / f"gan_{config}"
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "gan" / f"{config}.yaml"),
            f"--checkpoint.dirpath={folder}",
            "--ckpt_path=last",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return folder / "last.ckpt"


def probabilities(classifier: torch.nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """Softmax probability of ``classes`` for each image."""
    with torch.no_grad():
        return torch.softmax(classifier(images), dim=1).gather(1, classes[:, None])[:, 0]


def pairs_of_batch(datamodule: EmbeddedMNIST, batch: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`query_pairs` of one batch and each pair's dataset index (its query's)."""
    images, targets = query_pairs(datamodule, batch, size)
    return images, targets, torch.arange(batch * size, (batch + 1) * size).repeat_interleave(9)


def criticisms_only(args: argparse.Namespace, settings: dict) -> dict:
    """GCI latent-mode criticisms alone on the benchmark's pairs: success, L1 over the successes, seconds per CF."""
    plain_resnet = load_classifier(trained_classifier(PLAIN_CONFIG, args.checkpoint_root / "embedded_mnist_resnet", []))
    latent_gan = load_generative(trained_gan("embedded_mnist_latent10", args.checkpoint_root))
    datamodule = EmbeddedMNIST(eval_batch_size=500)
    datamodule.setup()
    explainer = GenerativeIntrospection(plain_resnet, latent_gan.generator, mode="latent", **settings)
    parts, seconds = [], 0.0
    for batch in range(args.batches):
        images, targets, pair_indices = pairs_of_batch(datamodule, batch, args.batch_size)
        result, elapsed = timed(partial(explainer.explain, images, targets, pair_indices))
        seconds += elapsed
        parts.append(pair_metrics(result, images))
    success, l1 = torch.cat([p["success"] for p in parts]), torch.cat([p["l1"] for p in parts])
    return {
        "pairs": len(success),
        "settings": settings,
        "success_percent": 100 * success.double().mean().item(),
        "l1_own": l1[success].mean().item(),
        "seconds_per_counterfactual": seconds / len(success),
    }


def run(args: argparse.Namespace) -> dict:
    settings = {**GCI_SETTINGS, **parse_settings(args.set)}
    if args.criticisms_only:
        return criticisms_only(args, settings)
    sn_checkpoint = trained_classifier(SN_CONFIG, args.checkpoint_root / "embedded_mnist_sn_resnet", [])
    plain_checkpoint = trained_classifier(PLAIN_CONFIG, args.checkpoint_root / "embedded_mnist_resnet", [])
    latent_gan = load_generative(trained_gan("embedded_mnist_latent10", args.checkpoint_root))
    realism_gan = load_generative(trained_gan("embedded_mnist", args.checkpoint_root))
    datamodule = EmbeddedMNIST(eval_batch_size=500)
    datamodule.setup()
    gaussians_path = sn_checkpoint.parent / "class_gaussians.pt"
    if not gaussians_path.is_file():
        fit_and_save_class_gaussians(sn_checkpoint, datamodule, gaussians_path)
    sn_resnet, plain_resnet = load_classifier(sn_checkpoint), load_classifier(plain_checkpoint)
    gci = partial(GenerativeIntrospection, plain_resnet, latent_gan.generator, mode="latent")
    explainers = {
        "GCI latent": gci(**settings),
        "DeDUCE": DeDUCE(sn_resnet, ClassGaussians.load(gaussians_path)),
        "JSMA": JSMA(plain_resnet),
    }
    first_round = {value: gci(**{**settings, "lambda_initial": value, "bisection_steps": 1}) for value in FIRST_LAMBDAS}
    prototype_settings = {**settings, "kind": "prototype", "prototype_confidence": args.prototype_confidence}
    prototype = gci(**prototype_settings)
    inversion_only = gci(**{**prototype_settings, "max_iterations": 0})

    metrics: dict[str, list[dict[str, Tensor]]] = {name: [] for name in [*explainers, *map(str, FIRST_LAMBDAS)]}
    counterfactuals: dict[str, list[Tensor]] = {name: [] for name in explainers}
    seconds = dict.fromkeys(explainers, 0.0)
    queries, prototype_rows = [], []
    for batch in range(args.batches):
        images, targets, pair_indices = pairs_of_batch(datamodule, batch, args.batch_size)
        query_indices = pair_indices[::9]
        for name, explainer in explainers.items():
            result, elapsed = timed(partial(explainer.explain, images, targets, pair_indices))
            seconds[name] += elapsed
            metrics[name].append(pair_metrics(result, images))
            counterfactuals[name].append(result.counterfactuals)
            print(f"batch {batch} {name}: {elapsed:.1f} s, {int(result.success.sum())}/{len(images)} succeeded")
        for value, explainer in first_round.items():
            result = explainer.explain(images, targets, pair_indices)
            metrics[str(value)].append(pair_metrics(result, images))
            print(f"batch {batch} GCI one round at lambda {value}: {int(result.success.sum())} succeeded")
        own = images[::9]
        queries.append(own)
        predicted = plain_resnet(own).argmax(dim=1)
        result, elapsed = timed(partial(prototype.explain, own, predicted, query_indices))
        start = inversion_only.explain(own, predicted, query_indices).counterfactuals
        prototype_rows.append(
            {
                "query": probabilities(plain_resnet, own, predicted),
                "inversion": probabilities(plain_resnet, start, predicted),
                "prototype": probabilities(plain_resnet, result.counterfactuals, predicted),
                "success": result.success,
                "seconds": torch.tensor([elapsed]),
            }
        )
        print(f"batch {batch} prototypes: {elapsed:.1f} s, {int(result.success.sum())}/{len(own)} reached the level")

    joined = {name: {key: torch.cat([m[key] for m in parts]) for key in parts[0]} for name, parts in metrics.items()}
    report: dict = {"pairs": len(joined["DeDUCE"]["success"]), "settings": settings}
    everyone = torch.stack([joined[name]["success"] for name in explainers]).all(dim=0)
    report["pairs_all_solved"] = int(everyone.sum())
    for name in explainers:
        success = joined[name]["success"]
        report[name] = {
            "success_percent": 100 * success.double().mean().item(),
            "l1_own": joined[name]["l1"][success].mean().item(),
            "l1_all_solved": joined[name]["l1"][everyone].mean().item(),
            "l0_all_solved": joined[name]["l0"][everyone].mean().item(),
            "seconds_per_counterfactual": seconds[name] / len(success),
        }

    # the first lambda that succeeds, per pair, from the one-round runs
    first_l1 = torch.full_like(joined["GCI latent"]["l1"], float("nan"))
    for value in reversed(FIRST_LAMBDAS):
        found = joined[str(value)]["success"]
        first_l1 = torch.where(found, joined[str(value)]["l1"], first_l1)
    compared = joined["GCI latent"]["success"] & ~first_l1.isnan()
    bisected = joined["GCI latent"]["l1"][compared]
    report["bisection"] = {
        "pairs_compared": int(compared.sum()),
        "first_successful_lambda_l1": first_l1[compared].mean().item(),
        "bisection_l1": bisected.mean().item(),
        "share_strictly_smaller": (bisected < first_l1[compared] - 1e-6).double().mean().item(),
        "share_larger": (bisected > first_l1[compared] + 1e-3).double().mean().item(),
    }

    rows = {key: torch.cat([row[key] for row in prototype_rows]) for key in prototype_rows[0]}
    below = rows["query"] < args.prototype_confidence  # a query at the level already is returned unchanged
    report["prototypes"] = {
        "queries": len(rows["query"]),
        "prototype_confidence": args.prototype_confidence,
        "queries_already_at_level": int((~below).sum()),
        "raised_over_query_percent_of_those_below": 100
        * (rows["prototype"] > rows["query"])[below].double().mean().item(),
        "raised_over_inversion_percent": 100 * (rows["prototype"] > rows["inversion"]).double().mean().item(),
        "reached_level_percent": 100 * rows["success"].double().mean().item(),
        "mean_probability_query": rows["query"].mean().item(),
        "mean_probability_inversion": rows["inversion"].mean().item(),
        "mean_probability_prototype": rows["prototype"].mean().item(),
        "seconds_per_prototype": rows["seconds"].sum().item() / len(rows["query"]),
    }

    scored = torch.nonzero(everyone).squeeze(1)[: args.anogan_pairs]
    pair_index = torch.arange(len(everyone))  # seeds the restarts: a pair's score is the same for every method
    settings = {"steps": args.anogan_steps}

    def realism(images: Tensor, indices: Tensor) -> float:
        return anogan_score(images, indices, realism_gan.generator, realism_gan.critic, **settings).mean().item()

    originals = torch.cat(queries)
    query_of_pair = scored // 9
    report["anogan"] = {
        "steps": args.anogan_steps,
        "pairs": len(scored),
        "queries": realism(originals[query_of_pair.unique()], query_of_pair.unique()),
    }
    for name in explainers:
        report["anogan"][name] = realism(torch.cat(counterfactuals[name])[scored], pair_index[scored])
        print(f"AnoGAN of {name}: {report['anogan'][name]:.2f}")
    return report


def parse(arguments: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1, help="batches of test digits")
    parser.add_argument("--batch-size", type=int, default=100, help="test digits per batch (x 9 targets)")
    parser.add_argument(
        "--prototype-confidence", type=float, default=0.999, help="class probability a prototype stops at"
    )
    parser.add_argument("--anogan-steps", type=int, default=4000, help="AnoGAN steps per restart (paper 4000)")
    parser.add_argument("--anogan-pairs", type=int, default=36, help="pairs all methods solved scored by AnoGAN")
    parser.add_argument("--checkpoint-root", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="OPTION=VALUE", help="GCI settings replacing the config's"
    )
    parser.add_argument(
        "--criticisms-only", action="store_true", help="only GCI's criticisms: success, L1, seconds (for sweeps)"
    )
    return parser.parse_args(arguments)


if __name__ == "__main__":
    options = parse()
    numbers = run(options)
    text = json.dumps(numbers, indent=2)
    print(text)
    if options.json is not None:
        options.json.write_text(text)
