"""DEP benchmark: how well the jointly trained loss predictor ranks per-sample test losses on embedded MNIST.

Trains configs/dep/embedded_mnist.yaml (ResNet width 12 + loss predictor, 1.0 * CE + 0.5 * ranking loss) and
tests the last checkpoint on the 1,000 held-out digits: pairwise ranking accuracy of predicted vs true
cross-entropy (pairs with distinct true losses; chance = 0.5), Spearman correlation, and accuracy.

    nice -n 10 .venv/bin/python benchmarks/dep_ranking.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cfx.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(epochs: int, checkpoint_dir: Path) -> dict[str, float]:
    start = time.time()
    common = ["-c", str(REPO / "configs/dep/embedded_mnist.yaml"), f"--checkpoint.dirpath={checkpoint_dir}"]
    common.append("--trainer.enable_progress_bar=false")
    main(["fit", *common, f"--trainer.max_epochs={epochs}"])
    metrics = main(["test", *common, f"--ckpt_path={checkpoint_dir / 'last.ckpt'}"]).trainer.callback_metrics
    result = {name: metrics[f"test/{name}"].item() for name in ("ranking_acc", "spearman", "acc", "ce")}
    result["total_seconds"] = time.time() - start
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "runs" / "bench_dep")
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.epochs, arguments.checkpoint_dir), indent=2))
