"""``make demo``: the main job on the embedded MNIST default, end to end.

1. Trains (or resumes / reuses) the models: the default SN-ResNet and its DDU class Gaussians (DeDUCE), a plain
   ResNet (JSMA, Wachter, REVISE and VLK, as the DeDUCE paper's baselines), a DEP classifier with its loss predictor
   (DISC), an independently trained oracle classifier that judges whether the counterfactuals convince another
   model, REVISE's VAE, VLK's autoencoder with its class prototypes, the WGAN of the AnoGAN score, a WGAN with a
   10-D latent and an AttGAN on the digits' measured Morpho-MNIST attributes (generative counterfactual
   introspection, GCI).
2. Explains the first 4 embedded-MNIST test digits towards every other class with DeDUCE, JSMA, Wachter, REVISE,
   VLK, DISC (LSO + INR + DEP) and GCI's latent-mode criticisms, and makes a GCI attribute-mode prototype of each
   digit (the attribute edit that makes the classifier surer of its own class), each through ``cfx test`` with a
   shipped config, recording the paths and the oracle's view and the AnoGAN realism score of every
   counterfactual and query (500 steps per restart instead of the paper's 4,000, to keep the demo short).
3. Prints the metric table over each method's own pairs and over the pairs every criticism method solved, and
   writes the HTML report of all runs side by side (``cfx-report``) to ``runs/demo/report/index.html``: pictures,
   paths, and under GCI's paths the attributes it changed most.

Each run is a resumable result store (``runs/demo/<config>/results.h5``): a second ``make demo`` reuses the trained
models and the finished stores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfx.cli import main as cli_main
from cfx.data import EmbeddedMNIST
from cfx.metrics import intersection_table, markdown_table
from cfx.results import Results, open_results
from cfx.results.report import write_report
from cfx.tasks import fit_and_save_class_gaussians
from cfx.tasks.prototypes import PROTOTYPES_FILENAME, fit_and_save_prototypes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SN_RESNET = CONFIGS / "classifier" / "embedded_mnist_sn_resnet.yaml"
GAUSSIANS = REPO / "checkpoints" / "embedded_mnist_sn_resnet" / "class_gaussians.pt"
MODELS = (
    SN_RESNET,
    CONFIGS / "classifier" / "embedded_mnist_resnet.yaml",
    CONFIGS / "dep" / "embedded_mnist.yaml",
    CONFIGS / "oracle" / "embedded_mnist_oracle.yaml",  # judges every method's counterfactuals independently
    CONFIGS / "vae" / "embedded_mnist.yaml",  # REVISE
    CONFIGS / "autoencoder" / "embedded_mnist.yaml",  # VLK (with the class prototypes below)
    CONFIGS / "gan" / "embedded_mnist.yaml",  # the WGAN of the AnoGAN realism score
    CONFIGS / "gan" / "embedded_mnist_latent10.yaml",  # GCI's latent mode (the paper's 10-D DCGAN latent)
    CONFIGS / "attgan" / "embedded_mnist.yaml",  # GCI's attribute mode (the digits' morphometric attributes)
)
GAN = REPO / "checkpoints" / "gan_embedded_mnist" / "last.ckpt"
ANOGAN_STEPS = 500  # per restart; the paper's 4,000 take ~3 s per image on 2 CPU cores (docs/RESULTS.md)
PLAIN_RESNET = REPO / "checkpoints" / "embedded_mnist_resnet" / "last.ckpt"
AUTOENCODER = REPO / "checkpoints" / "autoencoder_embedded_mnist" / "last.ckpt"
ORACLE = REPO / "checkpoints" / "oracle_embedded_mnist" / "last.ckpt"
CRITICISMS = {  # method name -> counterfactual config; each explains the same first test digits x their 9 other classes
    "DeDUCE": CONFIGS / "counterfactual" / "embedded_mnist_deduce.yaml",
    "JSMA": CONFIGS / "counterfactual" / "embedded_mnist_jsma.yaml",
    "Wachter": CONFIGS / "counterfactual" / "embedded_mnist_wachter.yaml",
    "REVISE": CONFIGS / "counterfactual" / "embedded_mnist_revise.yaml",
    "VLK": CONFIGS / "counterfactual" / "embedded_mnist_vlk.yaml",
    "DISC LSO+INR+DEP": CONFIGS / "counterfactual" / "embedded_mnist_lso_inr_dep.yaml",
    "GCI latent": CONFIGS / "counterfactual" / "embedded_mnist_gci_latent.yaml",
}
PROTOTYPES = {  # method name -> config pairing each of the same digits with its own class
    "GCI attribute prototypes": CONFIGS / "counterfactual" / "embedded_mnist_gci_attribute_prototypes.yaml",
}
METHODS = {**CRITICISMS, **PROTOTYPES}
QUERIES = 4
PATH_EVERY = 10
COLUMNS = (
    "pairs",
    "failure_rate",
    "l0",
    "l1",
    "mse",
    "concentration",
    "target_confidence",
    "iterations",
    "oracle_validity",
    "anogan",
    "query_anogan",
)


def say(message: str) -> None:
    """Print a demo step."""
    print(f"\n[cfx demo] {message}", flush=True)


def train_models() -> None:
    """Fit each model config (resuming from / reusing its last.ckpt), then the Gaussians and the prototypes."""
    for config in MODELS:
        say(f"training {config.relative_to(REPO)} (reuses its checkpoint when already trained)")
        cli_main(["fit", "-c", str(config), "--ckpt_path=last"])
    if not GAUSSIANS.is_file():
        say("fitting the DDU class Gaussians of the SN-ResNet on the training digits")
        fit_and_save_class_gaussians(GAUSSIANS.parent / "last.ckpt", EmbeddedMNIST(eval_batch_size=500))
    if not (AUTOENCODER.parent / PROTOTYPES_FILENAME).is_file():
        say("encoding the training digits with the autoencoder for VLK's class prototypes")
        fit_and_save_prototypes(AUTOENCODER, PLAIN_RESNET, EmbeddedMNIST(eval_batch_size=500))


def explain(output: Path) -> dict[str, Results]:
    """Run every method's counterfactual config on the same queries; return method -> its result store."""
    results = {}
    for name, config in METHODS.items():
        folder = output / config.stem
        targets = "their own class" if name in PROTOTYPES else "9 target classes"
        say(f"{name}: the first {QUERIES} test digits x {targets} ({config.relative_to(REPO)})")
        cli_main(
            [
                "test",
                "-c",
                str(config),
                f"--model.max_queries={QUERIES}",
                f"--model.output_dir={folder}",
                f"--model.explainer.init_args.path_every={PATH_EVERY}",  # the report shows the paths
                f"--model.oracle={ORACLE}",
                f"--model.realism={GAN}",
                f"--model.realism_options={{steps: {ANOGAN_STEPS}}}",
            ]
        )
        results[name] = open_results(folder)
    return results


def main(arguments: list[str] | None = None) -> None:
    """Train (or reuse) the models, explain test digits with every method, print the tables, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=REPO / "runs" / "demo", help="folder for the result stores and the report"
    )
    output = parser.parse_args(arguments).output
    train_models()
    results = explain(output)
    records = {name: result.record() for name, result in results.items()}
    own = {name: _columns(intersection_table({name: record})[name]) for name, record in records.items()}
    criticisms = {name: records[name] for name in CRITICISMS}
    common = {name: _columns(row) for name, row in intersection_table(criticisms).items()}
    say("each method over its own pairs (distances over its successful pairs)")
    print(markdown_table(own))
    say("over the pairs every criticism method solved (the DeDUCE paper's protocol)")
    print(markdown_table(common))
    report = write_report([output / config.stem for config in METHODS.values()], output / "report")
    say(f"report: {report} (open it in a browser: tables, pictures, paths, histograms)")
    say(f"results per method: {output}/<config>/results.h5 (cfx.results.open_results), metrics.json, grid.png")


def _columns(row: dict[str, float]) -> dict[str, float]:
    return {column: row[column] for column in COLUMNS if column in row}


if __name__ == "__main__":
    main()
