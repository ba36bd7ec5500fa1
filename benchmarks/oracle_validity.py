"""Oracle validity per method: do the counterfactuals that fool the explained classifier convince an independent one?

Trains what is missing (``cfx fit ... --ckpt_path=last`` is a no-op on a finished checkpoint): the oracles of
``configs/oracle/embedded_mnist_oracle.yaml`` (10 classes, and the binary 4-vs-9 one for DISC), the classifiers
the counterfactual configs explain and the SN-ResNet's class Gaussians. Then runs each method's shipped config
(``cfx test``) on its first ``--queries`` test digits with ``--model.oracle``: DeDUCE, JSMA and Wachter on the
embedded-MNIST digits x the 9 other classes, the binary DISC configs on the 4-vs-9 digits x the other class.
Reports per method: pairs, validity (the explained classifier's), ``oracle_validity`` (the transfer rate: the
oracle predicts the target, over the successful pairs), the same over all pairs, the oracle's mean target and
original-class probability over the successful pairs, and each oracle's test accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/oracle_validity.py --queries 20 --disc lso_tvl2 lso_inr_dep
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/oracle_validity.py  # 20 queries, every method
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from deduce_table1 import trained_classifier  # benchmarks/ is this script's folder

from cfx.cli import main
from cfx.data import EmbeddedMNIST
from cfx.io import atomic_write_text
from cfx.results import open_results
from cfx.tasks import fit_and_save_class_gaussians, load_classifier

REPO = Path(__file__).resolve().parents[1]
ORACLE_CONFIG = REPO / "configs/oracle/embedded_mnist_oracle.yaml"
MULTICLASS = {  # method -> (counterfactual config, the config training its classifier)
    "DeDUCE": ("embedded_mnist_deduce", "classifier/embedded_mnist_sn_resnet"),
    "JSMA": ("embedded_mnist_jsma", "classifier/embedded_mnist_resnet"),
    "Wachter": ("embedded_mnist_wachter", "classifier/embedded_mnist_resnet"),
}
DISC_VARIANTS = ("lso_tvl2", "lso_dip", "lso_inr", "lso_dip_dep", "lso_inr_dep", "lso_inr_duq", "iso_dip", "iso_inr")
COLUMNS = (
    "pairs",
    "validity",
    "oracle_validity",
    "oracle_validity_all_pairs",
    "oracle_target_confidence",
    "oracle_original_confidence",
)


def accuracy(checkpoint: Path, classes: list[int] | None = None) -> float:
    """Test accuracy of a checkpoint's classifier on the embedded-MNIST test split (of ``classes``)."""
    datamodule = EmbeddedMNIST(eval_batch_size=500, classes=classes)
    datamodule.setup()
    classifier = load_classifier(checkpoint)
    correct = total = 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            correct += int((classifier(batch["image"]).argmax(dim=1) == batch["label"]).sum())
            total += len(batch["label"])
    return correct / total


def explained(config: str, classifier: Path, oracle: Path, output: Path, queries: int, *overrides: str) -> dict:
    """``cfx test`` of a counterfactual config with the oracle; the metric table of its result store."""
    main(
        [
            "test",
            "-c",
            str(REPO / "configs/counterfactual" / f"{config}.yaml"),
            f"--model.classifier={classifier}",
            f"--model.oracle={oracle}",
            f"--model.max_queries={queries}",
            f"--model.output_dir={output / config}",
            "--trainer.enable_progress_bar=false",
            *overrides,
        ]
    )
    return open_results(output / config).summary()


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    root = args.checkpoint_root
    oracle = trained_classifier(ORACLE_CONFIG, root / "oracle_embedded_mnist", [])
    report: dict[str, dict[str, float]] = {}
    accuracies = {"oracle (10 classes)": accuracy(oracle)}
    for method in args.methods:
        config, classifier_config = MULTICLASS[method]
        classifier = trained_classifier(
            REPO / "configs" / f"{classifier_config}.yaml", root / Path(classifier_config).name, []
        )
        extra = []
        if method == "DeDUCE":
            gaussians = classifier.parent / "class_gaussians.pt"
            if not gaussians.is_file():
                fit_and_save_class_gaussians(classifier, EmbeddedMNIST(eval_batch_size=500), gaussians)
            extra.append(f"--model.gaussians={gaussians}")
        report[method] = explained(config, classifier, oracle, args.output, args.queries, *extra)
    if args.disc:
        binary = ["--data.init_args.classes=[4,9]"]
        binary_oracle = trained_classifier(ORACLE_CONFIG, root / "oracle_embedded_mnist_binary", list(binary))
        accuracies["oracle (4 vs 9)"] = accuracy(binary_oracle, [4, 9])
    for variant in args.disc:
        auxiliary = "duq" if variant.endswith("duq") else "dep"
        classifier = trained_classifier(
            REPO / "configs" / auxiliary / "embedded_mnist_binary.yaml", root / f"{auxiliary}_embedded_mnist_binary", []
        )
        config = f"embedded_mnist_binary_{variant}"
        report[f"DISC {variant}"] = explained(config, classifier, binary_oracle, args.output, args.queries)
    for name, value in accuracies.items():
        print(f"{name} test accuracy: {value:.4f}")
    return {
        "methods": {name: {key: summary[key] for key in COLUMNS} for name, summary in report.items()},
        "oracle_accuracy": accuracies,
    }


def markdown(methods: dict[str, dict[str, float]]) -> str:
    lines = [
        "| method | pairs | validity | oracle validity (successful pairs) | oracle validity (all pairs) | "
        "oracle p(target) | oracle p(original) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in methods.items():
        cells = [f"{int(row['pairs'])}", *(f"{row[key]:.3f}" for key in COLUMNS[1:])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20, help="test digits per method (first of the split)")
    parser.add_argument("--methods", nargs="*", default=list(MULTICLASS), choices=list(MULTICLASS))
    parser.add_argument("--disc", nargs="*", default=list(DISC_VARIANTS), choices=DISC_VARIANTS, help="DISC configs")
    parser.add_argument("--checkpoint-root", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--output", type=Path, default=REPO / "runs/oracle_validity")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    results = run(arguments)
    print(markdown(results["methods"]))
    atomic_write_text(json.dumps(results, indent=2) + "\n", arguments.output / "oracle_validity.json")
