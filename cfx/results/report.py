"""``cfx-report``: one self-contained HTML page comparing the result stores of counterfactual runs.

``cfx-report runs/demo/embedded_mnist_deduce runs/demo/embedded_mnist_jsma --output runs/demo/report`` reads each
run's store (``cfx.results.open_results``; one run per method, all of the same queries) and writes
``index.html`` with the PNGs it shows beside it (nothing is fetched from the network when the page opens):

- the metric table per method over all its pairs and over the pairs every method solved (the DeDUCE protocol,
  ``cfx.metrics.intersection_table``);
- histograms of L0, L1 and iterations per method (successful pairs);
- one row per (query, target) pair: query | per method its counterfactual and ``|difference|`` heat map, each
  labelled; a failed search's last iterate is framed in red;
- the optimisation path of each shown pair as a strip, for every run that recorded one; for a method that edits
  named attributes or latent dimensions (``GenerativeIntrospection``: the ``top_attributes`` and
  ``attribute_change`` extras) the most-changed ones are named under the strip with their change.

A folder written by ``cfx-report`` holds a manifest (``cfx-report.json``); only such a folder (or an empty or
missing one) is replaced by a new report.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from cfx.metrics.counterfactual import intersection_table
from cfx.results.pictures import colormap_bar, pair_captions, pair_tiles, path_strip, save_png
from cfx.results.store import Results, open_results

MANIFEST = "cfx-report.json"
REPORT_FORMAT = "cfx.report"
HISTOGRAMS = (("l0", "L0 (entries changed)"), ("l1", "L1"), ("iterations", "iterations"))
QUERY_ATOL = 1e-3  # float16-stored queries match their uint8-stored twins to within this


@dataclass(frozen=True)
class Run:
    """One run's store as the report reads it.

    Attributes:
        name: the method's name in the report (its explainer class; the run folder's name is added when two runs
            share a class).
        results: the opened store.
        record: its per-pair record, sorted by ``(index, target)``.
        rows: the store row of each sorted pair.
    """

    name: str
    results: Results
    record: dict[str, Tensor]
    rows: Tensor


def load_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Open the store of each run folder (or ``results.h5``) and name the runs.

    Raises:
        FileNotFoundError: a folder without a store (naming it).
        ValueError: no folders, a store that cannot be read, or the same store twice.
    """
    if not folders:
        raise ValueError("cfx-report needs at least one run folder")
    opened = []
    for folder in folders:
        try:
            opened.append(open_results(folder))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{folder} holds no counterfactual result store (results.h5): give the output_dir of a "
                f"`cfx test -c configs/counterfactual/...` run ({error})"
            ) from error
    paths = [results.path.resolve() for results in opened]
    if len(set(paths)) < len(paths):
        raise ValueError(f"the same store is given twice: {[str(path) for path in paths]}")
    methods = [results.method for results in opened]
    runs = []
    for results, method in zip(opened, methods, strict=True):
        name = method if methods.count(method) == 1 else f"{method} ({results.path.parent.name})"
        record = results.record()
        order = _sorted_order(record)
        runs.append(Run(name, results, {key: value[order] for key, value in record.items()}, order))
    return runs


def check_same_queries(runs: Sequence[Run]) -> None:
    """Refuse runs of different queries: each must hold the same dataset indices with the same query images.

    Raises:
        ValueError: saying which indices only some runs hold, or at which indices the query images differ.
    """
    first = runs[0]
    reference = torch.unique(first.record["index"])
    for run in runs[1:]:
        indices = torch.unique(run.record["index"])
        if not torch.equal(indices, reference):
            only_first = reference[~torch.isin(reference, indices)].tolist()
            only_run = indices[~torch.isin(indices, reference)].tolist()
            raise ValueError(
                f"the runs explain different queries: {first.name} ({first.results.path}) has {len(reference)} "
                f"queries, {run.name} ({run.results.path}) {len(indices)}; dataset indices only in {first.name}: "
                f"{_few(only_first)}, only in {run.name}: {_few(only_run)} (explain the same queries, e.g. the "
                "same --model.max_queries)"
            )
    images = {run.name: run.results.images("originals", run.rows[_first_of_each(run.record["index"])]) for run in runs}
    for run in runs[1:]:
        if images[run.name].shape != images[first.name].shape:
            raise ValueError(
                f"the query images of {first.name} are {tuple(images[first.name].shape[1:])}, of {run.name} "
                f"{tuple(images[run.name].shape[1:])}: the runs explain different data"
            )
        differs = (images[run.name] - images[first.name]).abs().flatten(1).amax(dim=1) > QUERY_ATOL
        if differs.any():
            raise ValueError(
                f"the query images of {first.name} and {run.name} differ at dataset indices "
                f"{_few(reference[differs].tolist())}: the runs explain different data"
            )


def metric_tables(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"own": ..., "common": ...}``: each run's own metric table (its store's summary) and the intersection table."""
    return {
        "own": {run.name: run.results.summary() for run in runs},
        "common": intersection_table({run.name: run.record for run in runs}),
    }


def shown_pairs(runs: Sequence[Run], max_pairs: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The first ``max_pairs`` pairs ``(index, target)`` of any run, and each run's position of them (-1: absent).

    Returns:
        ``(pairs, positions)``: ``(S, 2)`` int64 pairs in ``(index, target)`` order, and run name -> ``(S,)``
        positions in its sorted record.
    """
    width = 1 + max(int(run.record["target"].max()) if len(run.record["target"]) else 0 for run in runs)
    keys = {run.name: run.record["index"] * width + run.record["target"] for run in runs}
    union = torch.unique(torch.cat(list(keys.values())))[:max_pairs]
    positions = {}
    for name, key in keys.items():
        found = torch.searchsorted(key, union).clamp(max=max(len(key) - 1, 0))
        present = key[found] == union if len(key) else torch.zeros(len(union), dtype=torch.bool)
        positions[name] = torch.where(present, found, -1)
    return torch.stack([union // width, union % width], dim=1), positions


def write_report(
    folders: Sequence[str | Path], output: str | Path, max_pairs: int = 48, max_paths: int = 8, min_size: int = 112
) -> Path:
    """Write the report of the runs in ``folders`` to ``output`` (``index.html`` and its PNGs).

    The report is built in a fresh folder beside ``output`` and moved into place at the end, so ``output`` is
    the old report or the new one, never a mix.

    Args:
        folders: the run folders (``output_dir`` of ``cfx test`` runs) or their ``results.h5`` files.
        output: the report folder: missing, empty, or a previous report.
        max_pairs: most (query, target) pairs shown as pictures.
        max_paths: most optimisation paths shown per run.
        min_size: the smallest picture side in pixels (nearest upscaling).

    Returns:
        The path of ``index.html``.

    Raises:
        FileNotFoundError: a run folder without a store.
        ValueError: stores of different queries, or ``output`` exists and is not a previous report.
    """
    if max_pairs < 1 or max_paths < 0 or min_size < 1:
        raise ValueError(
            f"need max_pairs >= 1, max_paths >= 0, min_size >= 1; got {max_pairs}, {max_paths}, {min_size}"
        )
    output = Path(output)
    _check_output(output)
    runs = load_runs(folders)
    check_same_queries(runs)
    output.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        files = _write_pictures_and_page(runs, building, max_pairs, max_paths, min_size)
        manifest = {"format": REPORT_FORMAT, "runs": [str(run.results.path) for run in runs], "files": files}
        (building / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(building, 0o755)  # mkdtemp makes the folder private
        _replace(output, building)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return output / "index.html"


def _check_output(output: Path) -> None:
    """Refuse an ``output`` that is a file, or a folder holding anything a previous report did not write."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a report folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    manifest = output / MANIFEST
    listed: set[str] = set()
    if manifest.is_file():
        try:
            content = json.loads(manifest.read_text())
            if content.get("format") == REPORT_FORMAT:
                listed = {*content["files"], MANIFEST}
        except (ValueError, KeyError, TypeError, AttributeError):
            listed = set()
    present = {str(path.relative_to(output)) for path in output.rglob("*") if path.is_file()}
    unrelated = sorted(present - listed)
    if unrelated:
        raise ValueError(
            f"--output {output} exists and is not a previous cfx report (it holds files cfx-report did not "
            f"write: {_few(unrelated)}); choose a new folder"
        )


def _replace(output: Path, built: Path) -> None:
    """Move the finished report folder ``built`` to ``output``, replacing a previous report there."""
    if not output.exists():
        os.replace(built, output)
        return
    retired = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".old"))
    os.replace(output, retired / "report")
    os.replace(built, output)
    shutil.rmtree(retired)


def _write_pictures_and_page(runs: Sequence[Run], folder: Path, max_pairs: int, max_paths: int, min_size: int) -> list:
    """Write every PNG and ``index.html`` into ``folder``; return the files written (relative paths)."""
    files: list[str] = []

    def save(image: Tensor, name: str) -> str:
        save_png(image, folder / name)
        files.append(name)
        return name

    pairs, positions = shown_pairs(runs, max_pairs)
    tiles, captions = {}, {}
    for number, run in enumerate(runs):
        present = positions[run.name] >= 0
        rows = run.rows[positions[run.name][present]]
        if not len(rows):
            continue
        originals = run.results.images("originals", rows)
        counterfactuals = run.results.images("counterfactuals", rows)
        made = pair_tiles(originals, counterfactuals, run.record["success"][positions[run.name][present]], min_size)
        for slot, (shown, position) in enumerate(
            zip(present.nonzero().flatten().tolist(), positions[run.name][present].tolist(), strict=True)
        ):
            tiles.setdefault(shown, {})
            captions.setdefault(shown, {})[run.name] = pair_captions(run.record, position)
            if "query" not in tiles[shown]:
                tiles[shown]["query"] = save(made["query"][slot], f"pairs/{shown:04d}_query.png")
            tiles[shown][run.name] = {
                key: save(made[key][slot], f"pairs/{shown:04d}_{number}_{key}.png")
                for key in ("counterfactual", "difference")
            }
    paths = {}
    for number, run in enumerate(runs):
        if "path" not in run.results.image_keys or max_paths == 0:
            continue
        present = (positions[run.name] >= 0).nonzero().flatten()[:max_paths]
        rows = run.rows[positions[run.name][present]]
        stored = run.results.images("path", rows)
        changes = attribute_changes(run.results, rows)
        paths[run.name] = [
            (shown, save(path_strip(strip, min_size=min_size // 2), f"paths/{shown:04d}_{number}.png"), change)
            for shown, strip, change in zip(present.tolist(), stored, changes, strict=True)
        ]
    files.append(_histograms(runs, folder / "histograms.png"))
    scale = save(colormap_bar(), "scale.png")
    page = _page(runs, metric_tables(runs), pairs, tiles, captions, paths, scale)
    (folder / "index.html").write_text(page)
    files.append("index.html")
    return files


def attribute_changes(results: Results, rows: Tensor) -> list[str]:
    """Per row, the most-changed attributes with their signed change, e.g. ``"thick +0.62, wide -0.31"``.

    Read from the ``top_attributes`` and ``attribute_change`` extras (``GenerativeIntrospection``); the names come
    from the metadata's ``attribute_names`` (latent dimensions are named ``z<i>``). Empty strings for a store
    without these extras.
    """
    if not {"top_attributes", "attribute_change"} <= set(results.extra_keys) or not len(rows):
        return [""] * len(rows)
    top = results.extra("top_attributes", rows)
    change = results.extra("attribute_change", rows).gather(1, top)
    names = results.metadata.get("attribute_names") or [f"z{i}" for i in range(int(top.max()) + 1)]
    return [
        ", ".join(f"{names[i]} {value:+.2f}" for i, value in zip(indices.tolist(), values.tolist(), strict=True))
        for indices, values in zip(top, change, strict=True)
    ]


def _histograms(runs: Sequence[Run], path: Path) -> str:
    """Plot L0, L1 and iterations of each method's successful pairs (shared bins) to ``path``; return its name."""
    figure = Figure(figsize=(4.2 * len(HISTOGRAMS), 3.2), layout="constrained")
    for axes, (key, title) in zip(figure.subplots(1, len(HISTOGRAMS)), HISTOGRAMS, strict=True):
        values = {run.name: run.record[key][run.record["success"]].double() for run in runs}
        every = torch.cat(list(values.values()))
        if len(every):
            low, high = float(every.min()), float(every.max())
            edges = torch.linspace(low, high if high > low else low + 1, 21).numpy()
            for name, value in values.items():
                if len(value):
                    axes.hist(value.numpy(), bins=edges, histtype="step", linewidth=1.5, label=f"{name} ({len(value)})")
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no successful pairs", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(title)
        axes.set_ylabel("pairs")
    figure.savefig(path, format="png", dpi=96)
    return path.name


STYLE = """
table.metrics, table.runs { display: block; overflow-x: auto; }
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
table.pairs td, table.pairs th { text-align: center; font-size: 0.8em; }
table.pairs img { display: block; margin: 0 auto 0.2em; image-rendering: pixelated; }
.failed { color: #c00; font-weight: bold; }
.absent { color: #888; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _page(
    runs: Sequence[Run],
    tables: dict[str, dict[str, dict[str, float]]],
    pairs: Tensor,
    tiles: dict[int, dict[str, Any]],
    captions: dict[int, dict[str, dict[str, list[str]]]],
    paths: dict[str, list[tuple[int, str, str]]],
    scale: str,
) -> str:
    """The HTML of the report (inline style, no scripts, every picture a file beside it)."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cfx report</title>',
        '<meta name="generator" content="cfx-report">',
        f"<style>{STYLE}</style></head><body>",
        "<h1>cfx report</h1>",
        "<h2>Runs</h2>",
        _runs_table(runs),
        "<h2>Metrics over the pairs every method solved</h2>",
        "<p>The DeDUCE protocol: distances, confidence and iterations over the pairs (query, target) that every "
        "method solved; failure rate and time over each method's own pairs.</p>",
        _metric_table(tables["common"], "common"),
        "<h2>Metrics over each method's own pairs</h2>",
        "<p>Each run's own table (as in its metrics.json): pairs, validity, failure rate and time over all its "
        "pairs, the means over its successful pairs.</p>",
        _metric_table(tables["own"], "own"),
        "<h2>Distributions over the successful pairs</h2>",
        '<img src="histograms.png" alt="histograms of L0, L1 and iterations per method">',
        "<h2>Pairs</h2>",
        f"<p>{len(pairs)} pairs (query, target) in (index, target) order. A counterfactual framed in red is the last "
        "iterate of a failed search. |difference| is |x' &minus; x| (largest over channels) on the fixed scale "
        f'0 <img src="{scale}" alt="colour scale from 0 to 1" style="vertical-align: middle"> 1.</p>',
        '<table class="pairs"><thead><tr><th>query</th>',
        *(f'<th colspan="2">{escape(run.name)}</th>' for run in runs),
        "</tr></thead><tbody>",
    ]
    for shown in range(len(pairs)):
        first = next(iter(captions[shown].values()))
        query = "<br>".join(escape(line) for line in first["query"])
        parts.append(f'<tr><td><img src="{tiles[shown]["query"]}" alt="query {shown}">{query}</td>')
        for run in runs:
            if run.name not in captions[shown]:
                absent = "not in this run<br>(its classifier may<br>predict the target)"
                parts.append(f'<td colspan="2" class="absent">{absent}</td>')
                continue
            lines = captions[shown][run.name]["counterfactual"]
            label = "<br>".join(escape(line) for line in lines)
            failed = ' class="failed"' if lines[-1].endswith("FAILED") else ""
            pictures = tiles[shown][run.name]
            parts.append(
                f'<td><img src="{pictures["counterfactual"]}" alt="{escape(run.name)} counterfactual {shown}">'
                f"<span{failed}>{label}</span></td>"
                f'<td><img src="{pictures["difference"]}" alt="{escape(run.name)} difference {shown}">|difference|</td>'
            )
        parts.append("</tr>")
    parts.append("</tbody></table>")
    if paths:
        parts.append("<h2>Optimisation paths</h2><p>From the query (left) to the last iterate (right).</p>")
        for name, strips in paths.items():
            parts.append(f"<h3>{escape(name)}</h3>")
            for shown, strip, change in strips:
                index, target = pairs[shown].tolist()
                picture = f'<img src="{strip}" alt="{escape(name)} path {shown}">'
                changed = f"<br>most changed: {escape(change)}" if change else ""
                parts.append(f"<p>query #{index} &rarr; target {target}<br>{picture}{changed}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _runs_table(runs: Sequence[Run]) -> str:
    escape = html.escape
    rows = [
        '<table class="runs"><thead><tr><th>method</th><th>store</th><th>pairs</th><th>explainer</th>'
        "<th>classifier</th></tr></thead><tbody>"
    ]
    for run in runs:
        metadata = run.results.metadata
        explainer = json.dumps(metadata.get("explainer", {}), sort_keys=True)
        classifier = metadata.get("classifier") or {}
        state = "" if run.results.finished else " (unfinished)"
        rows.append(
            f"<tr><th>{escape(run.name)}</th><td><code>{escape(str(run.results.path))}</code></td>"
            f"<td>{len(run.results)}{state}</td><td><code>{escape(explainer)}</code></td>"
            f"<td><code>{escape(str(classifier.get('path', '?')))}</code><br>sha256 "
            f"{escape(str(classifier.get('sha256', '?'))[:12])}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _metric_table(table: dict[str, dict[str, float]], kind: str) -> str:
    escape = html.escape
    columns = list(dict.fromkeys(column for row in table.values() for column in row))
    head = "".join(f"<th>{escape(column)}</th>" for column in columns)
    lines = [f'<table class="metrics {kind}"><thead><tr><th>method</th>{head}</tr></thead><tbody>']
    for name, row in table.items():
        cells = "".join(f"<td>{_number(row.get(column, math.nan))}</td>" for column in columns)
        lines.append(f"<tr><th>{escape(name)}</th>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _number(value: float) -> str:
    return "&ndash;" if not math.isfinite(value) else f"{value:.4g}"


def _sorted_order(record: dict[str, Tensor]) -> Tensor:
    """The permutation sorting a record by ``(index, target)`` (an unfinished store is in written order)."""
    order = torch.argsort(record["target"], stable=True)
    return order[torch.argsort(record["index"][order], stable=True)]


def _first_of_each(values: Tensor) -> Tensor:
    """Positions of the first element of each run of equal values in sorted ``values``."""
    starts = torch.ones(len(values), dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    return starts.nonzero().flatten()


def _few(items: Sequence[Any], count: int = 10) -> str:
    shown = ", ".join(str(item) for item in items[:count])
    return f"[{shown}{', ...' if len(items) > count else ''}] ({len(items)})" if items else "none"


def main(arguments: Sequence[str] | None = None) -> None:
    """Console entry point of ``cfx-report`` (``arguments`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        prog="cfx-report",
        description="Write an HTML report (index.html + PNGs) comparing counterfactual runs of the same queries.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (output_dir of `cfx test`) or results.h5 files")
    parser.add_argument("--output", type=Path, required=True, help="report folder (new, empty or a previous report)")
    parser.add_argument("--max-pairs", type=int, default=48, help="most (query, target) pairs shown (default 48)")
    parser.add_argument("--max-paths", type=int, default=8, help="most optimisation paths shown per run (default 8)")
    parser.add_argument("--tile-size", type=int, default=112, help="smallest picture side in pixels (default 112)")
    options = parser.parse_args(arguments)
    try:
        index = write_report(options.runs, options.output, options.max_pairs, options.max_paths, options.tile_size)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"cfx-report: wrote {index}")
