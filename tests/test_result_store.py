"""The resumable HDF5 result store: kill and resume, DDP shards, clear errors, the reader API, progress."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from cfx.metrics import intersection_table
from cfx.metrics.functional.counterfactual import PairInputs, empty_record, measure_pairs, record_keys
from cfx.results import StoreWriter, merge_stores, open_results
from cfx.tasks import CounterfactualTask
from cfx.tasks.counterfactual import progress_line
from tests import test_counterfactual_task
from tests.processes import kill_when
from tests.test_counterfactual_task import NUM_CLASSES, PatchExplainer, _config, _synthetic
from tests.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
classifier_checkpoint = test_counterfactual_task.classifier_checkpoint  # the tiny classifier fixture


class SlowPatchExplainer(PatchExplainer):
    """PatchExplainer taking a while per batch, so that a kill lands in the middle of a run."""

    def explain(self, images, targets, indices=None):
        time.sleep(0.4)
        return super().explain(images, targets, indices)


def _committed_rows(path: Path) -> int:
    """The store's committed rows; 0 while it does not exist or is being written."""
    try:
        with h5py.File(path, "r", locking=False) as file:
            return int(file.attrs.get("rows", 0))
    except (OSError, KeyError):
        return 0


def _run_cli(config: Path, cwd: Path, kill_after_first_batch: bool = False, devices: int = 1) -> None:
    command = [sys.executable, "-m", "cfx", "test", "-c", str(config)]
    if devices > 1:
        command += ["-c", str(REPO / "configs" / "trainer" / "ddp_cpu.yaml"), f"--trainer.devices={devices}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if not kill_after_first_batch:
        result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
        return
    out = config.parent / "out"
    shards = [out / "results.h5", *(out / f"results.rank{rank}.h5" for rank in range(1, devices))]
    kill_when(command, cwd, environment, lambda: any(_committed_rows(shard) > 0 for shard in shards))


def _assert_same_store(expected_folder: Path, actual_folder: Path) -> None:
    expected, actual = open_results(expected_folder), open_results(actual_folder)
    assert expected.finished and actual.finished and len(expected) == len(actual) > 0
    assert expected.columns == actual.columns and expected.image_keys == actual.image_keys
    for key in expected.columns:
        if key != "seconds":  # wall time
            assert torch.equal(expected[key], actual[key]), key
    for key in expected.image_keys:
        assert torch.equal(expected.images(key), actual.images(key)), key
    assert expected.encodings == actual.encodings
    summaries = expected.summary(), actual.summary()
    for key, value in summaries[0].items():
        if key != "seconds_per_counterfactual":
            assert summaries[1][key] == value or math.isnan(value) and math.isnan(summaries[1][key]), key
    written = [
        json.loads((folder / "metrics.json").read_text())["metrics"] for folder in (expected_folder, actual_folder)
    ]
    assert written[1]["pairs"] == written[0]["pairs"] == len(expected)
    assert written[1]["l1"] == written[0]["l1"] and written[1]["validity"] == written[0]["validity"]


def test_a_killed_cli_run_resumes_to_the_uninterrupted_result(classifier_checkpoint, tmp_path):
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        explainer = {"class_path": "tests.test_result_store.SlowPatchExplainer"}
        runs[name] = _config(runs[name], classifier_checkpoint, max_queries=24, explainer=explainer)
    _run_cli(runs["straight"], tmp_path)
    _run_cli(runs["killed"], tmp_path, kill_after_first_batch=True)
    killed = open_results(runs["killed"].parent / "out")
    assert not killed.finished and 0 < len(killed) < len(open_results(runs["straight"].parent / "out"))
    first_stored = killed.record()
    _run_cli(runs["killed"], tmp_path)  # the same command again: resumes
    resumed = open_results(runs["killed"].parent / "out")
    stored_again = {
        (i, t): s for i, t, s in zip(*(resumed[k].tolist() for k in ("index", "target", "seconds")), strict=True)
    }
    for index, target, seconds in zip(*(first_stored[k].tolist() for k in ("index", "target", "seconds")), strict=True):
        assert stored_again[(index, target)] == seconds  # kept, not recomputed
    _assert_same_store(runs["straight"].parent / "out", runs["killed"].parent / "out")


@pytest.mark.ddp
def test_a_killed_two_process_cli_run_resumes_to_the_one_process_result(classifier_checkpoint, tmp_path):
    """Both ranks SIGKILLed after the first committed batch of either; the same command again finishes the run."""
    runs = {}
    for name in ("one", "killed"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        explainer = {"class_path": "tests.test_result_store.SlowPatchExplainer"}
        runs[name] = _config(runs[name], classifier_checkpoint, max_queries=24, explainer=explainer)
    _run_cli(runs["one"], tmp_path)
    _run_cli(runs["killed"], tmp_path, kill_after_first_batch=True, devices=2)
    out = runs["killed"].parent / "out"
    left = sorted(path.name for path in out.iterdir() if path.suffix == ".h5")
    assert left and set(left) <= {"results.h5", "results.rank1.h5"}  # the ranks' shards, none of them finished
    assert 0 < sum(_committed_rows(out / name) for name in left) < 24 * (NUM_CLASSES - 1)
    _run_cli(runs["killed"], tmp_path, devices=2)
    assert sorted(path.name for path in out.iterdir()) == ["grid.png", "metrics.json", "results.h5"]
    _assert_same_store(runs["one"].parent / "out", out)


def _ddp_task(checkpoint: Path, folder: Path, **kwargs) -> CounterfactualTask:
    return CounterfactualTask(str(checkpoint), PatchExplainer, output_dir=str(folder), max_queries=13, **kwargs)


def _test(task: CounterfactualTask, devices: int) -> dict[str, float]:
    return quiet_trainer(devices, inference_mode=False).test(task, _synthetic(eval_batch_size=3), verbose=False)[0]


@pytest.mark.ddp
def test_two_processes_resume_killed_shards_to_the_one_process_store(classifier_checkpoint, tmp_path):
    reference, resumed = tmp_path / "one", tmp_path / "two"
    metrics = {1: _test(_ddp_task(classifier_checkpoint, reference, targets="random"), 1)}
    # a killed 2-process run, simulated: some committed pairs in each process's file, plus a batch in flight
    # (written but not committed) at the kill
    stored = open_results(reference)
    record = stored.record()
    columns = [key for key in record]
    for path, rows in ((resumed / "results.h5", [1, 4, 5]), (resumed / "results.rank1.h5", [0, 7])):
        writer = StoreWriter.create(path, stored.metadata, columns)
        pick = torch.tensor(rows)
        images = {key: stored.images(key, pick) for key in stored.image_keys}
        writer.append({key: record[key][pick] for key in columns}, images)
        writer.append({key: record[key][pick[:1] + 2] for key in columns}, {k: v[:1] for k, v in images.items()})
        with h5py.File(path, "a") as file:
            file.attrs["rows"] = len(rows)  # the in-flight batch: its data is there, its rows not committed
    metrics[2] = _test(_ddp_task(classifier_checkpoint, resumed, targets="random"), 2)
    assert sorted(path.name for path in resumed.iterdir()) == ["grid.png", "metrics.json", "results.h5"]
    _assert_same_store(reference, resumed)
    for key, value in metrics[1].items():
        if key != "test/seconds_per_counterfactual":
            assert metrics[2][key] == value or math.isnan(value) and math.isnan(metrics[2][key]), key


def _run(task: CounterfactualTask) -> dict[str, float]:
    return _test(task, 1)


def test_a_finished_store_is_reused_not_overwritten_unless_asked(classifier_checkpoint, tmp_path):
    folder = tmp_path / "out"
    first = _run(_ddp_task(classifier_checkpoint, folder))
    before = (folder / "results.h5").read_bytes()
    again = _run(_ddp_task(classifier_checkpoint, folder))  # nothing recomputed: the same table, seconds too
    assert again == first and (folder / "results.h5").read_bytes() == before
    assert _run(_ddp_task(classifier_checkpoint, folder, grid_size=2))["test/pairs"] == first["test/pairs"]
    overwritten = _run(_ddp_task(classifier_checkpoint, folder, overwrite=True))
    assert overwritten["test/pairs"] == first["test/pairs"] and (folder / "results.h5").read_bytes() != before


def _other_classifier(tmp_path: Path) -> Path:
    from cfx.nn import SmallCNN
    from cfx.tasks import ClassificationTask

    torch.manual_seed(1)
    path = tmp_path / "other.ckpt"
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(ClassificationTask(SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16)), _synthetic())
    trainer.save_checkpoint(path)
    return path


def test_bad_stores_are_one_clear_error_each_and_left_untouched(classifier_checkpoint, tmp_path):
    good = tmp_path / "good"
    _run(_ddp_task(classifier_checkpoint, good))
    store = (good / "results.h5").read_bytes()
    cases = {
        "truncated": (store[: len(store) // 2], "truncated or corrupt HDF5 file"),
        "corrupt": (store[:8] + bytes(len(store) - 8), "truncated or corrupt HDF5 file"),
        "not hdf5": (b"results, but not HDF5\n" * 10, "is not an HDF5 file"),
    }
    with h5py.File(tmp_path / "foreign.h5", "w") as file:
        file["images"] = [1, 2, 3]
    cases["foreign"] = ((tmp_path / "foreign.h5").read_bytes(), "HDF5 file but not a cfx result store")
    for name, (content, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "results.h5").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            _run(_ddp_task(classifier_checkpoint, folder))
        with pytest.raises(ValueError, match=message):
            open_results(folder)
        assert (folder / "results.h5").read_bytes() == content, name
    with pytest.raises(FileNotFoundError, match="no counterfactual results at"):
        open_results(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"another run \(task.l0_tolerance: stored 0.0, now 0.5\): set --model.over"):
        _run(_ddp_task(classifier_checkpoint, good, l0_tolerance=0.5))
    with pytest.raises(ValueError, match=r"another run \(classifier.sha256: stored '[0-9a-f]{64}', now '[0-9a-f]"):
        _run(_ddp_task(_other_classifier(tmp_path), good))
    assert (good / "results.h5").read_bytes() == store


def _batch(indices: list[int], exact: bool, generator: torch.Generator) -> tuple[dict, dict]:
    size = len(indices)
    originals = torch.randint(0, 256, (size, 1, 3, 4), generator=generator) / 255.0
    counterfactuals = originals if exact else (originals + 0.1 * torch.rand(originals.shape, generator=generator))
    given = {
        "index": torch.tensor(indices),
        "target": torch.ones(size, dtype=torch.long),
        "label": torch.zeros(size, dtype=torch.long),
        "original_prediction": torch.zeros(size, dtype=torch.long),
        "success": torch.tensor([i % 2 == 0 for i in indices]),
        "target_probability": torch.rand(size, generator=generator, dtype=torch.float64),
        "counterfactual_prediction": torch.ones(size, dtype=torch.long),
        "iterations": torch.tensor(indices) % 3,
    }
    return measure_pairs(PairInputs(originals, counterfactuals, 1.0), given), {
        "originals": originals,
        "counterfactuals": counterfactuals,
    }


def test_the_reader_slices_decodes_and_summarises_what_was_written(tmp_path):
    generator = torch.Generator().manual_seed(0)
    writer = StoreWriter.create(
        tmp_path / "a.h5", {"explainer": {"class_path": "cfx.counterfactual.JSMA"}}, record_keys()
    )
    batches = [_batch([5, 3], True, generator), _batch([8], False, generator), _batch([2, 9, 6], True, generator)]
    extras = [torch.randn(len(b[0]["index"]), 2, generator=generator) for b in batches]
    for (record, images), extra in zip(batches, extras, strict=True):
        writer.append(record, images, {"latent": extra})
    results = open_results(tmp_path / "a.h5")
    assert len(results) == 6 and not results.finished and results.method == "JSMA"
    originals = torch.cat([images["originals"] for _, images in batches])
    counterfactuals = torch.cat([images["counterfactuals"] for _, images in batches])
    assert results.encodings == {"originals": "uint8", "counterfactuals": "float16"}  # the 2nd batch is not k/255
    assert torch.equal(results.images("originals"), originals)  # uint8: exact
    assert torch.equal(results.images("counterfactuals"), counterfactuals.half().float())
    assert torch.equal(results.images("originals", [4, 0, 0]), originals[[4, 0, 0]])
    assert torch.equal(results.images("originals", 2), originals[2])
    assert torch.equal(results.images("originals", slice(None, None, -2)), originals.flip(0)[::2])
    assert results.images("originals", []).shape == (0, 1, 3, 4)
    assert torch.equal(results.extra("latent"), torch.cat(extras))
    record = {key: torch.cat([b[0][key] for b in batches]) for key in record_keys()}
    assert all(torch.equal(results[key], record[key]) for key in record_keys())
    successes = record["success"]
    summary = results.summary()
    assert summary["pairs"] == 6 and summary["validity"] == successes.double().mean()
    assert summary["l1"] == pytest.approx(record["l1"][successes].mean().item())
    assert intersection_table({"a": results.record()})["a"]["pairs"] == successes.sum()
    with pytest.raises(KeyError, match="not a per-pair column"):
        results["originals"]
    merged = merge_stores([results], tmp_path / "merged.h5", results.metadata)
    assert merged.finished and merged["index"].tolist() == [2, 3, 5, 6, 8, 9]
    order = torch.argsort(record["index"])
    assert torch.equal(merged.images("originals"), originals[order]) and merged.encodings == results.encodings
    assert torch.equal(merged.extra("latent"), torch.cat(extras)[order])
    with pytest.raises(ValueError, match=r"share the pair \(index, target\) = \(2, 1\)"):
        merge_stores([results, merged], tmp_path / "twice.h5", results.metadata)
    assert not (tmp_path / "twice.h5").exists()
    with pytest.raises(ValueError, match="every batch must give the same"):
        writer.append(*batches[0])  # without the extra
    empty = open_results(StoreWriter.create(tmp_path / "e.h5", {}, record_keys(("nll",))).path)
    assert len(empty) == 0 and all(torch.equal(empty[k], v) for k, v in empty_record(("nll",)).items())


def test_a_writer_resumed_after_a_kill_drops_the_uncommitted_batch(tmp_path):
    generator = torch.Generator().manual_seed(1)
    path = tmp_path / "a.h5"
    writer = StoreWriter.create(path, {}, record_keys())
    first, second = _batch([1, 2], True, generator), _batch([3], True, generator)
    writer.append(*first)
    writer.append(*second)
    with h5py.File(path, "a") as file:
        file.attrs["rows"] = 2  # killed after writing the second batch's data, before committing it
    assert open_results(path)["index"].tolist() == [1, 2]
    StoreWriter.resume(path).append(*_batch([7], True, generator))
    assert open_results(path)["index"].tolist() == [1, 2, 7]


def test_progress_line_hand_values():
    progress = {"stored": 10, "explained": 30, "successes": 24, "started": 100.0}
    line = progress_line(progress, batches_done=4, total_batches=10, now=160.0)
    # 40 pairs in 4 of 10 batches -> 100 pairs; 30 explained in 60 s; 6 more batches at 15 s each
    assert line == {"pairs": "40/100", "validity": "0.800", "pairs/s": "0.50", "eta": "00:01:30"}
    unknown = progress_line({**progress, "explained": 0}, batches_done=1, total_batches=float("inf"), now=101.0)
    assert unknown["pairs"] == "10/?" and unknown["eta"] == "?" and unknown["validity"] == "nan"


def test_the_progress_callback_is_quiet_without_a_progress_bar(classifier_checkpoint, tmp_path, caplog):
    task = _ddp_task(classifier_checkpoint, tmp_path / "out")
    assert [type(callback).__name__ for callback in task.configure_callbacks()] == ["CounterfactualProgress"]
    with caplog.at_level("INFO"):
        _run(task)
    assert not [record for record in caplog.records if "counterfactuals:" in record.getMessage()]
    shutil.rmtree(tmp_path / "out")


def test_declared_extras_are_checked_merged_and_read_and_older_stores_still_open(tmp_path):
    generator = torch.Generator().manual_seed(3)
    fields = {"top": (torch.int64, (2,)), "weight": (torch.float32, ())}
    writer = StoreWriter.create(tmp_path / "a.h5", {}, record_keys(), fields)
    empty = open_results(tmp_path / "a.h5")
    assert empty.extra_fields == fields and empty.extra_keys == ("top", "weight")
    assert empty["top"].shape == (0, 2) and empty["top"].dtype == torch.int64 and empty["weight"].shape == (0,)
    batches = [_batch([4, 1], True, generator), _batch([6], True, generator)]
    extras = [{"top": torch.arange(2 * n).view(n, 2), "weight": torch.rand(n)} for n in (2, 1)]
    for (record, images), extra in zip(batches, extras, strict=True):
        writer.append(record, images, extra)
    for wrong, message in (
        ({"top": extras[0]["top"]}, r"stores the extras \['top', 'weight'\], got \['top'\]"),
        ({**extras[0], "top": extras[0]["top"].int()}, r"stores the extra 'top' as torch.int64 \(P, \(2,\)\), got"),
        ({**extras[0], "weight": torch.rand(2, 3)}, r"extra 'weight' as torch.float32 \(P, \(\)\), got .* \(2, 3\)"),
    ):
        with pytest.raises(ValueError, match=message):
            writer.append(*batches[0], wrong)
    results = open_results(tmp_path / "a.h5")
    assert len(results) == 3 and torch.equal(results["top"], torch.cat([e["top"] for e in extras]))
    merged = merge_stores([results], tmp_path / "merged.h5", results.metadata)
    assert merged.extra_fields == fields and merged["index"].tolist() == [1, 4, 6]
    assert torch.equal(merged["weight"], torch.cat([e["weight"] for e in extras])[torch.tensor([1, 0, 2])])
    with pytest.raises(ValueError, match="dtype must be one of"):
        StoreWriter.create(tmp_path / "b.h5", {}, record_keys(), {"x": (torch.bfloat16, ())})
    older = tmp_path / "older.h5"  # a store written before extras were declared: no attribute, no extras
    StoreWriter.create(older, {}, record_keys()).append(*batches[1])
    with h5py.File(older, "a") as file:
        assert "extras" not in file.attrs
    old = open_results(older)
    assert old.extra_fields is None and old.extra_keys == () and len(old) == 1
