"""A recorded sweep of DISC's settings on the binary 4-vs-9 task, judged by an independent oracle.

Trains what is missing (``cfx fit ... --ckpt_path=last`` is a no-op on a finished checkpoint): the DEP (and DUQ)
4-vs-9 classifiers of configs/{dep,duq}/embedded_mnist_binary.yaml, a DEP classifier with a spectrally
normalised ResNet (smoother input gradients; same recipe otherwise) and the binary oracle of
configs/oracle/embedded_mnist_oracle.yaml (another architecture and seed). Then runs each setting of
:data:`SETTINGS` -- a shipped binary DISC config plus explainer overrides -- through ``cfx test`` on the first
``--queries`` test 4s (towards 9) and reports per setting: validity (the explained classifier), oracle validity
over the successful pairs and over all pairs (the share of queries the oracle judges a 9), the oracle's mean
p(9), L1 / MSE / concentration over the successful pairs, and the stage each query finished in. Each setting's
``grid.png`` (query | counterfactual | difference, enlarged) is in ``--output/<setting>/``: look at them.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/disc_sweep.py --queries 16
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/disc_sweep.py --settings inr_dep_shipped inr_dep_all_schedule
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from deduce_table1 import trained_classifier  # benchmarks/ is this script's folder

from cfx.cli import main
from cfx.io import atomic_write_text
from cfx.results import open_results

REPO = Path(__file__).resolve().parents[1]
ORACLE_CONFIG = REPO / "configs/oracle/embedded_mnist_oracle.yaml"
EXPLAINER = "--model.explainer.init_args"
FIDELITY = [  # the paper's reading (issue 15): every stage map, the whole schedule, s* from real 9s, hinge L_mc
    f"{EXPLAINER}.semantic_layers=all",
    f"{EXPLAINER}.stop=schedule",
    f"{EXPLAINER}.stop_confidence=0.99",
    f"{EXPLAINER}.best_by=latest",
    f"{EXPLAINER}.manifold_form=hinge",
    f"{EXPLAINER}.target_loss=quantile",
    f"{EXPLAINER}.target_loss_quantile=0.5",
]
NO_DEP_FIDELITY = [item for item in FIDELITY if "manifold_form" not in item and "target_loss" not in item]


def with_overrides(base: list[str], **values: float) -> list[str]:
    """``base`` with the explainer options in ``values`` set (replacing the base's value of the same option)."""
    kept = [item for item in base if item.removeprefix(f"{EXPLAINER}.").split("=")[0] not in values]
    return [*kept, *(f"{EXPLAINER}.{name}={value}" for name, value in values.items())]


SETTINGS: dict[str, tuple[str, str, list[str]]] = {  # name -> (config variant, classifier, overrides)
    "inr_shipped": ("lso_inr", "dep", []),
    "inr_dep_shipped": ("lso_inr_dep", "dep", []),
    "inr_all_schedule": ("lso_inr", "dep", NO_DEP_FIDELITY),
    "inr_dep_all_schedule": ("lso_inr_dep", "dep", FIDELITY),
    "inr_dep_all_schedule_sem1": ("lso_inr_dep", "dep", with_overrides(FIDELITY, lambda_semantic=1.0)),
    "inr_dep_all_schedule_sem0.1": ("lso_inr_dep", "dep", with_overrides(FIDELITY, lambda_semantic=0.1)),
    "inr_dep_all_schedule_sem0.01": ("lso_inr_dep", "dep", with_overrides(FIDELITY, lambda_semantic=0.01)),
    "inr_all_schedule_sem0.01": ("lso_inr", "dep", with_overrides(NO_DEP_FIDELITY, lambda_semantic=0.01)),
    "inr_all_schedule_sem0.1": ("lso_inr", "dep", with_overrides(NO_DEP_FIDELITY, lambda_semantic=0.1)),
    "inr_dep_all_schedule_mc3": ("lso_inr_dep", "dep", with_overrides(FIDELITY, lambda_manifold=3.0)),
    "inr_dep_all_schedule_q0.1": ("lso_inr_dep", "dep", with_overrides(FIDELITY, target_loss_quantile=0.1)),
    "dip_dep_all_schedule": ("lso_dip_dep", "dep", FIDELITY),
    "dip_dep_all_schedule_sem0.1": ("lso_dip_dep", "dep", with_overrides(FIDELITY, lambda_semantic=0.1)),
    "inr_duq_all_schedule": ("lso_inr_duq", "duq", NO_DEP_FIDELITY),
    "inr_duq_all_schedule_sem0.1": ("lso_inr_duq", "duq", with_overrides(NO_DEP_FIDELITY, lambda_semantic=0.1)),
    "inr_dep_sn_all_schedule": ("lso_inr_dep", "dep_sn", FIDELITY),
    "inr_dep_sn_all_schedule_sem0.1": ("lso_inr_dep", "dep_sn", with_overrides(FIDELITY, lambda_semantic=0.1)),
}
CLASSIFIERS = {  # name -> (config, checkpoint folder, fit overrides)
    "dep": ("dep/embedded_mnist_binary", "dep_embedded_mnist_binary", []),
    "duq": ("duq/embedded_mnist_binary", "duq_embedded_mnist_binary", []),
    "dep_sn": (
        "dep/embedded_mnist_binary",
        "dep_sn_embedded_mnist_binary",
        [
            "--model.init_args.network.init_args.spectral_norm=true",
            "--model.init_args.network.init_args.coeff=4.0",
            "--model.init_args.network.init_args.activation=leaky_relu",
            "--model.init_args.network.init_args.avgpool_shortcut=true",
        ],
    ),
}
COLUMNS = ("pairs", "validity", "oracle_validity", "oracle_validity_all_pairs", "oracle_target_confidence", "l1", "mse")


def classifier(name: str, root: Path) -> Path:
    config, folder, overrides = CLASSIFIERS[name]
    return trained_classifier(REPO / "configs" / f"{config}.yaml", root / folder, overrides)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    oracle = trained_classifier(
        ORACLE_CONFIG, args.checkpoint_root / "oracle_embedded_mnist_binary", ["--data.init_args.classes=[4,9]"]
    )
    report = {}
    for name in args.settings:
        variant, classifier_name, overrides = SETTINGS[name]
        folder = args.output / name
        main(
            [
                "test",
                "-c",
                str(REPO / "configs/counterfactual" / f"embedded_mnist_binary_{variant}.yaml"),
                f"--model.classifier={classifier(classifier_name, args.checkpoint_root)}",
                f"--model.oracle={oracle}",
                f"--model.max_queries={args.queries}",
                "--model.targets=fixed",
                "--model.target_class=1",  # 4 (label 0) -> 9 (label 1); the 9s have no pair
                f"--model.output_dir={folder}",
                "--trainer.enable_progress_bar=false",
                *overrides,
            ]
        )
        results = open_results(folder)
        summary = results.summary()
        row = {key: float(summary[key]) for key in COLUMNS if key in summary}
        row["concentration"] = float(summary.get("concentration", float("nan")))
        if "stage" in results.extra_keys:
            stages = results.extra("stage")
            row["stages"] = {int(s): int((stages == s).sum()) for s in torch.unique(stages)}
        row["overrides"] = " ".join(item.removeprefix(f"{EXPLAINER}.") for item in overrides)
        report[name] = row
        print(name, json.dumps(row))
    return report


def markdown(report: dict[str, dict]) -> str:
    lines = [
        "| setting | classifier | pairs | validity | oracle validity (successes) | oracle validity (all) | "
        "oracle p(9) | L1 | MSE | concentration | finished in stage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report.items():
        cells = [
            name,
            SETTINGS[name][1],
            f"{int(row['pairs'])}",
            *(f"{row.get(key, float('nan')):.3f}" for key in (*COLUMNS[1:], "concentration")),
            ", ".join(f"{s}: {n}" for s, n in row.get("stages", {}).items()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(arguments: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=16, help="test digits of the binary split (4s get a pair)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--checkpoint-root", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--output", type=Path, default=REPO / "runs/disc_sweep")
    return parser.parse_args(arguments)


if __name__ == "__main__":
    options = parse()
    numbers = run(options)
    options.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(numbers, indent=2), options.output / "sweep.json")
    print(markdown(numbers))
