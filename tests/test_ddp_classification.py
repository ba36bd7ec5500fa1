from __future__ import annotations

import functools

import pytest
import torch

from cfx.data import SyntheticImages
from cfx.nn import SmallCNN
from cfx.tasks import ClassificationTask
from tests.trainers import quiet_trainer


@pytest.mark.ddp
def test_two_process_test_metrics_equal_one_process():
    torch.manual_seed(0)
    # 3 classes x 105 samples: a 63-sample test split that two ranks cannot share evenly (no padding allowed).
    datamodule = SyntheticImages(num_samples=315, num_classes=3, noise=0.5, batch_size=16, eval_batch_size=8)
    network = SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16)
    task = ClassificationTask(network, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    quiet_trainer(1, max_steps=60).fit(task, datamodule)
    assert len(datamodule.dataset("test")) == 63
    single = quiet_trainer(1).test(task, datamodule, verbose=False)[0]
    double = quiet_trainer(2).test(task, datamodule, verbose=False)[0]
    # A model that has learnt something (0.63 here) but is far from perfect: a padded, dropped or differently
    # classified sample changes the accuracy (a constant prediction would score 1/3 on any balanced split).
    assert 0.45 < single["test/acc"] < 0.9
    assert double["test/acc"] == pytest.approx(single["test/acc"], abs=1e-7)
    assert double["test/loss"] == pytest.approx(single["test/loss"], rel=1e-6)
