from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from cfx.metrics import PairwiseRankingAccuracy, SpearmanCorrelation
from cfx.metrics.functional import average_ranks, pairwise_ranking_accuracy, spearman_correlation
from tests.distributed import run_distributed


def _with_ties(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 8, (n,), generator=generator).float()  # many ties
    predicted = (target + 3 * torch.randn(n, generator=generator)).round()  # ties in the prediction too
    return predicted, target


def _brute_force_ranking_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    score = pairs = 0.0
    for i, j in itertools.combinations(range(len(target)), 2):
        if target[i] == target[j]:
            continue
        pairs += 1
        if predicted[i] == predicted[j]:
            score += 0.5
        elif (predicted[i] > predicted[j]) == (target[i] > target[j]):
            score += 1
    return score / pairs


def test_functional_metrics_equal_references():
    predicted, target = _with_ties()
    assert torch.allclose(average_ranks(predicted), torch.from_numpy(stats.rankdata(predicted.numpy())))
    expected = stats.spearmanr(predicted.numpy(), target.numpy()).statistic
    assert spearman_correlation(predicted, target).item() == pytest.approx(expected, abs=1e-12)
    expected = _brute_force_ranking_accuracy(predicted, target)
    assert pairwise_ranking_accuracy(predicted, target).item() == pytest.approx(expected, abs=1e-12)
    # blocks smaller than the data give the same value
    assert pairwise_ranking_accuracy(predicted, target, block_size=7).item() == pytest.approx(expected, abs=1e-12)


def test_extremes_and_bad_inputs():
    values = torch.arange(10.0)
    assert pairwise_ranking_accuracy(values, values).item() == 1.0
    assert pairwise_ranking_accuracy(-values, values).item() == 0.0
    assert spearman_correlation(values.exp(), values).item() == pytest.approx(1.0)
    assert torch.isnan(spearman_correlation(torch.ones(5), values[:5]))
    assert torch.isnan(pairwise_ranking_accuracy(values[:5], torch.ones(5)))
    with pytest.raises(ValueError, match="same shape"):
        pairwise_ranking_accuracy(values, values[:3])
    with pytest.raises(ValueError, match="finite"):
        spearman_correlation(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))


def test_metric_classes_accumulate_batches_exactly():
    predicted, target = _with_ties()
    accuracy, spearman = PairwiseRankingAccuracy(), SpearmanCorrelation()
    for start in range(0, 40, 13):
        accuracy.update(predicted[start : start + 13], target[start : start + 13])
        spearman.update(predicted[start : start + 13], target[start : start + 13])
    assert accuracy.compute().item() == pytest.approx(_brute_force_ranking_accuracy(predicted, target), abs=1e-12)
    assert spearman.compute().item() == pytest.approx(stats.spearmanr(predicted, target).statistic, abs=1e-12)


def _metrics_on_rank(rank: int, world_size: int) -> tuple[float, float]:
    predicted, target = _with_ties(41)
    share = slice(rank * 41 // world_size, (rank + 1) * 41 // world_size)  # 20 and 21 samples
    accuracy, spearman = PairwiseRankingAccuracy(), SpearmanCorrelation()
    accuracy.update(predicted[share], target[share])
    spearman.update(predicted[share], target[share])
    return accuracy.compute().item(), spearman.compute().item()


@pytest.mark.ddp
def test_two_process_metrics_equal_one_process():
    single = _metrics_on_rank(0, 1)
    for result in run_distributed(_metrics_on_rank, world_size=2):
        assert result == pytest.approx(single, abs=1e-12)
