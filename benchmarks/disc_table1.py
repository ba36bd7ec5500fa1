"""DISC Table 1 on the binary embedded-MNIST task: five LSO variants, success, MSE, concentration, CD and time.

The task and the explained classifier F are those of configs/dep/embedded_mnist_binary.yaml (digit 4 -> label 0,
digit 9 -> label 1; a DEP ResNet, trained here with ``cfx fit ... --ckpt_path=last`` unless its checkpoint is
complete). The variants' DISC settings are the explainer ``init_args`` of
configs/counterfactual/embedded_mnist_binary_lso_*.yaml (only the prior, its learning rates and L_mc differ).
Every variant explains the same ``--max-queries`` class-0 training images (drawn with ``--query-seed``) towards
class 1, then :func:`cfx.tasks.classifier_discrepancy` trains ``F_ref`` on [queries, as many real class-1 images]
and ``F^c`` on [queries, counterfactuals] with F's recipe (optimiser, scheduler, epochs; batch size
``--train-batch-size`` so that the small training sets still get enough optimiser steps) and reports
CD = Acc(F_ref) - Acc(F^c), the small-compute adaptation of DISC's CD (see its docstring); Acc(F^c) also per class
of the test split (class 0 = the 4s, class 1 = the 9s: counterfactuals without class 1's semantics leave F^c
calling real 9s class 0). Each seed changes the generator initialisation (DISC's ``seed``) and the seed of
``F_ref`` / ``F^c`` training. MSE and concentration are means over the successful queries, and so is oracle
validity (the share the binary oracle of ``--oracle``, another architecture and seed, classifies as 9); time is
the explainer's wall-clock time per query. The script also times the batched generators against a per-query loop
(benchmarks/generators_speed.py) at Q = 32 in fp32 and bf16.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/disc_table1.py [--seeds 3] [--max-queries 48]

``--set OPTION=VALUE ...`` replaces DISC options of every variant, ``--dep-set`` those of the DEP variants only;
``target_loss=quantile`` becomes s* per class from the DEP predictor on the training split, as
CounterfactualTask fills it in (docs/RESULTS.md has the command of the fidelity run).

Writes runs/bench_disc/disc_table1.json and prints markdown tables. Cost on the shared 2-core CPU: one seed of
all five variants took 1.5 min (light load) to 3 min (heavy load) at 16 queries, roughly linear in the queries,
so the defaults (48 queries, 3 seeds) take about 15-27 min plus about a minute for the generator timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from generators_speed import markdown as speed_markdown
from generators_speed import run as speed_run
from lightning.pytorch.cli import instantiate_class
from torch import Tensor

from cfx.cli import main as cfx_main
from cfx.counterfactual import DISC
from cfx.metrics.functional import concentration, mse
from cfx.metrics.functional.counterfactual import oracle_measures
from cfx.tasks import classifier_discrepancy, load_classifier
from cfx.tasks.dep import target_loss_quantiles

VARIANTS = {
    "LSO+TV+L2": "lso_tvl2",
    "LSO+DIP": "lso_dip",
    "LSO+INR": "lso_inr",
    "LSO+DIP+DEP": "lso_dip_dep",
    "LSO+INR+DEP": "lso_inr_dep",
}
# Table 1 of DISC (CelebA smiling), for reference in the printed table
PAPER_CD = {"LSO+TV+L2": 0.31, "LSO+DIP": 0.23, "LSO+INR": 0.26, "LSO+DIP+DEP": 0.15, "LSO+INR+DEP": 0.08}


def read_yaml(path: Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def explainer_options(path: Path, explainer_class: type = DISC) -> dict:
    """The explainer ``init_args`` of a CounterfactualTask config whose explainer is ``explainer_class``."""
    explainer = read_yaml(path)["model"]["init_args"]["explainer"]
    public_path = f"cfx.counterfactual.{explainer_class.__name__}"
    if explainer["class_path"] not in (public_path, f"{explainer_class.__module__}.{explainer_class.__name__}"):
        raise ValueError(
            f"{path} does not configure a {explainer_class.__name__} explainer (got {explainer['class_path']})"
        )
    return dict(explainer["init_args"])


def parse_settings(items: list[str]) -> dict:
    """``OPTION=VALUE`` items as a dict, each value read as YAML (numbers, booleans, lists, null)."""
    settings = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise ValueError(f"expected OPTION=VALUE, got {item!r}")
        settings[name] = yaml.safe_load(value)
    return settings


def resolve_target_loss(options: dict, checkpoint: Path, datamodule) -> dict:
    """``target_loss: quantile`` replaced by s* per class as CounterfactualTask fills it in (DEP, training split)."""
    if options.get("target_loss") != "quantile":
        return options
    classifier = load_classifier(checkpoint)
    datamodule.setup("fit")
    quantiles = target_loss_quantiles(
        classifier,
        datamodule.eval_dataloader("train"),
        options.get("target_loss_quantile", 0.5),
        classifier.num_classes,
    )
    return {**options, "target_loss": quantiles}


def ensure_classifier(config: Path) -> Path:
    """F's checkpoint; trained (or resumed) with ``cfx fit -c config --ckpt_path=last`` unless it is complete."""
    settings = read_yaml(config)
    checkpoint = Path(settings["checkpoint"]["dirpath"]) / "last.ckpt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        processed = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        if processed >= settings["trainer"]["max_epochs"]:
            return checkpoint
    print(f"training F: cfx fit -c {config} --ckpt_path=last", flush=True)
    cfx_main(["fit", "-c", str(config), "--ckpt_path=last"])
    return checkpoint


def oracle_validity(oracle: torch.nn.Module | None, counterfactuals: Tensor, success: Tensor) -> float:
    """Share of the successful counterfactuals the oracle classifies as class 1 (the target of every query)."""
    if oracle is None or not success.any():
        return math.nan
    with torch.no_grad():
        probabilities = torch.softmax(oracle(counterfactuals[success]), dim=1)
    targets = torch.ones(int(success.sum()), dtype=torch.long)
    measures = oracle_measures(probabilities, targets, torch.zeros_like(targets))
    return measures["oracle_valid"].double().mean().item()


def run_variant(
    name: str, options: dict, checkpoint: Path, datamodule, seed: int, args, oracle: torch.nn.Module | None
) -> dict:
    explainer = functools.partial(DISC, **{**options, "bf16": args.bf16, "seed": seed})
    result = classifier_discrepancy(
        checkpoint,
        datamodule,
        explainer,
        max_queries=args.max_queries,
        query_batch_size=args.query_batch_size,
        batch_size=args.train_batch_size,
        seed=seed,
        query_seed=args.query_seed,
    )
    success = result.explanation.success
    counterfactuals = result.explanation.counterfactuals
    mse_values = mse(result.queries, counterfactuals)[success]
    concentration_values = concentration(result.queries, counterfactuals)[success]
    record = {
        "variant": name,
        "seed": seed,
        "queries": len(result.indices),
        "success_rate": result.success_rate,
        "mse": mse_values.mean().item() if len(mse_values) else math.nan,
        "concentration": concentration_values.mean().item() if len(concentration_values) else math.nan,
        "cd": result.discrepancy,
        "acc_reference": result.reference_accuracy,
        "acc_counterfactual": result.counterfactual_accuracy,
        "acc_counterfactual_class0": result.counterfactual_class_accuracy[0],
        "acc_counterfactual_class1": result.counterfactual_class_accuracy[1],
        "acc_f": result.classifier_accuracy,
        "oracle_validity": oracle_validity(oracle, counterfactuals, success),
        "seconds_per_query": result.seconds / len(result.indices),
        "mean_iterations": result.explanation.iterations.float().mean().item(),
        "indices": result.indices.tolist(),
    }
    print({key: value for key, value in record.items() if key != "indices"}, flush=True)
    return record


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def summarise(records: list[dict]) -> dict[str, dict]:
    keys = (
        "success_rate",
        "mse",
        "concentration",
        "cd",
        "acc_reference",
        "acc_counterfactual",
        "acc_counterfactual_class0",
        "acc_counterfactual_class1",
        "oracle_validity",
        "seconds_per_query",
    )
    summary = {}
    for name in VARIANTS:
        rows = [record for record in records if record["variant"] == name]
        if rows:
            summary[name] = {key: mean_std([row[key] for row in rows]) for key in keys}
    return summary


def orderings(summary: dict[str, dict]) -> dict[str, bool]:
    cd = {name: values["cd"][0] for name, values in summary.items()}
    conc = {name: values["concentration"][0] for name, values in summary.items()}
    others = [name for name in VARIANTS if name != "LSO+TV+L2"]
    return {
        "CD(LSO+INR+DEP) < CD(LSO+INR)": cd["LSO+INR+DEP"] < cd["LSO+INR"],
        "CD(LSO+DIP+DEP) < CD(LSO+DIP)": cd["LSO+DIP+DEP"] < cd["LSO+DIP"],
        "CD(LSO+TV+L2) > every other CD": all(cd["LSO+TV+L2"] > cd[name] for name in others),
        "concentration(LSO+INR+DEP) < every other": all(
            conc["LSO+INR+DEP"] < conc[name] for name in VARIANTS if name != "LSO+INR+DEP"
        ),
    }


def table(summary: dict[str, dict], seeds: int) -> str:
    def cell(pair: tuple[float, float], digits: int = 3) -> str:
        mean, std = pair
        return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        f"| variant | success | MSE | concentration | CD (mean ± std, {seeds} seed(s)) | Acc(F_ref) | Acc(F^c) | "
        "Acc(F^c) class 0 / class 1 | oracle validity | s / query | paper CD (CelebA) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, values in summary.items():
        lines.append(
            f"| {name} | {cell(values['success_rate'], 2)} | {cell(values['mse'], 4)} | "
            f"{cell(values['concentration'])} | {cell(values['cd'])} | {cell(values['acc_reference'])} | "
            f"{cell(values['acc_counterfactual'])} | {cell(values['acc_counterfactual_class0'])} / "
            f"{cell(values['acc_counterfactual_class1'])} | {cell(values['oracle_validity'])} | "
            f"{cell(values['seconds_per_query'], 2)} | {PAPER_CD[name]} |"
        )
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier-config", type=Path, default=Path("configs/dep/embedded_mnist_binary.yaml"))
    parser.add_argument("--config-dir", type=Path, default=Path("configs/counterfactual"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--max-queries", type=int, default=48, help="class-0 training images explained per run")
    parser.add_argument("--query-seed", type=int, default=0, help="seed of the query subset (fixed over seeds)")
    parser.add_argument("--query-batch-size", type=int, default=48, help="queries optimised together")
    parser.add_argument(
        "--train-batch-size", type=int, default=16, help="batch size of F_ref / F^c (F's epochs and scheduler)"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="DISC options (YAML values) replacing the configs' in every variant, e.g. stop=schedule",
    )
    parser.add_argument(
        "--dep-set",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="DISC options for the DEP variants only, e.g. manifold_form=hinge target_loss=quantile",
    )
    parser.add_argument(
        "--oracle",
        type=Path,
        default=Path("checkpoints/oracle_embedded_mnist_binary/last.ckpt"),
        help="binary 4-vs-9 oracle checkpoint (benchmarks/disc_sweep.py trains it); skipped when missing",
    )
    parser.add_argument("--bf16", action="store_true", help="DISC under bf16 autocast")
    parser.add_argument("--speed-queries", type=int, default=32)
    parser.add_argument("--speed-steps", type=int, default=3, help="timed steps per generator (0 = skip)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench_disc"))
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    start = time.perf_counter()
    checkpoint = ensure_classifier(args.classifier_config)
    datamodule = instantiate_class((), read_yaml(args.classifier_config)["data"])
    options = {}
    for name in args.variants:
        # manifold: dep reads the loss predictor from the DEP classifier that classifier_discrepancy loads
        options[name] = {
            **explainer_options(args.config_dir / f"embedded_mnist_binary_{VARIANTS[name]}.yaml"),
            **parse_settings(args.set),
        }
        if options[name].get("manifold") == "dep":
            options[name] = resolve_target_loss(
                {**options[name], **parse_settings(args.dep_set)}, checkpoint, datamodule
            )
    oracle = load_classifier(args.oracle).eval() if args.oracle.is_file() else None
    records = [
        run_variant(name, options[name], checkpoint, datamodule, seed, args, oracle)
        for seed in range(args.seeds)
        for name in args.variants
    ]
    summary = summarise(records)
    disc_minutes = (time.perf_counter() - start) / 60
    speed_rows = speed_run(["inr", "dip"], args.speed_queries, args.speed_steps, 28) if args.speed_steps else []
    report = {
        "command": " ".join(sys.argv),
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "explainer_options": options,
        "records": records,
        "summary": {name: {key: list(pair) for key, pair in values.items()} for name, values in summary.items()},
        "orderings": orderings(summary) if len(summary) == len(VARIANTS) else {},
        "generator_speed": speed_rows,
        "disc_minutes": disc_minutes,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "disc_table1.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    first = records[0]
    print(f"\nAcc(F, test) = {first['acc_f']:.3f}; {first['queries']} queries; DISC part {disc_minutes:.1f} min\n")
    print(table(summary, args.seeds))
    for claim, holds in report["orderings"].items():
        print(f"- {claim}: {'yes' if holds else 'NO'}")
    if speed_rows:
        print()
        print(speed_markdown(speed_rows, args.speed_queries))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
