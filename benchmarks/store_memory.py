"""Peak memory and wall-time overhead of the result store on a DeDUCE run (CounterfactualTask).

Each measurement runs in a fresh process (peak RSS is per process):

- ``store``: ``trainer.test`` — every batch is appended to ``results.h5`` and nothing is kept in memory;
- ``memory``: ``trainer.predict`` with ``return_predictions=True`` — the same run, but every pair's tensors
  (images included) are also kept in memory until the end, as the task did before the store.

The store's wall-time overhead is the time spent in ``StoreWriter.append`` plus the final merge / summary /
grid, against the explainer's own time (the ``seconds`` column). Uses the shipped SN-ResNet checkpoint and its
class Gaussians (``checkpoints/embedded_mnist_sn_resnet``; train them with ``make demo`` or the README commands).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/store_memory.py --queries 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "embedded_mnist_sn_resnet" / "last.ckpt"


def measure(mode: str, queries: int, output: Path) -> dict[str, float]:
    import functools

    import lightning as L
    import torch

    from cfx.counterfactual import DeDUCE
    from cfx.data import EmbeddedMNIST
    from cfx.results import store
    from cfx.tasks import CounterfactualTask

    torch.set_num_threads(1)
    spent = {"append": 0.0}
    append = store.StoreWriter.append

    def timed_append(self, *args, **kwargs):
        start = time.perf_counter()
        append(self, *args, **kwargs)
        spent["append"] += time.perf_counter() - start

    store.StoreWriter.append = timed_append
    task = CounterfactualTask(
        str(CHECKPOINT),
        functools.partial(DeDUCE),
        gaussians=str(CHECKPOINT.parent / "class_gaussians.pt"),
        output_dir=str(output),
        max_queries=queries,
        overwrite=True,
    )
    data = EmbeddedMNIST(eval_batch_size=50)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    finish = CounterfactualTask._finish

    def timed_finish(self):
        start = time.perf_counter()
        summary = finish(self)
        spent["finish"] = time.perf_counter() - start
        return summary

    CounterfactualTask._finish = timed_finish
    start = time.perf_counter()
    if mode == "store":
        trainer.test(task, data, verbose=False)
    else:
        kept = trainer.predict(task, data, return_predictions=True)
        assert sum(len(batch.get("index", ())) for batch in kept) > 0
    total = time.perf_counter() - start
    results = store.open_results(output)
    return {
        "pairs": len(results),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "run_seconds": total,
        "explainer_seconds": float(results["seconds"].sum()),
        "append_seconds": spent["append"],
        "finish_seconds": spent["finish"],
        "store_mib": results.path.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--mode", choices=("store", "memory"), help="(internal) measure one mode in this process")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.queries, args.output)))
        return
    if not CHECKPOINT.is_file() or not (CHECKPOINT.parent / "class_gaussians.pt").is_file():
        sys.exit(f"needs {CHECKPOINT} and its class_gaussians.pt (see the README)")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("store", "memory"):
            command = [sys.executable, __file__, "--mode", mode, "--queries", str(args.queries)]
            command += ["--output", str(Path(folder) / mode)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    store, memory = rows["store"], rows["memory"]
    print(f"DeDUCE, {args.queries} embedded-MNIST queries x 9 targets = {store['pairs']} pairs")
    print("| mode | peak RSS (MiB) | run (s) | explainer (s) | store appends (s) | merge + metrics + grid (s) |")
    print("|---|---|---|---|---|---|")
    for mode, row in rows.items():
        print(
            f"| {mode} | {row['peak_rss_mib']:.0f} | {row['run_seconds']:.1f} | {row['explainer_seconds']:.1f} | "
            f"{row['append_seconds']:.2f} | {row['finish_seconds']:.2f} |"
        )
    overhead = (store["append_seconds"] + store["finish_seconds"]) / store["explainer_seconds"]
    print(
        f"store file {store['store_mib']:.1f} MiB; store overhead {100 * overhead:.1f} % of the explainer's time; "
        f"keeping every pair in memory adds {memory['peak_rss_mib'] - store['peak_rss_mib']:.0f} MiB peak RSS"
    )


if __name__ == "__main__":
    main()
