"""Speed of the batched DISC generators: one batched generator of Q queries vs a loop over Q single-query ones.

One step = forward, a fixed loss (sum over queries of the squared error to a fixed target), backward and an Adam
step (one foreach Adam over all parameters in both cases), in fp32 and under bf16 CPU autocast, for the INR and
DIP priors at their default sizes on 28x28 single-channel images. Prints a markdown table of the median time
per step (batched and loop steps alternate, after one warm-up step each, so load changes on a shared machine hit
both alike) and the batched speed-up; "bf16 max |dx|" is the largest output difference to fp32 at initialisation.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/generators_speed.py [--queries 32] [--steps 5] \
        [--options '{"inr": {"width": 64, "num_frequencies": 64, "sigma": 2.0}, "dip": {"width": 16}}']

``--options`` sets each prior's ``make_generator`` options (default: the paper-size defaults).

For the INR it also prints a bound on what *any* batching can gain on this machine: the matrix-product FLOPs of
one query's step, the best fp32 matrix-product rate ``torch.mm`` reaches here (a large square product and the
INR's own first-layer shape), and ``loop s per query-step / (FLOPs / best rate)`` -- the speed-up of a batched
step that ran its matrix products at that best rate and spent nothing else (batching cannot remove FLOPs).
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


def inr_step_flops(generator) -> int:
    """Matrix-product FLOPs of one fp32 step of a single-query INR: forward, weight gradients, input gradients.

    The first layer's input (the fixed Fourier features) needs no gradient; every other layer's does.
    """
    pixels = generator.features.shape[1]
    shapes = [tuple(layer.weight.shape[1:]) for layer in [*generator.sine_layers, generator.output]]
    forward = sum(fan_in * fan_out for fan_in, fan_out in shapes)
    input_gradients = sum(fan_in * fan_out for fan_in, fan_out in shapes[1:])
    return 2 * pixels * (2 * forward + input_gradients)


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20) -> float:
    """Median fp32 ``torch.mm`` rate (GFLOP/s) for an ``(m, k) @ (k, n)`` product."""
    left, right = torch.rand(m, k), torch.rand(k, n)
    torch.mm(left, right)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(left, right)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def inr_batching_bound(rows: list[dict], queries: int, size: int, options: dict) -> dict[str, float] | None:
    """The most a batched INR step could gain over the measured per-query loop (see the module docstring)."""
    loop = next((row["loop"] for row in rows if row["prior"] == "inr" and row["precision"] == "fp32"), None)
    if loop is None:
        return None
    generator = make_generator("inr", 1, 1, size, torch.arange(1), **options.get("inr", {}))
    first_in, first_out = generator.sine_layers[0].weight.shape[1:]
    best_rate = max(matmul_gflops(2048, 2048, 2048, repeats=5), matmul_gflops(size * size, first_in, first_out))
    flops = inr_step_flops(generator)
    loop_per_query = loop / queries
    ideal_per_query = flops / (best_rate * 1e9)
    return {
        "gflop_per_query_step": flops / 1e9,
        "loop_gflops": flops / loop_per_query / 1e9,
        "best_matmul_gflops": best_rate,
        "max_batched_speedup": loop_per_query / ideal_per_query,
    }


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
    bound = inr_batching_bound(results, arguments.queries, arguments.size, arguments.options)
    if bound is not None:
        print(
            f"\nINR fp32: {bound['gflop_per_query_step']:.3f} GFLOP of matrix products per query-step; the loop runs "
            f"them at {bound['loop_gflops']:.1f} GFLOP/s, torch.mm peaks at {bound['best_matmul_gflops']:.1f} GFLOP/s "
            f"here -> no batching can beat the loop by more than {bound['max_batched_speedup']:.2f}x"
        )
