"""Speed of the batched DISC generators: one batched generator of Q queries vs a loop over Q single-query ones.

One step = forward, a fixed loss (sum over queries of the squared error to a fixed target), backward and an Adam
step (one foreach Adam over all parameters in both cases), in fp32 and under bf16 CPU autocast, for the INR and
DIP priors at their default sizes on 28x28 single-channel images. Prints a markdown table of the median time
per step (batched and loop steps alternate, after one warm-up step each, so load changes on a shared machine hit
both alike) and the batched speed-up; "bf16 max |dx|" is the largest output difference to fp32 at initialisation.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/generators_speed.py [--queries 32] [--steps 5] \
        [--options '{"inr": {"width": 64, "num_frequencies": 64, "sigma": 2.0}, "dip": {"width": 16}}']

``--options`` sets each prior's ``make_generator`` options (default: the paper-size defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from cfx.nn.generators import make_generator


class Stepper:
    """Forward + fixed loss + backward + one foreach Adam step over a list of generators (one batched or Q single)."""

    def __init__(self, generators: list, target: torch.Tensor, bf16: bool):
        self.generators, self.target, self.bf16 = generators, target, bf16
        self.optimizer = torch.optim.Adam([p for generator in generators for p in generator.parameters()], lr=1e-3)

    def __call__(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        for generator in self.generators:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            with autocast:
                images = generator()
            part = self.target[offset : offset + generator.num_queries]
            (images.float() - part).square().sum().backward()
            offset += generator.num_queries
        self.optimizer.step()
        return time.perf_counter() - start


def bf16_difference(generator) -> float:
    with torch.no_grad():
        reference = generator()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = generator()
    return (low.float() - reference).abs().max().item()


def run(kinds: list[str], queries: int, steps: int, size: int, options: dict | None = None) -> list[dict]:
    seeds = torch.arange(queries)
    target = torch.rand(queries, 1, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for kind in kinds:
        for bf16 in (False, True):
            kind_options = (options or {}).get(kind, {})
            batched = make_generator(kind, queries, 1, size, seeds, **kind_options)
            singles = [make_generator(kind, 1, 1, size, seeds[q : q + 1], **kind_options) for q in range(queries)]
            row = {"prior": kind, "precision": "bf16 autocast" if bf16 else "fp32"}
            steppers = {"batched": Stepper([batched], target, bf16), "loop": Stepper(singles, target, bf16)}
            times = {name: [] for name in steppers}
            for stepper in steppers.values():
                stepper()  # warm-up
            for _ in range(steps):
                for name, stepper in steppers.items():
                    times[name].append(stepper())
            row.update({name: statistics.median(values) for name, values in times.items()})
            row["bf16 max |dx|"] = bf16_difference(batched) if bf16 else 0.0
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(rows: list[dict], queries: int) -> str:
    fp32 = {row["prior"]: row["batched"] for row in rows if row["precision"] == "fp32"}
    lines = [
        f"| prior | precision | batched s/step (Q={queries}) | loop of Q=1 s/step | batched speed-up | "
        "batched vs fp32 batched | bf16 max abs output diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['prior']} | {row['precision']} | {row['batched']:.3f} | {row['loop']:.3f} | "
            f"{row['loop'] / row['batched']:.2f}x | {fp32[row['prior']] / row['batched']:.2f}x | "
            f"{row['bf16 max |dx|']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["inr", "dip"])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--options", type=json.loads, default={}, help="JSON: prior -> make_generator options")
    arguments = parser.parse_args()
    results = run(arguments.kinds, arguments.queries, arguments.steps, arguments.size, arguments.options)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), {arguments.size}x{arguments.size}, "
        f"options {arguments.options}\n"
    )
    print(markdown(results, arguments.queries))
