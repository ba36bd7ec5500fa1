from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

from cfx.metrics import intersection_table
from cfx.metrics.functional.counterfactual import PairInputs, measure_pairs, record_keys
from cfx.results.pictures import (
    COUNTERFACTUAL_PREDICTION,
    difference_heatmap,
    frame,
    labelled_grid,
    pair_captions,
    path_strip,
    store_grid,
    upscale,
)
from cfx.results.report import MANIFEST, main, write_report
from cfx.results.store import StoreWriter, finish_store, open_results

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
QUERIES = (3, 8, 11)
NUM_CLASSES = 3


def _query(index: int) -> torch.Tensor:
    """A query image that depends on its dataset index only, exactly k / 255 (stored as uint8)."""
    generator = torch.Generator().manual_seed(index)
    return torch.randint(0, 256, (1, 12, 12), generator=generator).float() / 255


def _write_store(folder: Path, method: str, shift: float, path_frames: int = 0, skip: tuple = (), queries=QUERIES):
    """A finished store of every (query, other class) pair but ``skip``, as a cfx run writes it (S1's writer)."""
    pairs = [(i, t) for i in queries for t in range(NUM_CLASSES) if t != i % NUM_CLASSES and (i, t) not in skip]
    index = torch.tensor([i for i, _ in pairs])
    target = torch.tensor([t for _, t in pairs])
    originals = torch.stack([_query(i) for i in index.tolist()])
    counterfactuals = originals.clone()
    counterfactuals[:, :, 2:8, 3:6] += shift  # a patch: L1 differs between methods
    counterfactuals = counterfactuals.clamp(0, 1)
    given = {
        "index": index,
        "target": target,
        "label": index % NUM_CLASSES,
        "original_prediction": index % NUM_CLASSES,
        "success": (index + target) % 4 != 0,
        "target_probability": torch.linspace(0.2, 0.9, len(pairs), dtype=torch.float64),
        "counterfactual_prediction": torch.where((index + target) % 4 != 0, target, index % NUM_CLASSES),
        "iterations": index + target,
    }
    record = measure_pairs(PairInputs(originals, counterfactuals), given)
    images = {"originals": originals, "counterfactuals": counterfactuals}
    if path_frames:
        steps = torch.linspace(0, 1, path_frames).view(1, -1, 1, 1, 1)
        images["path"] = originals[:, None] + steps * (counterfactuals - originals)[:, None]
    metadata = {
        "explainer": {"class_path": f"cfx.counterfactual.{method}", "init_args": {"max_iterations": 20}},
        "classifier": {"path": "checkpoints/tiny/last.ckpt", "sha256": "0" * 64},
    }
    folder.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter.create(folder / "results.h5", metadata, record_keys())
    writer.append(record, images)
    finish_store(folder / "results.h5")
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    """JSMA (with a path) and Wachter stores of the same queries; Wachter lacks one pair."""
    return [
        _write_store(tmp_path / "jsma", "JSMA", 0.6, path_frames=5),
        _write_store(tmp_path / "wachter", "Wachter", 0.3, skip=((8, 0),)),
    ]


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.references: list[str] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"
        self.references += [value for name, value in attrs if name in ("src", "href") and value is not None]


def _references(page: str) -> _References:
    parser = _References()
    parser.feed(page)
    return parser


def test_report_references_only_files_beside_it_and_nothing_online(two_runs, tmp_path):
    index = write_report(two_runs, tmp_path / "report")
    page = index.read_text()
    parsed = _references(page)
    assert parsed.images == len(parsed.references) > 10  # every reference is a picture, and there are pictures
    for reference in parsed.references:
        assert not re.match(r"^[a-z]+:|^//", reference), reference  # no http(s)://, data:, file: ... URLs
        assert (index.parent / reference).is_file(), reference
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    manifest = json.loads((index.parent / MANIFEST).read_text())
    written = {str(path.relative_to(index.parent)) for path in index.parent.rglob("*") if path.is_file()}
    assert written == {*manifest["files"], MANIFEST}


def test_report_tables_are_the_intersection_tables_and_pictures_show_every_pair(two_runs, tmp_path):
    index = write_report(two_runs, tmp_path / "report")
    page = index.read_text()
    records = {name: open_results(folder).record() for name, folder in zip(("JSMA", "Wachter"), two_runs, strict=True)}
    # the common successful pairs by hand: success = (index + target) % 4 != 0, and Wachter lacks (8, 0)
    pairs = [
        (i, t) for i in QUERIES for t in range(NUM_CLASSES) if t != i % NUM_CLASSES and (i + t) % 4 and (i, t) != (8, 0)
    ]
    jsma_keys = list(zip(records["JSMA"]["index"].tolist(), records["JSMA"]["target"].tolist(), strict=True))
    common_l1 = records["JSMA"]["l1"][[jsma_keys.index(pair) for pair in pairs]].mean().item()
    table = intersection_table(records)
    assert table["JSMA"]["pairs"] == len(pairs) and table["JSMA"]["l1"] == pytest.approx(common_l1, rel=1e-12)
    common = page.split('class="metrics common"')[1].split("</table>")[0]
    own = page.split('class="metrics own"')[1].split("</table>")[0]
    assert f"<td>{common_l1:.4g}</td>" in common and f"<td>{len(pairs)}</td>" in common
    assert f"<td>{len(jsma_keys)}</td>" in own and "<th>JSMA</th>" in own and "<th>Wachter</th>" in own
    shown = page.split('class="pairs"')[1].split("</table>")[0]
    assert shown.count("<tr>") == 1 + len(jsma_keys)  # header + every pair of the union (JSMA has them all)
    assert shown.count("not in this run") == 1  # Wachter's missing (8, 0)
    jsma_failures = sum((i + t) % 4 == 0 for i, t in jsma_keys)
    assert (8 + 0) % 4 == 0  # the pair Wachter lacks is one of JSMA's failures
    assert shown.count('class="failed"') == jsma_failures + (jsma_failures - 1)
    assert page.count("<h3>JSMA</h3>") == 1 and "<h3>Wachter</h3>" not in page  # only JSMA recorded a path
    tile = Image.open(index.parent / "pairs" / "0000_query.png")
    assert tile.size == (120, 120)  # 12 px upscaled by 10 (nearest) to reach 112


def test_report_opens_in_headless_chromium_with_every_picture_loaded(two_runs, tmp_path, chromium):
    index = write_report(two_runs, tmp_path / "report")
    # a copy of the page beside it (same relative pictures) that records, once loaded, what the browser shows
    check = index.with_name("check.html")
    script = (
        "<script>window.addEventListener('load', () => { const images = [...document.images];"
        "document.body.setAttribute('data-check', JSON.stringify({images: images.length,"
        "broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),"
        "methods: [...document.querySelectorAll('table.metrics.common tbody th')].map(t => t.textContent)})); });"
        "</script></body>"
    )
    check.write_text(index.read_text().replace("</body>", script))
    profile = tmp_path / "profile"
    run = subprocess.run(
        [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", check.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'data-check="([^"]*)"', run.stdout)
    assert found, run.stdout[:2000]
    result = json.loads(html.unescape(found.group(1)))
    assert result["images"] == _references(index.read_text()).images
    assert result["broken"] == []
    assert result["methods"] == ["JSMA", "Wachter"]
    screenshot = REPO / "runs" / "report_screenshot.png"
    screenshot.parent.mkdir(exist_ok=True)
    screenshot.unlink(missing_ok=True)
    shot = subprocess.run(
        [
            str(chromium),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot}",
            "--window-size=1280,1600",
            index.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert Image.open(screenshot).size == (1280, 1600)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Headless Chromium: Debian's package, installed here when missing (as root, from Debian's registry)."""
    if not CHROMIUM.is_file() and os.geteuid() == 0 and shutil.which("apt-get"):
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=environment, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
            capture_output=True,
            env=environment,
            timeout=1200,
        )
    if not CHROMIUM.is_file():
        pytest.skip(
            f"no {CHROMIUM}, and it cannot be installed here (needs root and apt-get: apt-get install chromium)"
        )
    return CHROMIUM


def test_cfx_report_command_writes_the_report_and_replaces_only_a_previous_report(two_runs, tmp_path, capsys):
    output = tmp_path / "report"
    main([*map(str, two_runs), "--output", str(output), "--max-pairs", "3"])
    assert f"wrote {output / 'index.html'}" in capsys.readouterr().out
    assert len(list((output / "pairs").glob("*_query.png"))) == 3
    main([*map(str, two_runs), "--output", str(output), "--max-pairs", "2"])  # a previous report: replaced
    assert len(list((output / "pairs").glob("*_query.png"))) == 2
    (output / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([*map(str, two_runs), "--output", str(output)])
    assert "not a previous cfx report" in capsys.readouterr().err
    assert (output / "notes.txt").read_text() == "mine" and len(list((output / "pairs").glob("*_query.png"))) == 2
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"not a previous cfx report .*data\.csv"):
        write_report(two_runs, unrelated)
    assert sorted(path.name for path in unrelated.iterdir()) == ["data.csv"]
    assert not list(tmp_path.glob(".report.*")) and not list(tmp_path.glob(".unrelated.*"))  # no leftovers


def test_python_m_cfx_report_runs_the_report(two_runs, tmp_path):
    output = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "cfx", "report", *map(str, two_runs), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (output / "index.html").is_file()


def test_report_refuses_a_folder_without_store_and_runs_of_different_queries(two_runs, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_run holds no counterfactual result store"):
        write_report([two_runs[0], empty], tmp_path / "report")
    other = _write_store(tmp_path / "other", "Wachter", 0.3, queries=(3, 9, 11))
    with pytest.raises(ValueError, match=r"different queries.*only in JSMA: \[8\] \(1\), only in Wachter: \[9\] \(1\)"):
        write_report([two_runs[0], other], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_report_refuses_the_same_query_indices_with_other_images(two_runs, tmp_path, monkeypatch):
    import tests.test_report as this

    monkeypatch.setattr(this, "_query", lambda index: torch.full((1, 12, 12), (index % 7) / 255))
    other = _write_store(tmp_path / "other_data", "Wachter", 0.3)
    with pytest.raises(ValueError, match=r"query images of JSMA and Wachter differ at dataset indices \[3, 8, 11\]"):
        write_report([two_runs[0], other], tmp_path / "report")


def test_upscale_is_nearest_by_an_integer_factor():
    image = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    big = upscale(image, min_size=5)  # factor 3
    assert big.shape == (1, 3, 6, 6)
    expected = torch.tensor([[0.0, 0.5], [1.0, 0.25]]).repeat_interleave(3, 0).repeat_interleave(3, 1)
    assert torch.equal(big[0, 0], expected) and torch.equal(big[0, 1], expected) and torch.equal(big[0, 2], expected)
    assert torch.equal(upscale(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), 1)[0, 0], torch.tensor([[0.0, 1.0]]))


def test_difference_heatmap_colours_the_largest_channel_change_on_a_fixed_scale():
    originals = torch.zeros(1, 3, 1, 3)
    counterfactuals = torch.zeros(1, 3, 1, 3)
    counterfactuals[0, 1, 0, 1] = 1.0  # full change in one channel
    counterfactuals[0, 2, 0, 2] = -128 / 255  # a removal counts by its size
    colours = matplotlib.colormaps["inferno"]([0.0, 1.0, 128 / 255])[:, :3]
    heat = difference_heatmap(originals, counterfactuals)[0].permute(1, 2, 0)[0]
    assert torch.allclose(heat.double(), torch.tensor(colours), atol=1e-6)


def test_frame_paints_only_the_border_of_marked_tiles():
    tiles = torch.full((2, 3, 5, 5), 0.5)
    framed = frame(tiles, torch.tensor([True, False]), width=2)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[2, 2] = False  # a 5x5 tile with a 2-pixel frame keeps only its centre
    assert torch.equal(framed[0][:, border], red.expand(3, 24)) and torch.equal(
        framed[0][:, 2, 2], torch.full((3,), 0.5)
    )
    assert torch.equal(framed[1], tiles[1])


def test_path_strip_drops_the_repeated_last_iterates():
    frames = torch.stack([torch.full((1, 4, 4), value) for value in (0.0, 0.2, 0.6, 0.6, 0.6)])
    strip = path_strip(frames, min_size=8, gap=3)  # 3 distinct frames of 8 px, 2 gaps
    assert strip.shape == (3, 8, 3 * 8 + 2 * 3)
    assert [strip[0, 0, 11 * k].item() for k in range(3)] == pytest.approx([0.0, 0.2, 0.6])
    assert torch.equal(strip[:, :, 8:11], torch.ones(3, 8, 3))
    many = path_strip(torch.linspace(0, 1, 30).view(30, 1, 1, 1).expand(30, 1, 4, 4), max_frames=4, min_size=4, gap=1)
    assert many.shape[-1] == 4 * 4 + 3 and many[0, 0, 0] == 0 and many[0, 0, -1] == 1  # first and last kept


def test_labelled_grid_writes_captioned_upscaled_rows_with_failures_framed(tmp_path):
    pairs = {
        "index": torch.tensor([5, 9]),
        "target": torch.tensor([1, 2]),
        "label": torch.tensor([0, 0]),
        "original_prediction": torch.tensor([0, 1]),
        "success": torch.tensor([True, False]),
        "target_probability": torch.tensor([0.91, 0.12], dtype=torch.float64),
        "originals": torch.zeros(2, 1, 28, 28),
        "counterfactuals": torch.full((2, 1, 28, 28), 0.5),
    }
    assert pair_captions(pairs, 1) == {
        "query": ["#9: class 1", "label 0"],
        "counterfactual": ["target 2", "p(target) = 0.12, FAILED"],
    }
    assert pair_captions({**pairs, COUNTERFACTUAL_PREDICTION: torch.tensor([1, 0])}, 0)["counterfactual"][0] == (
        "target 1, predicted 1"
    )
    path = tmp_path / "grid.png"
    labelled_grid(pairs, path)
    grid = torch.tensor(list(Image.open(path).convert("RGB").getdata())).view(Image.open(path).height, -1, 3)
    red = (grid[..., 0] == 255) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
    assert red.sum() == 112 * 112 - 104 * 104  # one 4-pixel frame (28 px x 4 = 112) around the failed pair only
    with pytest.raises(ValueError, match=r"needs the pair entries \['success'\]"):
        labelled_grid({key: value for key, value in pairs.items() if key != "success"}, path)


def test_store_grid_draws_the_first_pairs_of_a_store(two_runs, tmp_path):
    store_grid(open_results(two_runs[0]), tmp_path / "grid.png", count=4)
    grid = Image.open(tmp_path / "grid.png")
    pairs = {key: value[:4] for key, value in open_results(two_runs[0]).record().items()}
    results = open_results(two_runs[0])
    pairs.update({key: results.images(key, slice(0, 4)) for key in ("originals", "counterfactuals")})
    labelled_grid(pairs, tmp_path / "direct.png")
    assert grid.height > 4 * 120 and list(grid.getdata()) == list(Image.open(tmp_path / "direct.png").getdata())


def test_paths_of_an_attribute_editing_run_name_the_most_changed_attributes(tmp_path):
    """GenerativeIntrospection's top_attributes / attribute_change extras appear, named, under each path strip."""
    folder = tmp_path / "gci"
    _write_store(folder, "GenerativeIntrospection", 0.4, path_frames=3)
    plain = open_results(folder)
    change = torch.tensor([[0.5, -0.25, 0.0]]).repeat(len(plain), 1)
    change[0] = torch.tensor([0.0, 0.125, -0.75])
    top = change.abs().argsort(dim=1, descending=True)[:, :2]
    names = ["thick", "slanted", "wide"]
    metadata = {**plain.metadata, "attribute_names": names}
    fields = {"attribute_change": (torch.float32, (3,)), "top_attributes": (torch.int64, (2,))}
    rebuilt = tmp_path / "gci_attributes"
    rebuilt.mkdir()
    writer = StoreWriter.create(rebuilt / "results.h5", metadata, record_keys(), fields)
    images = {key: plain.images(key) for key in plain.image_keys}
    writer.append(plain.record(), images, {"attribute_change": change, "top_attributes": top})
    finish_store(rebuilt / "results.h5")
    page = (write_report([rebuilt], tmp_path / "report").parent / "index.html").read_text()
    shown = re.findall(r"most changed: ([^<]*)</p>", page)
    assert len(shown) == min(8, len(plain))  # the store's pairs are in (index, target) order: row 0 is shown first
    assert html.unescape(shown[0]) == "wide -0.75, slanted +0.12"
    assert all(html.unescape(text) == "thick +0.50, slanted -0.25" for text in shown[1:])
