"""``make demo``: the main job on the embedded MNIST default, end to end.

1. Trains (or resumes / reuses) the classifiers: the default SN-ResNet and its DDU class Gaussians (DeDUCE),
   a plain ResNet (JSMA, as in the DeDUCE paper) and a DEP classifier with its loss predictor (DISC).
2. Explains the first few embedded-MNIST test digits towards every other class with DeDUCE and JSMA, and the
   first digit with DISC (LSO + INR + DEP), each through ``cfx test`` with a shipped config.
3. Prints the metric table over the pairs every method solved and over each method's own pairs, and writes a
   picture grid (query | each method's counterfactual and difference) to ``runs/demo/grid.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from cfx.cli import main as cli_main
from cfx.data import EmbeddedMNIST
from cfx.io import atomic_path
from cfx.metrics import intersection_table, markdown_table
from cfx.tasks import fit_and_save_class_gaussians, frame_failures, load_counterfactual_results

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SN_RESNET = CONFIGS / "classifier" / "embedded_mnist_sn_resnet.yaml"
GAUSSIANS = REPO / "checkpoints" / "embedded_mnist_sn_resnet" / "class_gaussians.pt"
CLASSIFIERS = (
    SN_RESNET,
    CONFIGS / "classifier" / "embedded_mnist_resnet.yaml",
    CONFIGS / "dep" / "embedded_mnist.yaml",
)
METHODS = {  # method name -> (counterfactual config, queries explained towards their 9 other classes)
    "DeDUCE": (CONFIGS / "counterfactual" / "embedded_mnist_deduce.yaml", 4),
    "JSMA": (CONFIGS / "counterfactual" / "embedded_mnist_jsma.yaml", 4),
    "DISC LSO+INR+DEP": (CONFIGS / "counterfactual" / "embedded_mnist_lso_inr_dep.yaml", 1),
}
COLUMNS = ("pairs", "failure_rate", "l0", "l1", "mse", "concentration", "target_confidence", "iterations")


def say(message: str) -> None:
    """Print a demo step."""
    print(f"\n[cfx demo] {message}", flush=True)


def train_classifiers() -> None:
    """Fit each classifier config (resuming from / reusing its last.ckpt), then the SN-ResNet's Gaussians."""
    for config in CLASSIFIERS:
        say(f"training {config.relative_to(REPO)} (reuses its checkpoint when already trained)")
        cli_main(["fit", "-c", str(config), "--ckpt_path=last"])
    if not GAUSSIANS.is_file():
        say("fitting the DDU class Gaussians of the SN-ResNet on the training digits")
        fit_and_save_class_gaussians(GAUSSIANS.parent / "last.ckpt", EmbeddedMNIST(eval_batch_size=500))


def explain(output: Path) -> dict[str, dict]:
    """Run every method's counterfactual config on its queries; return method -> loaded results."""
    results = {}
    for name, (config, queries) in METHODS.items():
        folder = output / config.stem
        say(f"{name}: the first {queries} test digit(s) x 9 target classes ({config.relative_to(REPO)})")
        cli_main(["test", "-c", str(config), f"--model.max_queries={queries}", f"--model.output_dir={folder}"])
        results[name] = load_counterfactual_results(folder / "counterfactuals.pt")
    return results


def picture_grid(results: dict[str, dict], path: Path) -> None:
    """Write one row per (query, target) pair every method explained.

    A row holds the query, then per method the counterfactual and the difference (a failed search shows its last
    iterate in a red frame; the tables count successes only).
    """
    keys = {name: list(zip(r["index"].tolist(), r["target"].tolist(), strict=True)) for name, r in results.items()}
    common = sorted(set.intersection(*(set(k) for k in keys.values())))
    if not common:
        return
    rgb = {name: r["originals"].float().expand(-1, 3, -1, -1) for name, r in results.items()}
    framed = {name: frame_failures(r["counterfactuals"], r["success"]) for name, r in results.items()}
    differences = {
        name: ((r["counterfactuals"].float() - r["originals"].float() + 1) / 2).expand(-1, 3, -1, -1)
        for name, r in results.items()
    }
    rows = []
    for pair in common:
        first = next(iter(results))
        row = [rgb[first][keys[first].index(pair)]]
        for name in results:
            position = keys[name].index(pair)
            row += [framed[name][position], differences[name][position]]
        rows.append(torch.stack(row))
    tiles = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=4, mode="nearest")  # visible digits
    with atomic_path(path) as temporary:
        save_image(tiles.clamp(0, 1), temporary, format="png", nrow=1 + 2 * len(results), padding=4, pad_value=1.0)


def main(arguments: list[str] | None = None) -> None:
    """Train (or reuse) the models, explain test digits with three methods, print the tables, save the grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "demo", help="folder for results and grid")
    output = parser.parse_args(arguments).output
    train_classifiers()
    results = explain(output)
    own = {name: _columns(intersection_table({name: result})[name]) for name, result in results.items()}
    common = {name: _columns(row) for name, row in intersection_table(results).items()}
    say("each method over its own pairs (distances over its successful pairs)")
    print(markdown_table(own))
    say("over the pairs every method solved (the DeDUCE paper's protocol)")
    print(markdown_table(common))
    grid = output / "grid.png"
    picture_grid(results, grid)
    say(f"pictures: {grid} (query | then per method: counterfactual, difference; grey = unchanged)")
    say(f"results per method: {output}/<config>/counterfactuals.pt, metrics.json, grid.png")


def _columns(row: dict[str, float]) -> dict[str, float]:
    return {column: row[column] for column in COLUMNS if column in row}


if __name__ == "__main__":
    main()
