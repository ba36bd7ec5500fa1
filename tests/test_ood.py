from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from cfx.data import SyntheticImages
from cfx.metrics import OODAUROC, evaluate_ood
from cfx.metrics.functional import ood_auroc
from tests.distributed import run_distributed


def _scores(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    in_scores = torch.randint(0, 10, (37,), generator=generator).float()
    out_scores = torch.randint(3, 14, (23,), generator=generator).float()  # overlapping, with ties
    return in_scores, out_scores


def _reference(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    labels = [0] * len(in_scores) + [1] * len(out_scores)
    return roc_auc_score(labels, torch.cat([in_scores, out_scores]).numpy())


def test_auroc_equals_sklearn_and_pair_counting():
    in_scores, out_scores = _scores()
    expected = _reference(in_scores, out_scores)
    assert ood_auroc(in_scores, out_scores).item() == pytest.approx(expected, abs=1e-12)
    difference = out_scores[None, :] - in_scores[:, None]
    pairs = ((difference > 0).double() + 0.5 * (difference == 0).double()).mean()
    assert ood_auroc(in_scores, out_scores).item() == pytest.approx(pairs.item(), abs=1e-12)
    assert ood_auroc(torch.zeros(3), torch.ones(2)).item() == 1.0
    assert ood_auroc(torch.ones(3), torch.zeros(2)).item() == 0.0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="need in-distribution and OOD scores"):
        ood_auroc(torch.zeros(3), torch.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        ood_auroc(torch.tensor([float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="OOD mask"):
        OODAUROC().update(torch.zeros(3), torch.zeros(2, dtype=torch.bool))


def test_metric_class_over_mixed_batches():
    in_scores, out_scores = _scores()
    scores = torch.cat([in_scores, out_scores])
    is_ood = torch.cat([torch.zeros(37, dtype=torch.bool), torch.ones(23, dtype=torch.bool)])
    order = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    metric = OODAUROC()
    for start in range(0, 60, 11):
        batch = order[start : start + 11]
        metric.update(scores[batch], is_ood[batch])
    assert metric.compute().item() == pytest.approx(_reference(in_scores, out_scores), abs=1e-12)


def _auroc_on_rank(rank: int, world_size: int) -> float:
    in_scores, out_scores = _scores()
    metric = OODAUROC()
    for scores, ood in ((in_scores, False), (out_scores, True)):
        share = scores[rank * len(scores) // world_size : (rank + 1) * len(scores) // world_size]
        metric.update(share, torch.full_like(share, ood, dtype=torch.bool))
    return metric.compute().item()


@pytest.mark.ddp
def test_two_process_auroc_equals_one_process():
    single = _auroc_on_rank(0, 1)
    assert single == pytest.approx(_reference(*_scores()), abs=1e-12)
    assert run_distributed(_auroc_on_rank, world_size=2) == pytest.approx([single, single], abs=1e-12)


def test_evaluate_ood_scores_both_datamodules():
    inside = SyntheticImages(num_samples=60, num_classes=3, image_size=8, eval_batch_size=7, seed=0)
    outside = SyntheticImages(num_samples=45, num_classes=3, image_size=8, eval_batch_size=7, seed=1, noise=0.9)

    def scorer(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).std(1)

    in_scores = torch.cat([scorer(b["image"]) for b in inside.eval_dataloader("test")])
    out_scores = torch.cat([scorer(b["image"]) for b in outside.eval_dataloader("test")])
    expected = _reference(in_scores, out_scores)
    assert evaluate_ood(scorer, inside, outside) == pytest.approx(expected, abs=1e-12)
    other_size = SyntheticImages(num_samples=45, num_classes=3, image_size=12)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_ood(scorer, inside, other_size)
